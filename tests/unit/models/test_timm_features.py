"""Any timm model as a feature teacher: a CNN's stages by name with its own state_dict (classifier left out, any
other key accounted for), a ViT through vit_features, and CWD on a CNN teacher's last stage."""

from __future__ import annotations

from functools import partial

import pytest
import timm
import torch

from cwd_lightning.distill import DistillationModule, DistillTerm, StepContext
from cwd_lightning.losses import ChannelWiseDivergence
from cwd_lightning.models import TimmFeatureMaps, VitFeatureMaps, timm_features
from cwd_lightning.tasks import SegmentationTask
from tests.helpers import tiny_segmenter


def test_a_cnn_gives_its_stages_with_the_weights_of_its_state_dict(tmp_path):
    torch.manual_seed(0)
    whole = timm.create_model("resnet18")
    torch.save(whole.state_dict(), tmp_path / "resnet18.pt")  # with its classifier (fc.*)
    model = timm_features("resnet18", checkpoint=str(tmp_path / "resnet18.pt"), out_indices=[2, 3, 4]).eval()
    assert isinstance(model, TimmFeatureMaps) and model.pretrained_source.startswith("timm resnet18")
    images = torch.randn(2, 3, 64, 64)
    maps = model(images)
    shapes = {"stage2": (2, 128, 8, 8), "stage3": (2, 256, 4, 4), "stage4": (2, 512, 2, 2), "features": (2, 512, 2, 2)}
    assert {key: tuple(value.shape) for key, value in maps.items()} == shapes
    with torch.no_grad():
        expected = whole.eval().forward_features(images)  # the whole model's last stage, its own weights
    torch.testing.assert_close(maps["features"], expected)

    state = {**whole.state_dict(), "layer5.0.conv1.weight": torch.zeros(1)}
    torch.save(state, tmp_path / "odd.pt")
    refused = r"odd\.pt' does not match .*\n.*unexpected keys \(1\): layer5\.0\.conv1\.weight"
    with pytest.raises(ValueError, match=refused):
        timm_features("resnet18", checkpoint=str(tmp_path / "odd.pt"))


def test_a_vit_goes_through_vit_features(tmp_path):
    timm_args = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
    model = timm_features("vit_tiny_patch16_224", out_indices=[0], timm_args=timm_args)
    assert isinstance(model, VitFeatureMaps) and model.blocks == [0]
    assert model(torch.randn(1, 3, 32, 32))["features"].shape == (1, 32, 4, 4)
    torch.manual_seed(1)
    whole = timm.create_model("vit_tiny_patch16_224", num_classes=10, **timm_args)
    torch.save(whole.state_dict(), tmp_path / "vit.pt")  # with its classifier (head.*), left out
    loaded = timm_features("vit_tiny_patch16_224", checkpoint=str(tmp_path / "vit.pt"), timm_args=timm_args)
    assert torch.equal(loaded.vit.cls_token, whole.cls_token) and loaded.pretrained_source.endswith("vit.pt")


def test_cwd_distils_a_cnn_teachers_last_stage(tmp_path):
    torch.manual_seed(0)
    torch.save(timm.create_model("resnet18").state_dict(), tmp_path / "resnet18.pt")
    teacher = timm_features("resnet18", checkpoint=str(tmp_path / "resnet18.pt"))
    term = DistillTerm("cwd_stage", "decoder", "/features", ChannelWiseDivergence(4.0), 1.0, connector="conv_bn",
                       resize="teacher_to_student")  # fmt: skip
    module = DistillationModule(task=SegmentationTask(11, example_size=32), student=tiny_segmenter(), teacher=teacher,
                                terms=[term], optimizer=partial(torch.optim.SGD, lr=0.1))  # fmt: skip
    (pair,) = module.distiller.pairs["cwd_stage"]
    assert pair.connector[0].out_channels == 512  # the student's decoder → the teacher's 512 channels
    images = torch.randn(2, 3, 32, 32)
    with module.distiller.recording():
        module.student(images)
        module.teacher(images)
        total, values, _ = module.distiller.compute(StepContext())
    assert torch.isfinite(total) and float(values["cwd_stage"]) > 0
    total.backward()
    assert pair.connector[0].weight.grad is not None
