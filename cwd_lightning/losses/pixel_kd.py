"""Pixel-wise knowledge distillation (Liu et al., "Structured Knowledge Distillation for Semantic
Segmentation", CVPR 2019), in CIRKD's reduction (``winycg/CIRKD losses/kd.py``)."""

from __future__ import annotations

from torch import Tensor

from cwd_lightning.losses.base import DistillationLoss
from cwd_lightning.losses.cwd import ChannelWiseDivergence
from cwd_lightning.losses.maps import check_maps


class PixelWiseKD(DistillationLoss):
    """KL(teacher ‖ student) between the class distributions of each pixel.

    Each position of an N×C×H×W map becomes a distribution over its C channels, p = softmax(z / τ).
    The loss is τ²/(N·H·W) · Σ_{n,i} KL(p_T ‖ p_S): summed over channels, averaged over the N·H·W
    pixels, i.e. ``KLDivLoss(reduction="batchmean")`` on the (N·H·W)×C view (CIRKD's reduction; TD's
    ``KLDivLoss()`` is this divided by C and without τ², SKD's is a cross-entropy). It is exactly
    ``ChannelWiseDivergence(tau, normalize="spatial")`` and is computed by it: log space, fp32 even
    under autocast, teacher detached. Student and teacher need the same C. ``standardize``: logit
    standardisation of each pixel's C logits before τ (see ``ChannelWiseDivergence``).
    """

    def __init__(self, tau: float = 1.0, standardize: bool = False) -> None:
        super().__init__()
        if tau <= 0:
            raise ValueError(f"PixelWiseKD: tau must be > 0, got {tau}")
        self.tau = float(tau)
        self.standardize = bool(standardize)
        self.divergence = ChannelWiseDivergence(self.tau, "spatial", "kl", self.standardize)

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        check_maps(type(self).__name__, student, teacher)
        return self.divergence(student, teacher)

    def extra_repr(self) -> str:
        return f"tau={self.tau}, standardize={self.standardize}"
