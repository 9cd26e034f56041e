"""Decode heads of the dilated segmentors, as mmsegmentation builds them (conv-BN-ReLU blocks)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 1, dilation: int = 1) -> nn.Sequential:
    padding = dilation * (kernel_size - 1) // 2
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class PyramidPoolingHead(nn.Module):
    """PSPNet's head (Zhao et al. 2017; mmseg ``PSPHead``): the feature average-pooled to 1×1, 2×2, 3×3
    and 6×6 bins, each reduced by a 1×1 conv-BN-ReLU and upsampled back, concatenated with the feature,
    a 3×3 conv-BN-ReLU ``bottleneck`` (the "PSP-module output" the CWD authors distil), dropout and a
    1×1 ``classifier`` (the logits)."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, bins: tuple[int, ...] = (1, 2, 3, 6),
                 dropout: float = 0.1) -> None:  # fmt: skip
        super().__init__()
        self.pools = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(size), conv_bn_relu(in_channels, channels)) for size in bins
        )
        self.bottleneck = conv_bn_relu(in_channels + len(bins) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feature: Tensor) -> Tensor:
        size = feature.shape[-2:]
        pooled = [F.interpolate(pool(feature), size=size, mode="bilinear", align_corners=False) for pool in self.pools]
        return self.classifier(self.dropout(self.bottleneck(torch.cat([feature, *pooled], dim=1))))


class AtrousPyramidHead(nn.Module):
    """DeepLabV3's head (Chen et al. 2017; mmseg ``ASPPHead``): an image-pooling branch, a 1×1 branch and
    3×3 branches at the given dilations, concatenated, a 3×3 conv-BN-ReLU ``bottleneck``, dropout and a
    1×1 ``classifier``. mmseg's D8 configs use dilations 1, 12, 24, 36."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, dilations: tuple[int, ...] = (1, 12, 24, 36),
                 dropout: float = 0.1) -> None:  # fmt: skip
        super().__init__()
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), conv_bn_relu(in_channels, channels))
        self.branches = nn.ModuleList(
            conv_bn_relu(in_channels, channels, 1 if dilation == 1 else 3, dilation) for dilation in dilations
        )
        self.bottleneck = conv_bn_relu((len(dilations) + 1) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feature: Tensor) -> Tensor:
        pooled = F.interpolate(self.image_pool(feature), size=feature.shape[-2:], mode="bilinear", align_corners=False)
        branches = [pooled, *(branch(feature) for branch in self.branches)]
        return self.classifier(self.dropout(self.bottleneck(torch.cat(branches, dim=1))))


class FCNHead(nn.Module):
    """The auxiliary head on stage 3 (mmseg ``FCNHead``, one conv): 3×3 conv-BN-ReLU, dropout, 1×1 classifier."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.conv = conv_bn_relu(in_channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feature: Tensor) -> Tensor:
        return self.classifier(self.dropout(self.conv(feature)))
