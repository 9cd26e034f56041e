"""mmdetection RetinaNet checkpoints load into build_detector, which then builds mmdet's layout by itself: the
fixture's seeded mmdet weights, converted, give mmdet's raw head outputs (class logits and box deltas of every
anchor) and its anchors; every key of the R101 and X101-64x4d models maps; an odd key is named."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torchvision.models.detection.image_list import ImageList

from cwd_lightning.models import build_detector
from cwd_lightning.models.detection import ExtraLevels, FixedStrideAnchorGenerator
from cwd_lightning.models.importers import BACKGROUND_BIAS, mmdet_retinanet_to_torchvision
from cwd_lightning.models.pretrained import built_without_pretrained
from cwd_lightning.models.weights import load_weights
from tests.helpers import REPO, fixture_input, seeded_state

FIXTURES = REPO / "tests" / "fixtures" / "openmmlab"


def _zoo_file(tmp_path, name: str = "retinanet_r50_fpn", drop: str | None = None, extra: str | None = None):
    """The fixture's seeded weights as an mmdet model-zoo file."""
    record = json.loads((FIXTURES / f"mmdet_{name}.json").read_text())
    state = {k: v for k, v in seeded_state(record["keys"]).items() if k != drop}
    if extra:
        state[extra] = torch.zeros(1)
    path = tmp_path / f"{name}_1x_coco.pth"
    torch.save({"meta": {"mmdet_version": "3.3.0"}, "state_dict": state}, path)
    return path


def _flat(levels: list[torch.Tensor], per_anchor: int) -> torch.Tensor:
    """mmdet's per-level N×(A·K)×H×W maps as torchvision's N×(H·W·A)×K, levels concatenated."""
    return torch.cat([level.permute(0, 2, 3, 1).reshape(level.shape[0], -1, per_anchor) for level in levels], 1)


def test_an_mmdet_retinanet_file_gives_mmdets_head_outputs_and_anchors(tmp_path):
    detector = build_detector("retinanet", "resnet50", 80, backbone_weights=None, checkpoint=str(_zoo_file(tmp_path)))
    extra = detector.backbone.fpn.extra_blocks
    assert isinstance(extra, ExtraLevels) and extra.source == "c5" and not extra.relu_before_p7
    assert extra.p6.in_channels == 2048  # P6 from C5, as mmdet's add_extra_convs='on_input'
    assert isinstance(detector.anchor_generator, FixedStrideAnchorGenerator)
    assert detector.pretrained_source.startswith("checkpoint ")  # a teacher needs no teacher_checkpoint
    expected = torch.load(FIXTURES / "mmdet_retinanet_r50_fpn.pt", weights_only=True)
    detector.eval()
    with torch.no_grad():
        features = list(detector.backbone(fixture_input()).values())
        head = detector.head(features)
    scores, deltas = _flat(expected["cls_scores"], 80), _flat(expected["bbox_preds"], 4)
    assert head["cls_logits"].shape == (1, 86 * 9, 81) and head["bbox_regression"].shape == deltas.shape
    assert (head["cls_logits"][..., 1:] - scores).abs().max() <= 1e-5
    assert (head["bbox_regression"] - deltas).abs().max() <= 1e-5
    assert torch.all(head["cls_logits"][..., 0] == BACKGROUND_BIAS)  # the background never fires:
    assert torch.sigmoid(torch.tensor(BACKGROUND_BIAS)).item() == pytest.approx(0.01, rel=1e-6)  # at most 1 %

    maps = [torch.empty(1, 256, *grid) for grid in expected["anchor_grids"]]
    (anchors,) = detector.anchor_generator(ImageList(torch.empty(1, 3, 160, 224), [(160, 224)]), maps)
    torch.testing.assert_close(anchors, torch.cat(expected["anchors"]), rtol=0, atol=1e-4)

    with_relu = build_detector("retinanet", "resnet50", 80, backbone_weights=None, relu_before_p7=True,
                               checkpoint=str(_zoo_file(tmp_path))).eval()  # fmt: skip
    with torch.no_grad():
        p7 = with_relu.head(list(with_relu.backbone(fixture_input()).values()))["cls_logits"][0, -9:, 1:]
    assert (p7 - scores[0, -9:]).abs().max() > 1e-3  # mmdet's P7 has no ReLU before it: this one differs


def test_a_detector_rebuilt_without_its_mmdet_file_keeps_mmdets_layout(tmp_path):
    """A resumed run builds its student without the builder's checkpoint (the run's checkpoint replaces it): the
    layout the file implied is set first, so the rebuilt detector takes the resumed weights."""
    spec = {"class_path": "cwd_lightning.models.build_detector",
            "init_args": {"arch": "retinanet", "backbone": "resnet50", "num_classes": 80, "backbone_weights": None,
                          "p6_from": None, "relu_before_p7": None, "anchor_style": None,
                          "checkpoint": str(_zoo_file(tmp_path))}}  # fmt: skip
    written = copy.deepcopy(spec)
    with built_without_pretrained([spec]):
        init_args = spec["init_args"]
        assert init_args["checkpoint"] is None
        assert (init_args["p6_from"], init_args["relu_before_p7"], init_args["anchor_style"]) == ("c5", False, "mmdet")
        rebuilt = build_detector(**init_args)
    assert spec == written  # the config keeps what was written
    assert isinstance(rebuilt.backbone.fpn.extra_blocks, ExtraLevels)
    assert isinstance(rebuilt.anchor_generator, FixedStrideAnchorGenerator)


def test_the_torchvision_layout_differs_where_the_issue_says():
    """Default layout: P6 from P5, anchors rounded and at image size // grid size (160 // 3 = 53, not 64)."""
    detector = build_detector("retinanet", "resnet50", 80, backbone_weights=None)
    expected = torch.load(FIXTURES / "mmdet_retinanet_r50_fpn.pt", weights_only=True)
    maps = [torch.empty(1, 256, *grid) for grid in expected["anchor_grids"]]
    (anchors,) = detector.anchor_generator(ImageList(torch.empty(1, 3, 160, 224), [(160, 224)]), maps)
    assert detector.backbone.fpn.extra_blocks.p6.in_channels == 256
    assert anchors.shape == torch.cat(expected["anchors"]).shape
    assert not torch.allclose(anchors, torch.cat(expected["anchors"]), atol=0.5)


@pytest.mark.parametrize(("name", "backbone"), [("retinanet_r101_fpn", "resnet101"),
                                                ("retinanet_x101-64x4d_fpn", "resnext101_64x4d")])  # fmt: skip
def test_every_key_of_the_larger_mmdet_models_maps_onto_ours(name, backbone):
    record = json.loads((FIXTURES / f"mmdet_{name}.json").read_text())
    with torch.device("meta"):
        model = build_detector("retinanet", backbone, 80, backbone_weights=None, p6_from="c5")
    converted = mmdet_retinanet_to_torchvision(
        {key: torch.empty(shape, device="meta") for key, shape in record["keys"].items()}, name)  # fmt: skip
    ours = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    converted = {k: v for k, v in converted.items() if not k.endswith("num_batches_tracked")}
    assert sorted(converted) == sorted(ours)
    assert all(converted[key].shape == ours[key].shape for key in ours)


def test_an_odd_mmdet_file_is_refused_naming_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"1 key\(s\) that match no layer of build_detector's RetinaNet.*"
                                         r"neck\.fpn_convs\.5\.conv\.weight"):  # fmt: skip
        build_detector("retinanet", "resnet50", 80, backbone_weights=None,
                       checkpoint=str(_zoo_file(tmp_path, extra="neck.fpn_convs.5.conv.weight")))  # fmt: skip
    with pytest.raises(ValueError, match=r"missing keys \(1\): head\.regression_head\.bbox_reg\.bias"):
        build_detector("retinanet", "resnet50", 80, backbone_weights=None,
                       checkpoint=str(_zoo_file(tmp_path, drop="bbox_head.retina_reg.bias")))  # fmt: skip


@pytest.mark.parametrize("p6_from", ["p5", "c5"])
def test_an_mmdet_file_as_teacher_checkpoint_is_refused_even_when_its_keys_fit(tmp_path, p6_from):
    """In mmdet's P6 layout the file's keys fit, but P7's input and the anchors would still be torchvision's:
    only the builder's checkpoint: builds the layout from the file."""
    detector = build_detector("retinanet", "resnet50", 80, backbone_weights=None, p6_from=p6_from)
    with pytest.raises(ValueError, match=r"is an mmdetection RetinaNet file: give it to the builder"):
        load_weights(detector, _zoo_file(tmp_path))
