"""The paper's dilated segmentors: stride-8 logits, mmseg's parameter counts and dilations, clear errors."""

from __future__ import annotations

import pytest
import torch

from cwd_lightning.models import build_dilated_segmentor

#: parameters of the networks as built here (19 classes), quoted in the README
PARAMETERS = {("psp", "resnet18"): 12_790_086, ("psp", "resnet101"): 67_967_622, ("aspp", "resnet18"): 13_986_374}


@pytest.mark.parametrize(("head", "encoder"), sorted(PARAMETERS))
def test_dilated_segmentors_give_stride_8_main_and_auxiliary_logits(head, encoder):
    torch.manual_seed(0)
    model = build_dilated_segmentor(head, encoder, 19, encoder_weights=None)
    assert sum(p.numel() for p in model.parameters()) == PARAMETERS[head, encoder]
    outputs = model(torch.randn(2, 3, 64, 96))
    assert outputs["out"].shape == (2, 19, 8, 12) and outputs["aux"].shape == (2, 19, 8, 12)
    (outputs["out"].sum() + outputs["aux"].sum()).backward()
    assert [name for name, p in model.named_parameters() if p.grad is None] == []
    model.eval()
    assert set(model(torch.randn(1, 3, 64, 64))) == {"out"}  # the auxiliary head is for training only


def test_the_encoder_is_dilated_not_strided_after_stage_2():
    model = build_dilated_segmentor("psp", "resnet50", 19, encoder_weights=None)
    layer3, layer4 = model.encoder.layer3, model.encoder.layer4
    assert [layer3[0].conv2.stride, layer4[0].conv2.stride] == [(1, 1), (1, 1)]
    assert [layer3[1].conv2.dilation, layer4[1].conv2.dilation] == [(2, 2), (4, 4)]
    assert model.encoder.conv1[0].out_channels == 32  # the V1c deep stem: 3×3 convs 32-32-64


def test_bad_choices_are_clear_errors():
    with pytest.raises(ValueError, match=r"timm has no ImageNet weights for the V1c resnet18.*use resnet18d"):
        build_dilated_segmentor("psp", "resnet18", 19, encoder_weights="imagenet")
    with pytest.raises(ValueError, match="encoder 'resnet7' is not one of"):
        build_dilated_segmentor("psp", "resnet7", 19, encoder_weights=None)


def test_missing_imagenet_weights_fail_with_what_to_fetch(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match=r"could not load ImageNet weights for 'resnet18d'.*encoder_weights: null"):
        build_dilated_segmentor("psp", "resnet18d", 19, encoder_weights="imagenet")


def test_the_r18_d8_blocks_are_dilated_as_mmseg_dilates_them():
    """mmseg's BasicBlock dilates conv1 only (contract_dilation: the first block of a stage at half the
    stage's dilation); timm would dilate conv2 as well."""
    encoder = build_dilated_segmentor(encoder_name="resnet18d", encoder_weights=None).encoder
    dilations = {name: module.dilation[0] for name, module in encoder.named_modules()
                 if name.startswith(("layer3", "layer4")) and name.endswith(("conv1", "conv2"))}  # fmt: skip
    expected = {"layer3.0.conv1": 1, "layer3.1.conv1": 2, "layer4.0.conv1": 2, "layer4.1.conv1": 4}
    assert dilations == {**expected, **{name.replace("conv1", "conv2"): 1 for name in expected}}
