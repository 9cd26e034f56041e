"""What the loss files share: shape checks of the compared N×C×H×W maps and of the labels, and fp32
computation under mixed precision."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor


@contextmanager
def full_precision(tensor: Tensor) -> Iterator[None]:
    """No autocast inside: losses are computed in fp32 even in a mixed-precision run."""
    with torch.autocast(device_type=tensor.device.type, enabled=False):
        yield


def check_maps(name: str, student: Tensor, teacher: Tensor, *, same_channels: bool = True) -> None:
    """Both N×C×H×W with the same N, H, W (and C unless the loss compares across channel counts)."""
    axes = (0, 1, 2, 3) if same_channels else (0, 2, 3)
    if student.ndim != 4 or teacher.ndim != 4 or any(student.shape[a] != teacher.shape[a] for a in axes):
        what = "N×C×H×W tensors of the same shape" if same_channels else "N×C×H×W tensors with the same N, H, W"
        raise ValueError(
            f"{name} expects two {what}, got student {tuple(student.shape)} and teacher {tuple(teacher.shape)}"
        )


def check_labels(name: str, labels: Tensor | None, student: Tensor) -> Tensor:
    """Labels present and N×H×W matching the compared maps."""
    if labels is None:
        raise ValueError(f"{name} needs ground-truth labels; the task gave none (a segmentation task does)")
    if labels.shape != (student.shape[0], *student.shape[2:]):
        raise ValueError(
            f"{name}: labels {tuple(labels.shape)} do not match the maps' N×H×W "
            f"{(student.shape[0], *student.shape[2:])}"
        )
    return labels.long()
