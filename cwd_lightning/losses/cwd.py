"""Channel-wise distillation loss (Shu et al., "Channel-wise Knowledge Distillation for Dense
Prediction", ICCV 2021, Eq. 3-4), with the paper's ablation switches."""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor

from cwd_lightning.losses.base import DistillationLoss
from cwd_lightning.losses.maps import check_maps, full_precision

Normalize = Literal["channel", "spatial"]
Divergence = Literal["kl", "symmetric_kl", "mse"]
#: added to the std of logit standardisation, as in its authors' code
STANDARDIZE_EPSILON = 1e-7


class ChannelWiseDivergence(DistillationLoss):
    """KL(teacher ‖ student) between per-channel spatial distributions.

    Each channel of an N×C×H×W map becomes a distribution over its H·W positions,
    p = softmax(y / τ). The loss is τ²/(N·C) · Σ_{n,c} Σ_i p_T·(log p_T − log p_S): summed over
    positions, averaged over samples and channels (never over H·W), scaled by τ² so that the gradient
    size does not depend on τ. Computed in log space and fp32 even under autocast, so it is the true
    KL (zero when the maps agree) and never takes log 0. The teacher side is detached.

    Ablation switches (the authors' ``CriterionCWD``):
    - ``normalize="spatial"``: softmax over the C channels of each position instead; the mean is then
      over the N·H·W positions (with KL this is pixel-wise KD, CIRKD's reduction).
    - ``divergence="symmetric_kl"``: KL(T‖S) + KL(S‖T) (no reference implementation has it; this
      definition is ours). ``"mse"``: Σ (p_S − p_T)² per distribution, no τ² (the authors force τ = 1
      on this path; here τ still divides the logits). Its values are tiny (p ~ 1/(H·W)).
    - ``standardize=True``: logit standardisation (Sun et al., "Logit Standardization in Knowledge
      Distillation", CVPR 2024): each distribution's logits are z-scored, (y − mean) / (std + 1e-7) with the
      unbiased std over the softmax's axis, before they are divided by τ, so the student matches the
      teacher's pattern and not its logit scale.
    """

    def __init__(
        self,
        tau: float = 1.0,
        normalize: Normalize = "channel",
        divergence: Divergence = "kl",
        standardize: bool = False,
    ) -> None:
        super().__init__()
        if tau <= 0:
            raise ValueError(f"ChannelWiseDivergence: tau must be > 0, got {tau}")
        if normalize not in ("channel", "spatial"):
            raise ValueError(f"ChannelWiseDivergence: normalize must be 'channel' or 'spatial', got {normalize!r}")
        if divergence not in ("kl", "symmetric_kl", "mse"):
            raise ValueError(
                f"ChannelWiseDivergence: divergence must be 'kl', 'symmetric_kl' or 'mse', got {divergence!r}"
            )
        self.tau = float(tau)
        self.normalize = normalize
        self.divergence = divergence
        self.standardize = bool(standardize)

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        check_maps(type(self).__name__, student, teacher)
        normalised = student.shape[2] * student.shape[3] if self.normalize == "channel" else student.shape[1]
        if normalised == 1:  # a softmax over one element is 1 for any input: the loss would be 0, silently
            over = "1×1 map (positions)" if self.normalize == "channel" else "single channel"
            raise ValueError(
                f"a distribution over a {over} is constant, so this divergence is identically 0; "
                "compare maps with more positions (larger images, or leave out the coarsest levels)"
            )
        value = self.divergence_per_distribution(student, teacher).mean()
        return value if self.divergence == "mse" else value * self.tau**2

    def divergence_per_distribution(self, student: Tensor, teacher: Tensor) -> Tensor:
        """Unscaled divergence of every normalised distribution: N×C (channel) or N×(H·W) (spatial)."""
        with full_precision(student):
            log_p_student = self._log_distributions(student.float())
            log_p_teacher = self._log_distributions(teacher.detach().float())
            p_teacher = log_p_teacher.exp()
            if self.divergence == "mse":
                return (log_p_student.exp() - p_teacher).pow(2).sum(-1)
            forward_kl = (p_teacher * (log_p_teacher - log_p_student)).sum(-1)
            if self.divergence == "kl":
                return forward_kl
            return forward_kl + (log_p_student.exp() * (log_p_student - log_p_teacher)).sum(-1)

    def kl_per_sample_channel(self, student: Tensor, teacher: Tensor) -> Tensor:
        """N×C matrix of KL(p_T ‖ p_S) over the positions of each channel at this τ, unscaled (whatever
        the switches); useful to inspect single channels."""
        check_maps(type(self).__name__, student, teacher)
        return ChannelWiseDivergence(self.tau).divergence_per_distribution(student, teacher)

    def _log_distributions(self, maps: Tensor) -> Tensor:
        flat = maps.flatten(2)  # N×C×HW
        if self.normalize == "spatial":
            flat = flat.transpose(1, 2)  # N×HW×C: one distribution over channels per position
        if self.standardize:
            flat = (flat - flat.mean(-1, keepdim=True)) / (flat.std(-1, keepdim=True) + STANDARDIZE_EPSILON)
        return F.log_softmax(flat / self.tau, dim=-1)

    def extra_repr(self) -> str:
        return (
            f"tau={self.tau}, normalize={self.normalize!r}, divergence={self.divergence!r}, "
            f"standardize={self.standardize}"
        )
