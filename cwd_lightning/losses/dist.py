"""DIST: inter- and intra-class Pearson correlation (Huang et al., "Knowledge Distillation from A
Stronger Teacher", NeurIPS 2022), in the authors' segmentation form (``hunto/DIST_KD
segmentation/losses/dist_kd.py``) with mmrazor's and torchdistill's τ."""

from __future__ import annotations

import torch
from torch import Tensor

from cwd_lightning.losses.base import DistillationLoss
from cwd_lightning.losses.maps import check_maps, full_precision

#: added to the product of norms in the cosine, as in the reference
COSINE_EPSILON = 1e-8


def pearson_correlation(a: Tensor, b: Tensor, dim: int) -> Tensor:
    """Pearson correlation along ``dim``: the cosine a·b / (‖a‖‖b‖ + 1e-8) of the mean-centred vectors."""
    a = a - a.mean(dim, keepdim=True)
    b = b - b.mean(dim, keepdim=True)
    return (a * b).sum(dim) / (a.norm(dim=dim) * b.norm(dim=dim) + COSINE_EPSILON)


class DIST(DistillationLoss):
    """τ² · (β · inter + γ · intra) on the per-pixel class distributions.

    The N×C×H×W logits become (N·H·W)×C rows, one per pixel, y = softmax over C of z/τ.
    inter = 1 − mean over the N·H·W rows of pearson over C (y_S row, y_T row); intra = 1 − mean over
    the C columns of pearson over the N·H·W pixels (y_S column, y_T column). The τ² is mmrazor's and
    torchdistill's; DIST_KD's segmentation code has no τ, which is the default τ = 1.

    mmrazor and torchdistill do not reshape 4-D maps, so their intra term correlates over the batch
    axis at each (c,h,w): wrong for dense maps, non-zero for student = teacher (docs/methods.md, DIST). We
    reshape as DIST_KD does. The value is ≈ 0 (not exactly, because of the epsilon) when the maps
    agree; a constant row or column correlates as 0. Same C required. Computed in fp32 over the local
    batch (no all-gather, as in the reference); the teacher side is detached.
    """

    def __init__(self, beta: float = 1.0, gamma: float = 1.0, tau: float = 1.0) -> None:
        super().__init__()
        if tau <= 0:
            raise ValueError(f"DIST: tau must be > 0, got {tau}")
        if beta < 0 or gamma < 0:
            raise ValueError(f"DIST: beta and gamma must be >= 0, got beta={beta}, gamma={gamma}")
        self.beta = float(beta)
        self.gamma = float(gamma)
        self.tau = float(tau)

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        check_maps(type(self).__name__, student, teacher)
        with full_precision(student):
            probabilities_student = self.pixel_probabilities(student.float())
            probabilities_teacher = self.pixel_probabilities(teacher.detach().float())
            inter = 1 - pearson_correlation(probabilities_student, probabilities_teacher, dim=1).mean()
            intra = 1 - pearson_correlation(probabilities_student, probabilities_teacher, dim=0).mean()
            return self.tau**2 * (self.beta * inter + self.gamma * intra)

    def pixel_probabilities(self, maps: Tensor) -> Tensor:
        """(N·H·W)×C softmax over the channels of each pixel, at temperature τ."""
        rows = maps.permute(0, 2, 3, 1).reshape(-1, maps.shape[1])
        return torch.softmax(rows / self.tau, dim=1)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, gamma={self.gamma}, tau={self.tau}"
