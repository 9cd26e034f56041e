"""Trainable adapters that map a student tensor onto the teacher's shape."""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

ConnectorKind = Literal["conv", "conv_bn", "conv_bn_relu"]
ResizeMode = Literal["student_to_teacher", "teacher_to_student"]


def build_connector(kind: ConnectorKind, in_channels: int, out_channels: int) -> nn.Module:
    """1×1 conv from student to teacher channels, optionally followed by BN (and ReLU, as the CWD
    authors do for feature distillation). Trained together with the student."""
    if kind not in ("conv", "conv_bn", "conv_bn_relu"):
        raise ValueError(f"unknown connector {kind!r}; choose 'conv', 'conv_bn' or 'conv_bn_relu'")
    layers: list[nn.Module] = [nn.Conv2d(in_channels, out_channels, 1, bias=kind == "conv")]
    if kind != "conv":
        layers.append(nn.BatchNorm2d(out_channels))
    if kind == "conv_bn_relu":
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def match_size(student: Tensor, teacher: Tensor, mode: ResizeMode) -> tuple[Tensor, Tensor]:
    """Bilinear resize of one side to the other's H×W: an explicit choice, never done silently."""
    if student.shape[-2:] == teacher.shape[-2:]:
        return student, teacher
    if mode == "student_to_teacher":
        return F.interpolate(student, size=teacher.shape[-2:], mode="bilinear", align_corners=False), teacher
    return student, F.interpolate(teacher, size=student.shape[-2:], mode="bilinear", align_corners=False)
