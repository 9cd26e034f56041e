"""Af-DCD (Fan et al., "Augmentation-free Dense Contrastive Knowledge Distillation for Efficient Semantic
Segmentation", NeurIPS 2023), after the official ``OSVAI/Af-DCD losses/ocmgd.py``
(``OmniContrastiveFeatureLoss``): masked feature generation plus an omni-contrastive term; its align conv and
projector are the loss's own modules."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cwd_lightning.losses.base import DistillationLoss
from cwd_lightning.losses.maps import align_conv, check_maps, full_precision, generator, masked


class AfDCD(DistillationLoss):
    """L = ``feature_weight`` · L_fd + ``contrast_weight`` · L_ctr (the reference's λ_fd 2e-6 and λ_ctr 5e-3 as
    defaults; set the term's weight to 1).

    S' = P(align(S) ⊙ M): align is a 1×1 conv with bias (only when the channel counts differ), M ∈ {0,1}^{N×1×H×W}
    drops each position with probability ``mask_ratio`` (0.75; a fresh mask per call, a different one per DDP
    rank), P = conv3×3 → ReLU → conv3×3. L_fd = Σ (S' − T)² / N. L_ctr: S' and T are max-pooled by
    ``pool_size`` (4; 1 = none), cut into ``patch`` × ``patch`` patches (4×4) and their C channels into
    ``groups`` groups (16); inside each patch every (position, group) of S' is a C/groups-vector whose positive
    is the same (position, group) of T and whose negatives are every position of the patch in another group;
    similarity = −L1 distance, an InfoNCE with temperature ``tau`` (0.07): L_ctr = Σ over the (position, group)
    anchors of CE / (N·H'·W') on the pooled H'×W', i.e. ``groups`` times the mean CE, as the reference reduces
    it. The pooled map's sides must be multiples of ``patch`` and C of ``groups``. Computed in fp32; the
    teacher side is detached.
    """

    def __init__(
        self,
        feature_weight: float = 2e-6,
        contrast_weight: float = 5e-3,
        mask_ratio: float = 0.75,
        tau: float = 0.07,
        groups: int = 16,
        pool_size: int = 4,
        patch: int = 4,
    ) -> None:
        super().__init__()
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"AfDCD: mask_ratio must be in [0, 1), got {mask_ratio}")
        if tau <= 0 or groups < 1 or pool_size < 1 or patch < 1:
            raise ValueError("AfDCD: tau must be > 0 and groups, pool_size, patch ≥ 1")
        self.feature_weight, self.contrast_weight = float(feature_weight), float(contrast_weight)
        self.mask_ratio, self.tau = float(mask_ratio), float(tau)
        self.groups, self.pool_size, self.patch = int(groups), int(pool_size), int(patch)
        self.align: nn.Module | None = None
        self.projector: nn.Module | None = None

    def build(self, student_shape: torch.Size, teacher_shape: torch.Size) -> None:
        student_channels, channels = student_shape[1], teacher_shape[1]
        if channels % self.groups:
            raise ValueError(f"AfDCD: the teacher's {channels} channels do not split into {self.groups} groups")
        pooled = [size // self.pool_size for size in teacher_shape[-2:]]
        if any(size < self.patch or size % self.patch for size in pooled):
            raise ValueError(f"AfDCD: the {tuple(teacher_shape[-2:])} map pooled by {self.pool_size} gives "
                             f"{tuple(pooled)}, not a multiple of the {self.patch}×{self.patch} patches")  # fmt: skip
        self.align = align_conv(student_channels, channels)
        self.projector = generator(channels)

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        check_maps(type(self).__name__, student, teacher, same_channels=False)
        if self.projector is None or self.align is None:
            raise RuntimeError("AfDCD: build() must run before the first call")
        with full_precision(student):
            teacher = teacher.detach().float()
            generated = self.projector(masked(self.align(student.float()), self.mask_ratio))
            batch = student.shape[0]
            feature = (generated - teacher).pow(2).sum() / batch
            return self.feature_weight * feature + self.contrast_weight * self.contrast(generated, teacher)

    def contrast(self, generated: Tensor, teacher: Tensor) -> Tensor:
        """The omni-contrastive term of two N×C×H×W maps (see the class docstring)."""
        if self.pool_size > 1:
            generated, teacher = F.max_pool2d(generated, self.pool_size), F.max_pool2d(teacher, self.pool_size)
        batch, _, height, width = generated.shape
        anchors, targets = self._vectors(generated), self._vectors(teacher)  # P×(K·G)×(C/G)
        similarity = -torch.cdist(anchors, targets, p=1) / self.tau  # P×(K·G)×(K·G)
        group = torch.arange(anchors.shape[1], device=anchors.device) % self.groups
        other_group = group[:, None] != group[None, :]
        positives = similarity.diagonal(dim1=1, dim2=2).unsqueeze(-1)  # P×(K·G)×1
        negatives = similarity.masked_fill(~other_group, float("-inf"))  # the same group: not a negative
        logits = torch.cat([positives, negatives], dim=-1)
        cross_entropy = torch.logsumexp(logits, dim=-1) - positives.squeeze(-1)
        return cross_entropy.sum() / (batch * height * width)

    def _vectors(self, maps: Tensor) -> Tensor:
        """(N·patches)×(K·G)×(C/G): per patch, one vector per (position k in the patch, channel group g), k-major."""
        n, c, h, w = maps.shape
        p, g = self.patch, self.groups
        x = maps.reshape(n, g, c // g, h // p, p, w // p, p)  # n, g, c/g, hp, p, wp, p
        x = x.permute(0, 3, 5, 4, 6, 1, 2)  # n, hp, wp, p, p, g, c/g
        return x.reshape(n * (h // p) * (w // p), p * p * g, c // g)

    def extra_repr(self) -> str:
        return (f"feature_weight={self.feature_weight}, contrast_weight={self.contrast_weight}, "
                f"mask_ratio={self.mask_ratio}, tau={self.tau}, groups={self.groups}")  # fmt: skip
