"""FitNets hint loss (Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015), as CIRKD's
``losses/fitnet.py`` uses it for segmentation: a 1×1 regressor owned by the loss, then MSE."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cwd_lightning.losses.base import DistillationLoss
from cwd_lightning.losses.maps import check_maps, full_precision


class FitNets(DistillationLoss):
    """L = mean over N·C_t·H·W of (W ⊛ S − T)², W a bias-free 1×1 conv C_s → C_t.

    The regressor is built from the probed shapes (``build``), trained with the student, saved in
    checkpoints and not exported. As in CIRKD it is applied even when C_s = C_t.
    """

    def __init__(self) -> None:
        super().__init__()
        self.regressor: nn.Conv2d | None = None

    def build(self, student_shape: torch.Size, teacher_shape: torch.Size) -> None:
        self.regressor = nn.Conv2d(student_shape[1], teacher_shape[1], kernel_size=1, bias=False)

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        check_maps(type(self).__name__, student, teacher, same_channels=False)
        if self.regressor is None:
            raise RuntimeError("FitNets: build(student_shape, teacher_shape) must run before the first call")
        if self.regressor.in_channels != student.shape[1] or self.regressor.out_channels != teacher.shape[1]:
            raise ValueError(
                f"FitNets: the regressor maps {self.regressor.in_channels} → {self.regressor.out_channels} channels, "
                f"got student {tuple(student.shape)} and teacher {tuple(teacher.shape)}"
            )
        with full_precision(student):
            return (self.regressor(student.float()) - teacher.detach().float()).pow(2).mean()
