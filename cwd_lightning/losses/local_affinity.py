"""Local affinity over the 8-neighbourhood ("LOCAL" in Shu et al., ICCV 2021, Table 2). The CWD
authors released no code for it; this follows SKD's ``cvpr_19`` branch (``utils/criterion.py``,
``CriterionLSCos`` and ``CriterionLS``), with an epsilon the cosine form lacks there."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from cwd_lightning.losses.base import DistillationLoss
from cwd_lightning.losses.maps import check_maps, full_precision

Similarity = Literal["cosine", "l2"]

#: the (row, column) offsets of the 8 neighbours
NEIGHBOUR_OFFSETS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


class LocalAffinity(DistillationLoss):
    """Squared difference of each pixel's similarity to its 8 neighbours.

    Only interior pixels count (no padding: an (H−2)×(W−2) grid per image). With f_i the C-vector at
    pixel i and j ∈ N8(i):
    - ``"cosine"``: eight maps s_d(i) = f_i·f_j / max(‖f_i‖‖f_j‖, eps) (``CriterionLSCos``; never NaN
      for an all-zero pixel); L = mean over N·8·(H−2)·(W−2) of (s_S − s_T)².
    - ``"l2"``: one map m(i) = Σ_{j∈N8(i)} ‖f_i − f_j‖₂² (``CriterionLS``); L = mean over N·(H−2)·(W−2)
      of (m_S − m_T)². Not scale-invariant: normalise or align the features first.
    Student and teacher may have different C. Computed in fp32; the teacher side is detached.
    """

    def __init__(self, similarity: Similarity = "cosine", eps: float = 1e-8) -> None:
        super().__init__()
        if similarity not in ("cosine", "l2"):
            raise ValueError(f"LocalAffinity: similarity must be 'cosine' or 'l2', got {similarity!r}")
        if eps <= 0:
            raise ValueError(f"LocalAffinity: eps must be > 0, got {eps}")
        self.similarity = similarity
        self.eps = float(eps)

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        name = type(self).__name__
        check_maps(name, student, teacher, same_channels=False)
        if student.shape[2] < 3 or student.shape[3] < 3:
            raise ValueError(f"{name} needs maps of at least 3×3 (an 8-neighbourhood), got {tuple(student.shape)}")
        with full_precision(student):
            affinity_student = self.affinity(student.float())
            affinity_teacher = self.affinity(teacher.detach().float())
            return (affinity_student - affinity_teacher).pow(2).mean()

    def affinity(self, maps: Tensor) -> Tensor:
        """N×8×(H−2)×(W−2) cosines, or the N×(H−2)×(W−2) summed squared distances, of an N×C×H×W map."""
        height, width = maps.shape[2:]
        centre = maps[:, :, 1 : height - 1, 1 : width - 1]
        neighbours = [maps[:, :, 1 + dy : height - 1 + dy, 1 + dx : width - 1 + dx] for dy, dx in NEIGHBOUR_OFFSETS]
        if self.similarity == "l2":
            return torch.stack([(centre - neighbour).pow(2).sum(1) for neighbour in neighbours]).sum(0)
        centre_norm = centre.norm(dim=1)
        cosines = [
            (centre * neighbour).sum(1) / (centre_norm * neighbour.norm(dim=1)).clamp_min(self.eps)
            for neighbour in neighbours
        ]
        return torch.stack(cosines, dim=1)

    def extra_repr(self) -> str:
        return f"similarity={self.similarity!r}, eps={self.eps}"
