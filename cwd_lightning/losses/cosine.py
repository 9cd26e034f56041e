"""Per-location cosine distance between feature maps: the loss of today's foundation-model feature
distillation (a projector, the teacher's patch grid resized to the student's, 1 − cos at every location)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from cwd_lightning.losses.base import DistillationLoss
from cwd_lightning.losses.maps import check_maps, full_precision


class CosineDistance(DistillationLoss):
    """L = mean over N·H·W of (1 − cos_C(S(n,·,i), T(n,·,i))): the student's C-vector at each location should
    point where the teacher's does; its length is free (the teacher's scale is not imitated). cos divides by
    max(‖s‖, eps)·max(‖t‖, eps) (torch's ``cosine_similarity``), so an all-zero location counts as orthogonal,
    never NaN. Same C required (a term's
    ``connector`` projects the student, its ``resize`` matches the grids). Computed in fp32; the teacher side
    is detached."""

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        if eps <= 0:
            raise ValueError(f"CosineDistance: eps must be > 0, got {eps}")
        self.eps = float(eps)

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        check_maps(type(self).__name__, student, teacher)
        with full_precision(student):
            cosine = F.cosine_similarity(student.float(), teacher.detach().float(), dim=1, eps=self.eps)
            return (1 - cosine).mean()

    def extra_repr(self) -> str:
        return f"eps={self.eps}"
