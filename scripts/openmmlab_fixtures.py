"""Write the OpenMMLab fixtures of the tests: mmsegmentation's (and mmdetection's) own models, built with
seeded weights, their key names and shapes, and their outputs on a fixed input, so that the tests check the
conversion of their checkpoints without installing either framework.

The frameworks are needed here only, never by the package: install them beside the project's environment
(not into it) and run this script with them on the path::

    .venv/bin/pip install --target /tmp/openmmlab --no-deps mmengine==0.10.7 mmcv-lite==2.1.0 \\
        mmsegmentation==1.2.2 mmdet==3.3.0 addict yapf termcolor prettytable rich ftfy regex six shapely \\
        pycocotools terminaltables opencv-python-headless==4.10.0.84
    PYTHONPATH=/tmp/openmmlab:. .venv/bin/python scripts/openmmlab_fixtures.py

mmcv-lite has no compiled ops; the models written here call none, so ``mmcv.ops`` (and its submodules) is
replaced by placeholders that fail if anything calls them. The weights of a key are a function of the key alone
(``tests/helpers.seeded_state``), so a test rebuilds them from the recorded key names and shapes.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "tests" / "fixtures" / "openmmlab"


def placeholder_ops() -> None:
    """``mmcv.ops`` and every ``mmcv.ops.<x>`` submodule (mmdet imports some by name) as placeholders:
    importable, failing when used."""
    import importlib.abc
    import importlib.machinery

    class Placeholder:
        def __init__(self, *args, **kwargs) -> None:
            raise RuntimeError("mmcv.ops is a placeholder here (mmcv-lite has no compiled ops)")

    def attribute(name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (Placeholder,), {})

    class PlaceholderOps(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, fullname, path=None, target=None):
            if fullname == "mmcv.ops" or fullname.startswith("mmcv.ops."):
                return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
            return None

        def create_module(self, spec):
            module = types.ModuleType(spec.name)
            module.__getattr__ = attribute
            module.__path__ = []
            return module

        def exec_module(self, module) -> None:
            pass

    sys.meta_path.insert(0, PlaceholderOps())


def mmseg_config(head: str, depth: int, classes: int = 19) -> dict:
    """mmseg 1.2.2's ``pspnet_r*-d8`` / ``deeplabv3_r*-d8`` segmentor (configs/_base_/models/*_r50-d8.py, with
    the R18 configs' 128/64 channels)."""
    norm = {"type": "BN", "requires_grad": True}
    wide = depth >= 50
    stage4, stage3 = (2048, 1024) if wide else (512, 256)
    channels, auxiliary = (512, 256) if wide else (128, 64)
    loss = {"type": "CrossEntropyLoss", "use_sigmoid": False, "loss_weight": 1.0}
    decode = {"in_channels": stage4, "in_index": 3, "channels": channels, "dropout_ratio": 0.1, "num_classes": classes,
              "norm_cfg": norm, "align_corners": False, "loss_decode": loss}  # fmt: skip
    psp, aspp = {"type": "PSPHead", "pool_scales": (1, 2, 3, 6)}, {"type": "ASPPHead", "dilations": (1, 12, 24, 36)}
    decode |= psp if head == "psp" else aspp
    return {
        "type": "EncoderDecoder",
        "backbone": {
            "type": "ResNetV1c",
            "depth": depth,
            "num_stages": 4,
            "out_indices": (0, 1, 2, 3),
            "dilations": (1, 1, 2, 4),
            "strides": (1, 2, 1, 1),
            "norm_cfg": norm,
            "norm_eval": False,
            "style": "pytorch",
            "contract_dilation": True,
        },
        "decode_head": decode,
        "auxiliary_head": {
            "type": "FCNHead",
            "in_channels": stage3,
            "in_index": 2,
            "channels": auxiliary,
            "num_convs": 1,
            "concat_input": False,
            "dropout_ratio": 0.1,
            "num_classes": classes,
            "norm_cfg": norm,
            "align_corners": False,
            "loss_decode": {**loss, "loss_weight": 0.4},
        },
    }


def build_and_record(registry, config: dict, framework: str, stem: str):
    """Build ``config`` with the framework's registry (eval mode) and write ``<stem>.json``: the framework, the
    config and every key's shape. The model and the shapes."""
    model = registry.build(config).eval()
    shapes = {key: list(tensor.shape) for key, tensor in model.state_dict().items()}
    record = {"framework": f"{framework} (mmengine 0.10.7, mmcv-lite 2.1.0)", "config": config, "keys": shapes}
    (OUT / f"{stem}.json").write_text(json.dumps(record, indent=1) + "\n")
    return model, shapes


def write_mmseg(name: str, head: str, depth: int, outputs: bool) -> None:
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules

    from tests.helpers import fixture_input, seeded_state

    register_all_modules()
    model, shapes = build_and_record(MODELS, mmseg_config(head, depth), "mmsegmentation 1.2.2", f"mmseg_{name}")
    if outputs:
        model.load_state_dict(seeded_state(shapes))
        with torch.no_grad():
            features = model.extract_feat(fixture_input())
            logits = {"out": model.decode_head(features), "aux": model.auxiliary_head(features)}
        torch.save(logits, OUT / f"mmseg_{name}.pt")
    print(f"mmseg {name}: {len(shapes)} keys" + (", outputs written" if outputs else ""))


def mmdet_config(depth: int, groups: int = 1, classes: int = 80) -> dict:
    """mmdet 3.3.0's ``retinanet_r50_fpn`` (configs/_base_/models/retinanet_r50_fpn.py) on ResNet-``depth``, or
    ResNeXt-``depth`` 64x4d for ``groups`` 64 (configs/retinanet/retinanet_x101-64x4d_fpn_1x_coco.py)."""
    backbone = {"type": "ResNet", "depth": depth, "num_stages": 4, "out_indices": (0, 1, 2, 3), "frozen_stages": 1,
                "norm_cfg": {"type": "BN", "requires_grad": True}, "norm_eval": True, "style": "pytorch"}  # fmt: skip
    if groups > 1:
        backbone |= {"type": "ResNeXt", "groups": groups, "base_width": 4}
    return {
        "type": "RetinaNet",
        "backbone": backbone,
        "neck": {
            "type": "FPN",
            "in_channels": [256, 512, 1024, 2048],
            "out_channels": 256,
            "start_level": 1,
            "add_extra_convs": "on_input",
            "num_outs": 5,
        },
        "bbox_head": {
            "type": "RetinaHead",
            "num_classes": classes,
            "in_channels": 256,
            "stacked_convs": 4,
            "feat_channels": 256,
            "anchor_generator": {
                "type": "AnchorGenerator",
                "octave_base_scale": 4,
                "scales_per_octave": 3,
                "ratios": [0.5, 1.0, 2.0],
                "strides": [8, 16, 32, 64, 128],
            },
            "bbox_coder": {"type": "DeltaXYWHBBoxCoder", "target_means": [0.0] * 4, "target_stds": [1.0] * 4},
            "loss_cls": {"type": "FocalLoss", "use_sigmoid": True, "gamma": 2.0, "alpha": 0.25, "loss_weight": 1.0},
            "loss_bbox": {"type": "L1Loss", "loss_weight": 1.0},
        },
    }


#: the image whose anchors the fixture records: padded to 160×224, P6 and P7 of 3×4 and 2×2 cells
ANCHOR_IMAGE = (160, 224)


def write_mmdet(name: str, depth: int, groups: int, outputs: bool) -> None:
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules

    from tests.helpers import fixture_input, seeded_state

    register_all_modules()
    model, shapes = build_and_record(MODELS, mmdet_config(depth, groups), "mmdetection 3.3.0", f"mmdet_{name}")
    if outputs:
        model.load_state_dict(seeded_state(shapes))
        with torch.no_grad():
            scores, deltas = model.bbox_head(model.extract_feat(fixture_input()))
        height, width = ANCHOR_IMAGE
        grids = [(height // 8, width // 8)]
        for _ in range(4):  # each level a stride-2 3×3 conv (padding 1) of the one before: ⌈n / 2⌉
            grids.append(((grids[-1][0] + 1) // 2, (grids[-1][1] + 1) // 2))
        anchors = model.bbox_head.prior_generator.grid_priors(grids, device="cpu")
        torch.save({"cls_scores": list(scores), "bbox_preds": list(deltas), "anchor_grids": grids,
                    "anchors": anchors}, OUT / f"mmdet_{name}.pt")  # fmt: skip
    print(f"mmdet {name}: {len(shapes)} keys" + (", outputs written" if outputs else ""))


def main() -> None:
    placeholder_ops()
    OUT.mkdir(parents=True, exist_ok=True)
    write_mmseg("pspnet_r18-d8", "psp", 18, outputs=True)
    write_mmseg("deeplabv3_r18-d8", "aspp", 18, outputs=True)
    for head, architecture in (("psp", "pspnet"), ("aspp", "deeplabv3")):
        for depth in (50, 101):
            write_mmseg(f"{architecture}_r{depth}-d8", head, depth, outputs=False)
    write_mmdet("retinanet_r50_fpn", 50, 1, outputs=True)
    write_mmdet("retinanet_r101_fpn", 101, 1, outputs=False)
    write_mmdet("retinanet_x101-64x4d_fpn", 101, 64, outputs=False)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
