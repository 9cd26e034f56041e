"""Pair-wise affinity distillation (Liu et al., "Structured Knowledge Distillation for Semantic
Segmentation", CVPR 2019), in CIRKD's form (``winycg/CIRKD losses/skd.py``, ``CriterionStructuralKD``)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from cwd_lightning.losses.base import DistillationLoss
from cwd_lightning.losses.maps import check_maps, full_precision


class PairwiseAffinity(DistillationLoss):
    """Squared difference of the cosine affinity between all pairs of (pooled) positions.

    The map is max-pooled with kernel = stride = ``pool_size`` (``ceil_mode=True``; 1 = no pooling),
    giving HW' nodes; each node's C-vector is L2-normalised (eps 1e-12, gradient through the norm), and
    A = FᵀF is the HW'×HW' cosine matrix of each sample. L = mean over N·HW'·HW' of (A_T − A_S)².
    CIRKD's fixed 2×2 pool is the default; SKD's β = 0.5 pooling instead leaves 2×2 nodes in all.
    A pool that leaves a single node (as large as the map) makes A = 1 for both networks: refused, as
    the loss would be identically 0. Memory is O((HW')²) per sample. Student and teacher may have
    different C. Computed in fp32; the teacher side is detached.
    """

    def __init__(self, pool_size: int = 2) -> None:
        super().__init__()
        if int(pool_size) != pool_size or pool_size < 1:
            raise ValueError(f"PairwiseAffinity: pool_size must be an integer >= 1, got {pool_size}")
        self.pool_size = int(pool_size)

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        check_maps(type(self).__name__, student, teacher, same_channels=False)
        nodes = math.ceil(student.shape[2] / self.pool_size) * math.ceil(student.shape[3] / self.pool_size)
        if nodes == 1:
            raise ValueError(f"a {self.pool_size}×{self.pool_size} pool leaves one node of the "
                             f"{student.shape[2]}×{student.shape[3]} map, whose affinity is 1 for any input: the "
                             "loss would be identically 0; use a smaller pool_size")  # fmt: skip
        with full_precision(student):
            affinity_student = self.affinity(student.float())
            affinity_teacher = self.affinity(teacher.detach().float())
            return (affinity_teacher - affinity_student).pow(2).mean()

    def affinity(self, maps: Tensor) -> Tensor:
        """N×HW'×HW' cosine affinity between the pooled positions of an N×C×H×W map."""
        if self.pool_size > 1:
            maps = F.max_pool2d(maps, kernel_size=self.pool_size, stride=self.pool_size, ceil_mode=True)
        nodes = F.normalize(maps.flatten(2), p=2.0, dim=1, eps=1e-12)  # N×C×HW'
        return torch.bmm(nodes.transpose(1, 2), nodes)

    def extra_repr(self) -> str:
        return f"pool_size={self.pool_size}"
