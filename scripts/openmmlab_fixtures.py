"""Write the OpenMMLab fixtures of the tests: mmsegmentation's (and mmdetection's) own models, built with
seeded weights, their key names and shapes, and their outputs on a fixed input, so that the tests check the
conversion of their checkpoints without installing either framework.

The frameworks are needed here only, never by the package: install them beside the project's environment
(not into it) and run this script with them on the path::

    .venv/bin/pip install --target /tmp/openmmlab --no-deps mmengine==0.10.7 mmcv-lite==2.1.0 \\
        mmsegmentation==1.2.2 mmdet==3.3.0 addict yapf termcolor prettytable rich ftfy regex \\
        opencv-python-headless==4.10.0.84
    PYTHONPATH=/tmp/openmmlab:. .venv/bin/python scripts/openmmlab_fixtures.py

mmcv-lite has no compiled ops; the models written here call none, so ``mmcv.ops`` is replaced by placeholders
that fail if anything calls them. The weights of a key are a function of the key alone
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
    """``mmcv.ops`` as placeholders: importable, failing when used."""
    ops = types.ModuleType("mmcv.ops")

    class Placeholder:
        def __init__(self, *args, **kwargs) -> None:
            raise RuntimeError("mmcv.ops is a placeholder here (mmcv-lite has no compiled ops)")

    def attribute(name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (Placeholder,), {})

    ops.__getattr__ = attribute
    ops.__path__ = []
    sys.modules["mmcv.ops"] = ops


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


def write_mmseg(name: str, head: str, depth: int, outputs: bool) -> None:
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules

    from tests.helpers import fixture_input, seeded_state

    register_all_modules()
    config = mmseg_config(head, depth)
    model = MODELS.build(config).eval()
    shapes = {key: list(tensor.shape) for key, tensor in model.state_dict().items()}
    record = {"framework": "mmsegmentation 1.2.2 (mmengine 0.10.7, mmcv-lite 2.1.0)", "config": config, "keys": shapes}
    (OUT / f"mmseg_{name}.json").write_text(json.dumps(record, indent=1) + "\n")
    if outputs:
        model.load_state_dict(seeded_state(shapes))
        with torch.no_grad():
            features = model.extract_feat(fixture_input())
            logits = {"out": model.decode_head(features), "aux": model.auxiliary_head(features)}
        torch.save(logits, OUT / f"mmseg_{name}.pt")
    print(f"mmseg {name}: {len(shapes)} keys" + (", outputs written" if outputs else ""))


def main() -> None:
    placeholder_ops()
    OUT.mkdir(parents=True, exist_ok=True)
    write_mmseg("pspnet_r18-d8", "psp", 18, outputs=True)
    write_mmseg("deeplabv3_r18-d8", "aspp", 18, outputs=True)
    for head, architecture in (("psp", "pspnet"), ("aspp", "deeplabv3")):
        for depth in (50, 101):
            write_mmseg(f"{architecture}_r{depth}-d8", head, depth, outputs=False)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
