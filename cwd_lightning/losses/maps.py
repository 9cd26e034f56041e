"""What the loss files share: shape checks of the compared N×C×H×W maps and of the labels, fp32 computation
under mixed precision, random masks that differ between DDP ranks, and the align conv and generator that the
masked-generation losses (MGD, Af-DCD) and FGD build."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import Tensor, nn


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


def rank_mask(batch: int, size: torch.Size, device: torch.device) -> Tensor:
    """N×1×H×W uniform draws for this rank: every DDP rank holds the same RNG state (Lightning seeds them alike),
    so each draws one set per rank and keeps its own; the ranks' RNGs stay in step, and a single process draws
    exactly ``torch.rand(N, 1, H, W)``."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    return torch.rand(world, batch, 1, *size, device=device)[rank]


def masked(maps: Tensor, mask_ratio: float) -> Tensor:
    """``maps`` with each position of each sample zeroed with probability ``mask_ratio`` (``rank_mask``)."""
    return maps * (rank_mask(maps.shape[0], maps.shape[2:], maps.device) >= mask_ratio)


def align_conv(student_channels: int, channels: int) -> nn.Module:
    """A 1×1 conv with bias from the student's channels to the teacher's, or the identity when they agree."""
    return nn.Conv2d(student_channels, channels, 1) if student_channels != channels else nn.Identity()


def generator(channels: int) -> nn.Sequential:
    """conv3×3 → ReLU → conv3×3 at ``channels``, no normalisation: MGD's generator, Af-DCD's projector."""
    return nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True),
                         nn.Conv2d(channels, channels, 3, padding=1))  # fmt: skip
