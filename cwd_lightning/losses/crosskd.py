"""CrossKD (Wang et al., "CrossKD: Cross-Head Knowledge Distillation for Object Detection", CVPR 2024), after the
official ``jbwang1997/CrossKD`` (``CrossKDRetinaNet``, ``CrossKDFCOS``): the student's head features, rescaled to
the teacher's per-channel statistics, run through the rest of the frozen teacher's head, and the teacher's own
predictions supervise these cross-head predictions (KD quality focal loss on the classes, GIoU on the boxes)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import generalized_box_iou_loss

from cwd_lightning.losses.base import DistillationLoss
from cwd_lightning.losses.maps import check_maps, full_precision

Branch = Literal["classification", "regression"]
BoxCoding = Literal["distances", "deltas"]

#: torchvision's and mmdet's clamp of the log-size deltas (``BoxCoder.bbox_xform_clip``)
DELTA_CLIP = math.log(1000.0 / 16)


def align_scale(student: Tensor, teacher: Tensor) -> Tensor:
    """The student's map with each channel standardised over N·H·W and given the teacher's channel mean and
    (unbiased) standard deviation, as the reference's ``align_scale``."""
    dims = (0, 2, 3)
    standardised = (student - student.mean(dims, keepdim=True)) / (student.std(dims, keepdim=True) + 1e-6)
    return standardised * teacher.std(dims, keepdim=True) + teacher.mean(dims, keepdim=True)


def unit_boxes(codes: Tensor, coding: BoxCoding) -> Tensor:
    """…×4 box codes decoded around a unit prior at the origin (x1, y1, x2, y2). Two boxes decoded from the same
    prior differ from these by one translation and one scaling per axis, which leave their GIoU unchanged: the
    GIoU of the real boxes needs no anchors. ``distances`` (FCOS): l, t, r, b ≥ 0 (ReLU, as the head applies);
    ``deltas`` (RetinaNet, weights 1): dx, dy, log w, log h."""
    if coding == "distances":
        left, top, right, bottom = F.relu(codes).unbind(-1)
        return torch.stack((-left, -top, right, bottom), -1)
    dx, dy, dw, dh = codes.unbind(-1)
    half_w, half_h = dw.clamp(max=DELTA_CLIP).exp() / 2, dh.clamp(max=DELTA_CLIP).exp() / 2
    return torch.stack((dx - half_w, dy - half_h, dx + half_w, dy + half_h), -1)


class CrossHeadKD(DistillationLoss):
    """One branch of CrossKD on one FPN level (a term per branch, ``calls: all`` over the levels).

    The pair is the student's and the teacher's head features where the cross-head starts (the reference's
    ``reused_teacher_head_idx`` 3: the output of the third conv block's norm, before its ReLU). ``teacher_modules``
    are the teacher's modules from there to its prediction conv (the ReLU, the last conv block, ``cls_logits`` or
    ``bbox_reg``); ``predictions`` is the teacher's prediction tensor at the same level (default: the last of
    ``teacher_modules``). With X = teacher_part(S aligned to T's channel statistics), P_T = the teacher's
    predictions and w = max_k σ(teacher class logit) per anchor:

    - ``classification``: Σ BCE(X, σ(P_T)) · |σ(X) − σ(P_T)|^β / D (KD quality focal loss, β 1);
    - ``regression``: Σ w · (1 − GIoU(box(X), box(P_T))) / D, the boxes decoded per ``box_coding`` with
      ``anchors`` priors per cell; w comes from ``scores``, the teacher's class logits at the level.

    D = max(Σ w, 1), the teacher's soft count of positive anchors on the level. Deviation from the reference:
    it divides both branches by the student assigner's positive count over all levels (RetinaNet) or its
    centerness sum (FCOS), and zeroes the anchors the assigner ignores; the engine has no assigner, so the count
    here is the teacher's and per level (each level normalised by itself). The teacher is frozen: its modules run
    without gradient into their weights, the gradient reaches the student's features through them.
    """

    def __init__(
        self,
        teacher_modules: list[str],
        predictions: str | None = None,
        branch: Branch = "classification",
        scores: str | None = None,
        box_coding: BoxCoding = "distances",
        anchors: int = 1,
        beta: float = 1.0,
        align: bool = True,
    ) -> None:
        super().__init__()
        if not teacher_modules:
            raise ValueError("CrossHeadKD: teacher_modules must name the teacher's head modules to run")
        if branch not in ("classification", "regression"):
            raise ValueError(f"CrossHeadKD: branch must be 'classification' or 'regression', got {branch!r}")
        if branch == "regression" and scores is None:
            raise ValueError("CrossHeadKD: the regression branch needs scores (the teacher's class-logit path)")
        if box_coding not in ("distances", "deltas"):
            raise ValueError(f"CrossHeadKD: box_coding must be 'distances' or 'deltas', got {box_coding!r}")
        if anchors < 1 or beta <= 0:
            raise ValueError("CrossHeadKD: anchors must be ≥ 1 and beta > 0")
        self.teacher_modules = tuple(teacher_modules)
        self.predictions = predictions or self.teacher_modules[-1]
        self.branch, self.scores, self.box_coding = branch, scores, box_coding
        self.anchors, self.beta, self.align = int(anchors), float(beta), bool(align)

    def teacher_inputs(self) -> dict[str, str]:
        return {"predictions": self.predictions, **({"scores": self.scores} if self.branch == "regression" else {})}

    def forward(
        self,
        student: Tensor,
        teacher: Tensor,
        teacher_part: Callable[[Tensor], Tensor],
        predictions: Tensor,
        scores: Tensor | None = None,
    ) -> Tensor:
        name = type(self).__name__
        check_maps(name, student, teacher)
        with full_precision(student):
            dtype = torch.promote_types(student.dtype, torch.float32)  # fp32 at least, float64 kept
            student, teacher = student.to(dtype), teacher.detach().to(dtype)
            cross = teacher_part(align_scale(student, teacher) if self.align else student).to(dtype)
            target = predictions.detach().to(dtype)
            if cross.shape != target.shape:
                raise ValueError(f"{name}: the teacher part gives {tuple(cross.shape)} but the teacher's predictions "
                                 f"{self.predictions!r} are {tuple(target.shape)}")  # fmt: skip
            logits = target if self.branch == "classification" else scores
            if logits is None or logits.shape[0] != cross.shape[0] or logits.shape[1] % self.anchors:
                raise ValueError(f"{name}: class logits of {self.anchors} anchor(s) per cell expected, got "
                                 f"{None if logits is None else tuple(logits.shape)}")  # fmt: skip
            weights = self.anchor_weights(logits.detach().to(dtype))  # N×A×H×W
            count = weights.sum().clamp_min(1.0)
            if self.branch == "classification":
                probabilities = target.sigmoid()
                focal = (cross.sigmoid() - probabilities).abs().pow(self.beta)
                bce = F.binary_cross_entropy_with_logits(cross, probabilities, reduction="none")
                return (bce * focal).sum() / count
            if cross.shape[1] != 4 * self.anchors:
                raise ValueError(f"{name}: box codes of {self.anchors} anchor(s) need {4 * self.anchors} channels, "
                                 f"got {cross.shape[1]}")  # fmt: skip
            boxes = [unit_boxes(self.per_anchor(codes, 4), self.box_coding) for codes in (cross, target)]
            giou = generalized_box_iou_loss(boxes[0].reshape(-1, 4), boxes[1].reshape(-1, 4), reduction="none")
            return (weights.reshape(-1) * giou).sum() / count

    def per_anchor(self, maps: Tensor, size: int) -> Tensor:
        """N×(A·size)×H×W → N×A×H×W×size (torchvision's layout: anchor-major channels)."""
        n, _, h, w = maps.shape
        return maps.view(n, self.anchors, size, h, w).permute(0, 1, 3, 4, 2)

    def anchor_weights(self, logits: Tensor) -> Tensor:
        """σ of the largest class logit of each anchor: N×A×H×W."""
        return self.per_anchor(logits, logits.shape[1] // self.anchors).amax(-1).sigmoid()

    def extra_repr(self) -> str:
        return (f"branch={self.branch!r}, teacher_modules={list(self.teacher_modules)}, "
                f"predictions={self.predictions!r}, anchors={self.anchors}, beta={self.beta}")  # fmt: skip
