"""Channel-wise distillation loss (Shu et al., "Channel-wise Knowledge Distillation for Dense
Prediction", ICCV 2021, Eq. 3-4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ChannelWiseDivergence(nn.Module):
    """KL(teacher ‖ student) between per-channel spatial distributions.

    Each channel of an N×C×H×W map becomes a distribution over its H·W positions,
    p = softmax(y / τ). The loss is τ²/(N·C) · Σ_{n,c} Σ_i p_T·(log p_T − log p_S): summed over
    positions, averaged over samples and channels (never over H·W), scaled by τ² so that the gradient
    size does not depend on τ. Computed in log space and fp32 even under autocast, so it is the true
    KL (zero when the maps agree) and never takes log 0. The teacher side is detached.
    """

    def __init__(self, tau: float = 1.0) -> None:
        super().__init__()
        if tau <= 0:
            raise ValueError(f"ChannelWiseDivergence: tau must be > 0, got {tau}")
        self.tau = float(tau)

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        if student.ndim != 4 or student.shape != teacher.shape:
            raise ValueError(
                "ChannelWiseDivergence expects two N×C×H×W tensors of the same shape, got "
                f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)}"
            )
        return self.kl_per_sample_channel(student, teacher).mean() * self.tau**2

    def kl_per_sample_channel(self, student: Tensor, teacher: Tensor) -> Tensor:
        """N×C matrix of KL(p_T ‖ p_S) over positions, unscaled; useful to inspect single channels."""
        with torch.autocast(device_type=student.device.type, enabled=False):
            log_p_student = F.log_softmax(student.float().flatten(2) / self.tau, dim=-1)
            log_p_teacher = F.log_softmax(teacher.detach().float().flatten(2) / self.tau, dim=-1)
            return (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)

    def extra_repr(self) -> str:
        return f"tau={self.tau}"
