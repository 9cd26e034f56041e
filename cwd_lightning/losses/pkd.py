"""PKD (Cao et al., "PKD: General Distillation Framework for Object Detectors via Pearson Correlation Coefficient",
NeurIPS 2022), in mmrazor's form (``mmrazor/models/losses/pkd_loss.py``)."""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor

from cwd_lightning.losses.base import DistillationLoss
from cwd_lightning.losses.maps import check_maps, full_precision

#: added to each channel's standard deviation before dividing, as in the reference
STD_EPSILON = 1e-6


class PKD(DistillationLoss):
    """Pearson correlation of per-channel standardised maps.

    Each channel is standardised over the batch and the positions (N·H·W values): x' = (x − mean) / (std + 1e-6)
    with the unbiased std. L = ½ · mean over N·C·H·W of (S' − T')², which equals 1 − r (r: the Pearson correlation
    of the two channels, averaged over channels) up to the (N·H·W − 1)/(N·H·W) of the unbiased std. The scale and
    offset of the teacher's features are not imitated, only their pattern, which is why PKD copes with teachers
    of another detector family. When the maps' H×W differ, ``resize`` says which side is bilinearly resized to
    the other (the reference's ``resize_stu``; it compares only the heights, here both sizes). Same C required
    (a term's ``connector`` projects the student). Computed in fp32; the teacher side is detached. A batch of a
    single 1×1 position has no variance to compare: refused.
    """

    def __init__(self, resize: Literal["student", "teacher"] = "student") -> None:
        super().__init__()
        if resize not in ("student", "teacher"):
            raise ValueError(f"PKD: resize must be 'student' or 'teacher', got {resize!r}")
        self.resize = resize

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        name = type(self).__name__
        if student.ndim == 4 and teacher.ndim == 4 and student.shape[-2:] != teacher.shape[-2:]:
            if self.resize == "student":
                student = F.interpolate(student, size=teacher.shape[-2:], mode="bilinear", align_corners=False)
            else:
                teacher = F.interpolate(teacher, size=student.shape[-2:], mode="bilinear", align_corners=False)
        check_maps(name, student, teacher)
        if student.shape[0] * student.shape[2] * student.shape[3] == 1:
            raise ValueError("one value per channel (a single 1×1 map) has no variance: PKD would divide 0 by 0")
        with full_precision(student):
            return 0.5 * (self.standardize(student.float()) - self.standardize(teacher.detach().float())).pow(2).mean()

    @staticmethod
    def standardize(maps: Tensor) -> Tensor:
        """Each channel of an N×C×H×W map to zero mean and unit (unbiased) std over its N·H·W values."""
        mean = maps.mean(dim=(0, 2, 3), keepdim=True)
        std = maps.std(dim=(0, 2, 3), keepdim=True)
        return (maps - mean) / (std + STD_EPSILON)

    def extra_repr(self) -> str:
        return f"resize={self.resize!r}"
