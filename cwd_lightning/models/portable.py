"""A segmentation student as deployed: images in, logits at the images' size out, any batch and size.

``portable_segmenter`` wraps a student for ``torch.export`` / ONNX. Two things differ from training:
- dict outputs (``{"out", "aux"}``) give their main logits, upsampled to the input size as the metrics do;
- timm's ``AvgPool2dSame`` at stride 1 becomes a fixed zero pad and an average pool (same values);
- ``nn.AdaptiveAvgPool2d`` with bins > 1 (PSPNet's pyramid pooling) becomes the same average written as
  two pooling matrices. The ONNX exporter lowers adaptive pooling to an ``AveragePool`` whose kernel is
  fixed at the traced size, so the exported model is silently wrong at any other size (max error 1.5 on
  PSPNet logits at 2× the size); the matrix form follows the input size and equals torch's within 1e-6.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cwd_lightning.models.segmentation import main_logits


def _pooling_matrix(size: int, bins: int, like: Tensor) -> Tensor:
    """(bins, size): row i averages positions [⌊i·size/bins⌋, ⌈(i+1)·size/bins⌉), torch's adaptive bins."""
    bin_index = torch.arange(bins, device=like.device)
    position = torch.arange(size, device=like.device)
    start = (bin_index * size) // bins
    end = ((bin_index + 1) * size + bins - 1) // bins
    inside = (position[None, :] >= start[:, None]) & (position[None, :] < end[:, None])
    return inside.to(like.dtype) / (end - start)[:, None].to(like.dtype)


class MatrixAdaptiveAvgPool2d(nn.Module):
    """``nn.AdaptiveAvgPool2d`` as ``P_h · x · P_wᵀ``, exportable with dynamic height and width."""

    def __init__(self, output_size: int | tuple[int, int]) -> None:
        super().__init__()
        self.output_size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)

    def forward(self, x: Tensor) -> Tensor:
        rows = _pooling_matrix(x.shape[-2], self.output_size[0], x)
        columns = _pooling_matrix(x.shape[-1], self.output_size[1], x)
        return rows @ x @ columns.transpose(0, 1)


class PortableSegmenter(nn.Module):
    def __init__(self, student: nn.Module) -> None:
        super().__init__()
        self.student = student

    def forward(self, images: Tensor) -> Tensor:
        logits = main_logits(self.student(images))
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)


def _static_same_pool(pool: nn.AvgPool2d) -> nn.Module | None:
    """timm's ``AvgPool2dSame`` (the stride-1 shortcut pool of a dilated V1d ResNet, e.g. ``resnet18d`` at
    output stride 8) computes its "same" padding with ``math.ceil`` on the input size, which
    ``torch.export.save`` cannot serialise. At stride 1 the padding does not depend on the size:
    k − 1 zeros, the extra one on the right/bottom, so it is written as a fixed zero pad."""
    if _pair(pool.stride) != (1, 1):
        return None
    (kh, kw) = _pair(pool.kernel_size)
    pad = nn.ZeroPad2d(((kw - 1) // 2, kw // 2, (kh - 1) // 2, kh // 2))
    return nn.Sequential(pad, nn.AvgPool2d((kh, kw), 1, 0, pool.ceil_mode, pool.count_include_pad))


def portable_segmenter(student: nn.Module) -> PortableSegmenter:
    """A copy of ``student`` (eval mode) wrapped for export; ``student`` itself is not changed."""
    student = copy.deepcopy(student).eval()
    for module in list(student.modules()):
        for name, child in list(module.named_children()):
            size = getattr(child, "output_size", None)
            if isinstance(child, nn.AdaptiveAvgPool2d) and size not in (1, (1, 1)) and None not in _pair(size):
                setattr(module, name, MatrixAdaptiveAvgPool2d(size))
            elif type(child).__name__ == "AvgPool2dSame" and (static := _static_same_pool(child)) is not None:
                setattr(module, name, static)
    return PortableSegmenter(student).eval()


def _pair(size: int | tuple) -> tuple:
    return (size, size) if isinstance(size, int) else tuple(size)


def input_stride(student: nn.Module) -> int:
    """The multiple an input side must be of: the encoder's total downsampling (smp: ``output_stride``,
    timm ``features_only``: the largest feature reduction), 32 when unknown."""
    encoder = getattr(student, "encoder", None)
    stride = getattr(encoder, "output_stride", None)
    if stride is None and hasattr(encoder, "feature_info"):
        stride = max(encoder.feature_info.reduction())
    return int(stride or 32)
