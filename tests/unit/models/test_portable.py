"""The portable segmentation student: pooling as matrices at any size, logits at the input size, export to
.pt2 and ONNX."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cwd_lightning.models import build_dilated_segmentor


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
