"""Attention transfer (Zagoruyko and Komodakis, "Paying More Attention to Attention", ICLR 2017), in
the authors' code form as used by CIRKD (``losses/at.py``) and mmrazor (``losses/at_loss.py``)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from cwd_lightning.losses.base import DistillationLoss
from cwd_lightning.losses.maps import check_maps, full_precision


class AttentionTransfer(DistillationLoss):
    """Squared difference of the normalised spatial attention maps.

    a(F) = vec(mean_c |F|^p) / max(‖vec(mean_c |F|^p)‖₂, 1e-12): one unit vector of length H·W per
    sample. The loss is the mean over N·H·W of (a_S − a_T)² (the code form; the paper's form is the
    unsquared norm of the difference averaged over N). |F| makes odd p well defined; for p = 2 it is
    F². p < 1 is refused: the gradient of |F|^p is infinite at an exact zero, which ReLU features are, and
    turns into NaN. The channel axis is pooled, so student and teacher may have different C. Each a has unit
    norm, so the value is O(1/(H·W)) and the reference weights are about 1e4. Computed in fp32; the
    teacher side is detached.
    """

    def __init__(self, p: float = 2.0) -> None:
        super().__init__()
        if p < 1:
            raise ValueError(f"AttentionTransfer: p must be ≥ 1 (the gradient of |F|^p is infinite at F = 0 for "
                             f"p < 1, and ReLU features are often exactly 0), got {p}")  # fmt: skip
        self.p = float(p)

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        check_maps(type(self).__name__, student, teacher, same_channels=False)
        with full_precision(student):
            attention_student = self.attention(student.float())
            attention_teacher = self.attention(teacher.detach().float())
            return (attention_student - attention_teacher).pow(2).mean()

    def attention(self, maps: Tensor) -> Tensor:
        """N×(H·W) unit-norm attention vectors of an N×C×H×W map."""
        return F.normalize(maps.abs().pow(self.p).mean(1).flatten(1), p=2.0, dim=1, eps=1e-12)

    def extra_repr(self) -> str:
        return f"p={self.p}"
