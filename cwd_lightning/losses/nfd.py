"""Normalized feature distillation (Liu, Yang and Chen, "Normalized Feature Distillation for Semantic
Segmentation", arXiv 2207.05256, 2022). The paper's formula could not be read and no official code
exists: the definition below is ours."""

from __future__ import annotations

import math
from typing import Literal

from torch import Tensor

from cwd_lightning.losses.base import DistillationLoss
from cwd_lightning.losses.maps import check_maps, full_precision

Axis = Literal["spatial", "channel", "layer"]

#: the dimensions of an N×C×H×W map each normalisation axis standardises over
AXIS_DIMS = {"spatial": (2, 3), "channel": (1,), "layer": (1, 2, 3)}


class NormalizedFeatureDistillation(DistillationLoss):
    """Mean squared difference of the standardised maps (our definition; the paper's is unverified).

    Each map is standardised, x' = (x − mean) / sqrt(var + eps) with the biased variance, over
    ``axis``: ``"spatial"`` = per (n,c) over H·W (the only community implementation's choice, which
    uses the unbiased std, no eps and an unsquared Frobenius norm over H·W instead), ``"channel"`` =
    per (n,h,w) over C, ``"layer"`` = per n over C·H·W. L = mean over N·C·H·W of (S' − T')². The
    normalisation removes the teacher's magnitude, which is the paper's stated point; eps keeps a
    constant (dead) channel finite. A map with a single value per standardised group (a 1×1 map on the
    spatial axis, C = 1 on the channel axis) standardises to 0 whatever it holds, so the loss would be 0:
    it is refused. Same C required. Computed in fp32; the teacher side is detached.
    """

    def __init__(self, axis: Axis = "spatial", eps: float = 1e-5) -> None:
        super().__init__()
        if axis not in AXIS_DIMS:
            raise ValueError(f"NormalizedFeatureDistillation: axis must be one of {list(AXIS_DIMS)}, got {axis!r}")
        if eps <= 0:
            raise ValueError(f"NormalizedFeatureDistillation: eps must be > 0, got {eps}")
        self.axis = axis
        self.eps = float(eps)

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        check_maps(type(self).__name__, student, teacher)
        if math.prod(student.shape[d] for d in AXIS_DIMS[self.axis]) == 1:
            over = {"spatial": "1×1 map", "channel": "single channel", "layer": "single value"}[self.axis]
            raise ValueError(f"standardising a {over} over the {self.axis} axis gives 0 whatever it holds, so the "
                             "loss is identically 0; choose another axis or compare larger maps")  # fmt: skip
        with full_precision(student):
            standard_student = self.standardize(student.float())
            standard_teacher = self.standardize(teacher.detach().float())
            return (standard_student - standard_teacher).pow(2).mean()

    def standardize(self, maps: Tensor) -> Tensor:
        """(x − mean) / sqrt(var + eps) over the axis' dimensions, biased variance."""
        dims = AXIS_DIMS[self.axis]
        mean = maps.mean(dim=dims, keepdim=True)
        variance = maps.var(dim=dims, keepdim=True, correction=0)
        return (maps - mean) / (variance + self.eps).sqrt()

    def extra_repr(self) -> str:
        return f"axis={self.axis!r}, eps={self.eps}"
