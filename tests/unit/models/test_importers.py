"""mmsegmentation checkpoints load into the dilated segmentors: the fixtures' seeded mmseg weights, converted,
give mmseg's logits; every key of the R50/R101 models maps onto ours; a key too many or too few is named."""

from __future__ import annotations

import json

import pytest
import torch

from cwd_lightning.models import build_dilated_segmentor
from cwd_lightning.models.importers import mmseg_to_dilated
from cwd_lightning.models.weights import load_weights
from tests.helpers import REPO, fixture_input, seeded_state

FIXTURES = REPO / "tests" / "fixtures" / "openmmlab"
HEADS = {"pspnet": "psp", "deeplabv3": "aspp"}


def _mmseg(name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    record = json.loads((FIXTURES / f"mmseg_{name}.json").read_text())
    return record, seeded_state(record["keys"])


@pytest.mark.parametrize("name", ["pspnet_r18-d8", "deeplabv3_r18-d8"])
def test_converted_mmseg_weights_give_mmsegs_logits(name, tmp_path):
    _, state = _mmseg(name)
    path = tmp_path / f"{name}.pth"
    torch.save({"meta": {"dataset_meta": {"classes": ["road"] * 19}}, "state_dict": state}, path)  # a zoo file
    model = build_dilated_segmentor(HEADS[name.split("_")[0]], "resnet18", 19, encoder_weights=None)
    load_weights(model, path)  # every key mapped, none missing: a strict load
    expected = torch.load(FIXTURES / f"mmseg_{name}.pt", weights_only=True)
    model.eval()
    with torch.no_grad():
        images = fixture_input()
        out = model(images)["out"]
        auxiliary = model.auxiliary_head(model.encoder(images)[0])
    assert out.shape == expected["out"].shape == (1, 19, 8, 8)
    assert (out - expected["out"]).abs().max() <= 1e-5 and (auxiliary - expected["aux"]).abs().max() <= 1e-5


@pytest.mark.parametrize("name", ["pspnet_r50-d8", "pspnet_r101-d8", "deeplabv3_r50-d8", "deeplabv3_r101-d8"])
def test_every_key_of_the_larger_mmseg_models_maps_onto_ours(name):
    record = json.loads((FIXTURES / f"mmseg_{name}.json").read_text())
    architecture, depth = name.split("_")[0], name.split("_r")[1].split("-")[0]
    with torch.device("meta"):  # shapes only
        model = build_dilated_segmentor(HEADS[architecture], f"resnet{depth}", 19, encoder_weights=None)
    converted = mmseg_to_dilated(
        {key: torch.empty(shape, device="meta") for key, shape in record["keys"].items()}, name
    )
    ours = model.state_dict()
    assert sorted(converted) == sorted(ours)
    assert all(list(converted[key].shape) == list(ours[key].shape) for key in ours)


def test_a_missing_or_unknown_key_is_refused_naming_it(tmp_path):
    _, state = _mmseg("pspnet_r18-d8")
    model = build_dilated_segmentor("psp", "resnet18", 19, encoder_weights=None)
    unknown = {**state, "decode_head.extra_conv.weight": torch.zeros(1)}
    torch.save({"meta": {}, "state_dict": unknown}, tmp_path / "unknown.pth")
    with pytest.raises(
        ValueError, match=r"unknown\.pth'.*1 key\(s\) that match no layer.*decode_head\.extra_conv\.weight"
    ):
        load_weights(model, tmp_path / "unknown.pth")
    missing = {key: value for key, value in state.items() if not key.startswith("auxiliary_head.")}
    torch.save({"meta": {}, "state_dict": missing}, tmp_path / "no_aux.pth")
    with pytest.raises(ValueError, match=r"does not match the configured teacher architecture\n.*missing keys \(7\): "
                       r"auxiliary_head\.classifier\.bias"):  # fmt: skip
        load_weights(model, tmp_path / "no_aux.pth")
    without = build_dilated_segmentor("psp", "resnet18", 19, encoder_weights=None, auxiliary=False)
    load_weights(without, tmp_path / "no_aux.pth")  # mmseg's model without its auxiliary head loads into ours


def test_a_student_starts_from_an_mmseg_checkpoint(tmp_path):
    _, state = _mmseg("deeplabv3_r18-d8")
    torch.save({"meta": {}, "state_dict": state}, tmp_path / "deeplabv3_r18-d8.pth")
    student = build_dilated_segmentor("aspp", "resnet18", 19, encoder_weights=None,
                                      checkpoint=str(tmp_path / "deeplabv3_r18-d8.pth"))  # fmt: skip
    converted = mmseg_to_dilated(state, "fixture")
    assert all(torch.equal(student.state_dict()[key], value) for key, value in converted.items())
    # built so, the network is a teacher with weights: it needs no teacher_checkpoint
    assert student.pretrained_source == "checkpoint deeplabv3_r18-d8.pth"
    from cwd_lightning.distill.teacher import prepare_teachers

    (fingerprint,) = prepare_teachers({"teacher": student}, {}).values()
    assert fingerprint
