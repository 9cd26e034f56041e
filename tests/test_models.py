"""The paper's dilated segmentors (PSPNet-D8, DeepLabV3-D8) and the task's handling of auxiliary logits."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cwd_lightning.models.dilated import build_dilated_segmentor
from cwd_lightning.tasks.segmentation import SegmentationTask

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


def test_the_auxiliary_loss_enters_with_its_weight_in_training_only():
    torch.manual_seed(0)
    model = build_dilated_segmentor("psp", "resnet18", 5, encoder_weights=None)
    task = SegmentationTask(5, aux_weight=0.4)
    images, masks = torch.randn(2, 3, 64, 64), torch.randint(0, 5, (2, 64, 64))
    masks[:, :4] = 255
    loss, parts = task.training_loss(model, (images, masks))
    assert set(parts) == {"ce", "aux_ce"}
    assert float(loss) == pytest.approx(float(parts["ce"] + 0.4 * parts["aux_ce"]), rel=1e-5)
    model.eval()
    with torch.no_grad():
        predicted = task.predict(model, images)
        validation_loss, _ = task.validation_step(model, (images, masks))
    assert predicted.shape == (2, 64, 64)  # stride-8 logits upsampled before the argmax
    assert float(validation_loss) > 0 and "mIoU" in {k.split("/")[-1] for k in task.compute_metrics()}


@pytest.mark.parametrize("bins", [1, 2, 3, 6, (2, 5)])
def test_the_portable_pooling_equals_torch_adaptive_pooling_at_any_size(bins):
    from cwd_lightning.models.portable import MatrixAdaptiveAvgPool2d

    for height, width in [(8, 8), (13, 7), (100, 152)]:
        x = torch.randn(2, 4, height, width, dtype=torch.float64)
        torch.testing.assert_close(MatrixAdaptiveAvgPool2d(bins)(x), nn.AdaptiveAvgPool2d(bins)(x))


def test_the_portable_segmenter_gives_main_logits_at_the_input_size_and_leaves_the_student_alone():
    from cwd_lightning.models.portable import MatrixAdaptiveAvgPool2d, input_stride, portable_segmenter

    student = build_dilated_segmentor(encoder_name="resnet18", num_classes=5, encoder_weights=None).eval()
    portable = portable_segmenter(student)
    assert input_stride(student) == 8
    assert sum(isinstance(m, MatrixAdaptiveAvgPool2d) for m in portable.modules()) == 3  # bins 2, 3, 6
    assert not any(isinstance(m, MatrixAdaptiveAvgPool2d) for m in student.modules())
    images = torch.randn(2, 3, 40, 56)
    with torch.no_grad():
        expected = nn.functional.interpolate(student(images)["out"], size=(40, 56), mode="bilinear")
        torch.testing.assert_close(portable(images), expected, atol=1e-5, rtol=1e-5)


def test_a_dilated_v1d_student_exports_to_pt2_and_onnx_at_any_batch_and_size(tmp_path):
    """The real-data students (PSPNet-R18-D8 on resnet18d) hold timm's AvgPool2dSame, whose size-dependent
    padding torch.export.save could not serialise: the export failed and left a broken student.pt2."""
    import onnxruntime

    from cwd_lightning.export import export_segmenter

    torch.manual_seed(0)
    student = build_dilated_segmentor(encoder_name="resnet18d", num_classes=5, encoder_weights=None).eval()
    report = export_segmenter(student, tmp_path)
    assert {name: check["kept"] for name, check in report["files"].items()} == {
        "student.pt2": True,
        "student.onnx": True,
    }
    images = torch.randn(3, 3, 48, 80)  # neither the traced (2, 32×32) nor the checked (3, 64×64) shape
    with torch.no_grad():
        expected = nn.functional.interpolate(student(images)["out"], size=(48, 80), mode="bilinear")
        assert (torch.export.load(tmp_path / "student.pt2").module()(images) - expected).abs().max() <= 1e-4
    session = onnxruntime.InferenceSession(str(tmp_path / "student.onnx"), providers=["CPUExecutionProvider"])
    assert (torch.from_numpy(session.run(None, {"images": images.numpy()})[0]) - expected).abs().max() <= 1e-4


def test_the_r18_d8_blocks_are_dilated_as_mmseg_dilates_them():
    """mmseg's BasicBlock dilates conv1 only (contract_dilation: the first block of a stage at half the
    stage's dilation); timm would dilate conv2 as well."""
    encoder = build_dilated_segmentor(encoder_name="resnet18d", encoder_weights=None).encoder
    dilations = {name: module.dilation[0] for name, module in encoder.named_modules()
                 if name.startswith(("layer3", "layer4")) and name.endswith(("conv1", "conv2"))}  # fmt: skip
    expected = {"layer3.0.conv1": 1, "layer3.1.conv1": 2, "layer4.0.conv1": 2, "layer4.1.conv1": 4}
    assert dilations == {**expected, **{name.replace("conv1", "conv2"): 1 for name in expected}}
