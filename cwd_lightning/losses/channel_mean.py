"""Channel-mean matching, the CWD ablation (Shu et al., "Channel-wise Knowledge Distillation for Dense
Prediction", ICCV 2021), as TD's ``CriterionCWD(norm_type='channel_mean', divergence='mse')``."""

from __future__ import annotations

from torch import Tensor

from cwd_lightning.losses.base import DistillationLoss
from cwd_lightning.losses.maps import check_maps, full_precision


class ChannelMeanMSE(DistillationLoss):
    """Squared difference of the spatial mean of each channel.

    μ(n,c) = mean over H·W of the map; L = Σ_{n,c} (μ_S − μ_T)² / (N·C). No temperature (the
    authors force τ = 1 on this path). Student and teacher need the same C (align the student with a
    connector first). Computed in fp32; the teacher side is detached.
    """

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        check_maps(type(self).__name__, student, teacher)
        with full_precision(student):
            mean_student = student.float().mean(dim=(2, 3))
            mean_teacher = teacher.detach().float().mean(dim=(2, 3))
            return (mean_student - mean_teacher).pow(2).mean()
