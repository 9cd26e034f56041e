"""Intra-class feature variation distillation (Wang et al., "Intra-class Feature Variation
Distillation for Semantic Segmentation", ECCV 2020), after ``YukangWang/IFVD utils/criterion.py``
(``CriterionIFV``; copied verbatim in CIRKD ``losses/ifvd.py``), vectorised over classes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from cwd_lightning.losses.base import DistillationLoss
from cwd_lightning.losses.maps import check_labels, check_maps, full_precision

#: added to each class's pixel count before dividing, as in the reference
COUNT_EPSILON = 1e-6


class IntraClassFeatureVariation(DistillationLoss):
    """Squared difference of each pixel's cosine to its class centre.

    For image n and class k, the centre is μ_k = Σ_{y=k} f / (count_k + 1e-6), per image and per
    network; m(n,i) = cos_C(f(n,i), μ_{y(n,i)}) (eps 1e-8). L = mean over the valid (non-ignore)
    pixels of (m_S − m_T)², and 0 (with a gradient path through the student) when there are none.

    Deviation from the reference: it keeps ignore pixels in the denominator (their cosine is 1 for
    both networks), so its loss is diluted by the ignore fraction; here they are left out.

    Classes are 0..K−1 with K = ``num_classes`` if given, else the largest valid label + 1; any other
    label except ``ignore_index`` is an error (``ignore_index: None``: every pixel is labelled). Labels
    must already be at the maps' H×W (the engine nearest-resizes them). Student and teacher may have
    different C. One N×K×(H·W) one-hot matrix and ``bmm`` replace the reference's loop over classes.
    Computed in fp32; the teacher is detached.
    """

    def __init__(self, num_classes: int | None = None) -> None:
        super().__init__()
        if num_classes is not None and (int(num_classes) != num_classes or num_classes < 1):
            raise ValueError(f"IntraClassFeatureVariation: num_classes must be an integer >= 1, got {num_classes}")
        self.num_classes = None if num_classes is None else int(num_classes)

    def forward(
        self, student: Tensor, teacher: Tensor, labels: Tensor | None, ignore_index: int | None = 255
    ) -> Tensor:
        name = type(self).__name__
        check_maps(name, student, teacher, same_channels=False)
        labels = check_labels(name, labels, student).to(student.device)
        valid = labels != ignore_index if ignore_index is not None else torch.ones_like(labels, dtype=torch.bool)
        with full_precision(student):
            if not bool(valid.any()):
                return student.float().sum() * 0.0
            membership = self._membership(labels, valid)
            cosine_student = self.cosine_to_centre(student.float(), membership)
            cosine_teacher = self.cosine_to_centre(teacher.detach().float(), membership)
            valid = valid.flatten(1)
            return (cosine_student - cosine_teacher)[valid].pow(2).mean()

    def cosine_to_centre(self, maps: Tensor, membership: Tensor) -> Tensor:
        """N×(H·W) cosine between each pixel's C-vector and its class centre (0 at ignore pixels)."""
        features = maps.flatten(2).transpose(1, 2)  # N×HW×C
        counts = membership.sum(-1, keepdim=True)  # N×K×1
        centres = torch.bmm(membership, features) / (counts + COUNT_EPSILON)  # N×K×C
        centre_per_pixel = torch.bmm(membership.transpose(1, 2), centres)  # N×HW×C
        return F.cosine_similarity(features, centre_per_pixel, dim=-1, eps=1e-8)

    def _membership(self, labels: Tensor, valid: Tensor) -> Tensor:
        """N×K×(H·W) one-hot float matrix of the valid pixels; K as in the class docstring."""
        name = type(self).__name__
        valid_labels = labels[valid]
        num_classes = self.num_classes if self.num_classes is not None else int(valid_labels.max()) + 1
        bad = valid_labels[(valid_labels < 0) | (valid_labels >= num_classes)]
        if bad.numel():
            raise ValueError(
                f"{name}: label {int(bad[0])} is outside 0..{num_classes - 1} and is not ignore_index; "
                f"set num_classes or ignore_index to match the dataset"
            )
        safe = torch.where(valid, labels, torch.zeros_like(labels)).flatten(1)  # N×HW
        one_hot = F.one_hot(safe, num_classes).transpose(1, 2).float()  # N×K×HW
        return one_hot * valid.flatten(1).unsqueeze(1)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}"
