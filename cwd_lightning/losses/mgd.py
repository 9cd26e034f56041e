"""Masked generative distillation (Yang et al., "Masked Generative Distillation", ECCV 2022), after
the official ``yzd-v/MGD seg/mmseg/distillation/losses/mgd.py``; its generator is the loss's own module."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cwd_lightning.losses.base import DistillationLoss
from cwd_lightning.losses.maps import align_conv, check_maps, full_precision, generator, masked


class MaskedGenerativeDistillation(DistillationLoss):
    """The student's map, randomly masked, must regenerate the teacher's.

    S' = align(S) (a 1×1 conv C_s → C_t with bias, only when the channel counts differ); a fresh mask
    M ∈ {0,1}^{N×1×H×W} per call with M = 0 at a position with probability ``mask_ratio`` (λ_mgd, 0.75
    in the reference segmentation configs); G = conv3×3 → ReLU → conv3×3 (C_t channels, no BN).
    L = Σ (G(S' ⊙ M) − T)² / N: summed over C·H·W, averaged over the batch, as the reference, hence its
    tiny weight α_mgd = 2e-5 (set it as the term's weight). The mask is drawn from torch's global RNG, so a
    seeded run (and an exact resume) repeats it; under DDP every rank holds the same RNG state (Lightning
    seeds them alike), so each draws ``world_size`` masks and keeps the one of its rank: the ranks mask
    different positions and their RNGs stay in step (the reference draws one mask per rank from the same
    state: all ranks mask alike). Align and generator are built from the probed shapes, trained with the
    student, saved in checkpoints and not exported.
    """

    def __init__(self, mask_ratio: float = 0.75) -> None:
        super().__init__()
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"MaskedGenerativeDistillation: mask_ratio must be in [0, 1), got {mask_ratio}")
        self.mask_ratio = float(mask_ratio)
        self.align: nn.Module | None = None
        self.channels: tuple[int, int] | None = None  # (student, teacher) channels it was built for
        self.generator: nn.Module | None = None

    def build(self, student_shape: torch.Size, teacher_shape: torch.Size) -> None:
        student_channels, channels = student_shape[1], teacher_shape[1]
        self.channels = (student_channels, channels)
        self.align = align_conv(student_channels, channels)
        self.generator = generator(channels)

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        check_maps(type(self).__name__, student, teacher, same_channels=False)
        if self.generator is None or self.align is None:
            raise RuntimeError("MaskedGenerativeDistillation: build() must run before the first call")
        with full_precision(student):
            if (student.shape[1], teacher.shape[1]) != self.channels:
                raise ValueError(
                    f"MaskedGenerativeDistillation: built for {self.channels[0]} → {self.channels[1]} channels, got "
                    f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)}"
                )
            generated = self.generator(masked(self.align(student.float()), self.mask_ratio))
            return (generated - teacher.detach().float()).pow(2).sum() / student.shape[0]

    def extra_repr(self) -> str:
        return f"mask_ratio={self.mask_ratio}"
