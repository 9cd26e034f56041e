"""CrossKD's cross-head loss against a float64 loop reference (scale alignment, KD quality focal loss, GIoU of the
decoded boxes weighted by the teacher's scores), zero at student = teacher, the GIoU invariance that lets it skip
the anchors, gradients to the student only, clear errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cwd_lightning.losses import CrossHeadKD
from cwd_lightning.losses.crosskd import align_scale, unit_boxes
from tests.helpers import random_maps

N, C, H, W, A, K = 2, 4, 3, 2, 2, 3  # 2 anchors per cell, 3 classes


def maps(seed: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded (student, teacher) pair of N×C×H×W maps."""
    return random_maps(2, N, C, H, W, seed=seed).to(dtype).unbind(0)


def head(out_channels: int) -> nn.Module:
    """The rest of a teacher head: ReLU, a 3×3 conv, the prediction conv; frozen."""
    torch.manual_seed(1)
    part = nn.Sequential(nn.ReLU(), nn.Conv2d(C, C, 3, padding=1), nn.ReLU(), nn.Conv2d(C, out_channels, 1))
    return part.requires_grad_(False).eval()


def loss_for(branch: str = "classification", **kwargs) -> CrossHeadKD:
    return CrossHeadKD(["rest"], branch=branch, anchors=A, scores="logits" if branch == "regression" else None,
                       **kwargs)  # fmt: skip


def reference_align(student, teacher):
    out = torch.empty_like(student)
    for c in range(student.shape[1]):
        s, t = student[:, c].flatten(), teacher[:, c].flatten()
        out[:, c] = ((student[:, c] - s.mean()) / (s.std() + 1e-6)) * t.std() + t.mean()
    return out


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def reference_qfl(cross, target, logits):
    total, count = 0.0, 0.0
    for n in range(N):
        for a in range(A):
            for y in range(H):
                for x in range(W):
                    count += max(sigmoid(float(logits[n, a * K + k, y, x])) for k in range(K))
                    for k in range(K):
                        z, p = float(cross[n, a * K + k, y, x]), sigmoid(float(target[n, a * K + k, y, x]))
                        bce = -(p * math.log(sigmoid(z)) + (1 - p) * math.log(1 - sigmoid(z)))
                        total += bce * abs(sigmoid(z) - p)
    return total / max(count, 1.0)


def decode(codes, coding):
    if coding == "distances":
        left, top, right, bottom = (max(v, 0.0) for v in codes)
        return -left, -top, right, bottom
    dx, dy, dw, dh = codes
    w, h = math.exp(min(dw, math.log(1000 / 16))), math.exp(min(dh, math.log(1000 / 16)))
    return dx - w / 2, dy - h / 2, dx + w / 2, dy + h / 2


def giou(a, b):
    area = lambda box: (box[2] - box[0]) * (box[3] - box[1])  # noqa: E731
    inter = max(min(a[2], b[2]) - max(a[0], b[0]), 0) * max(min(a[3], b[3]) - max(a[1], b[1]), 0)
    union = area(a) + area(b) - inter
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return inter / union - (hull - union) / hull


def reference_giou_loss(cross, target, logits, coding):
    total, count = 0.0, 0.0
    for n in range(N):
        for a in range(A):
            for y in range(H):
                for x in range(W):
                    weight = max(sigmoid(float(logits[n, a * K + k, y, x])) for k in range(K))
                    boxes = [decode([float(m[n, a * 4 + i, y, x]) for i in range(4)], coding) for m in (cross, target)]
                    total += weight * (1 - giou(*boxes))
                    count += weight
    return total / max(count, 1.0)


def test_the_classification_branch_equals_the_loop_reference():
    part = head(A * K).double()
    student, teacher = (2 * m for m in maps(0, torch.float64))
    target = part(teacher)
    value = loss_for()(student, teacher, part, target)
    cross = part(reference_align(student, teacher))
    assert value.item() == pytest.approx(reference_qfl(cross, target, target), rel=1e-5)
    torch.testing.assert_close(align_scale(student, teacher), reference_align(student, teacher))


@pytest.mark.parametrize("coding", ["distances", "deltas"])
def test_the_regression_branch_equals_the_loop_reference(coding):
    part = head(A * 4).double()
    student, teacher = maps(2, torch.float64)
    target = part(teacher) + 0.5  # most distances > 0
    logits = torch.randn(N, A * K, H, W, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    value = loss_for("regression", box_coding=coding)(student, teacher, lambda x: part(x) + 0.5, target, logits)
    cross = part(reference_align(student, teacher)) + 0.5
    assert value.item() == pytest.approx(reference_giou_loss(cross, target, logits, coding), rel=1e-6)


def test_the_giou_of_boxes_from_one_prior_does_not_depend_on_the_prior():
    """Why no anchors are needed: decode two codes on a real anchor (torchvision's coders) and on the unit prior."""
    from torchvision.models.detection._utils import BoxCoder, BoxLinearCoder
    from torchvision.ops import generalized_box_iou

    codes = torch.tensor([[0.3, 0.2, 0.4, 0.1], [1.2, 0.7, 0.2, 0.9]], dtype=torch.float64)  # distances ≥ 0
    anchor = torch.tensor([[10.0, 4.0, 42.0, 20.0]], dtype=torch.float64).expand(2, 4)
    expected = {
        "deltas": generalized_box_iou(*BoxCoder((1.0, 1.0, 1.0, 1.0)).decode_single(codes, anchor).split(1)),
        "distances": generalized_box_iou(*BoxLinearCoder(True).decode(codes, anchor).split(1)),
    }
    for coding, real in expected.items():
        unit = unit_boxes(codes, coding)
        torch.testing.assert_close(generalized_box_iou(unit[:1], unit[1:]), real)


@pytest.mark.parametrize("branch", ["classification", "regression"])
def test_zero_at_student_equal_teacher_without_alignment_and_close_to_it_with(branch):
    part = head(A * (K if branch == "classification" else 4))
    teacher = maps(4)[1]
    target = part(teacher) + (0.5 if branch == "regression" else 0.0)
    run = (lambda x: part(x) + 0.5) if branch == "regression" else part
    logits = torch.randn(N, A * K, H, W)
    extra = {"scores": logits} if branch == "regression" else {}
    assert loss_for(branch, align=False)(teacher, teacher, run, target, **extra).item() == pytest.approx(0, abs=1e-6)
    assert loss_for(branch)(teacher, teacher, run, target, **extra).item() == pytest.approx(0, abs=1e-4)
    student = teacher + torch.randn_like(teacher)
    assert loss_for(branch, align=False)(student, teacher, run, target, **extra).item() > 1e-3


def test_the_gradient_reaches_the_student_and_not_the_teacher_part():
    part = head(A * K)
    student, teacher = maps(5)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    loss_for()(student, teacher, part, part(teacher.detach())).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None and all(p.grad is None for p in part.parameters())


def test_bad_declarations_and_shapes_are_refused_naming_what_is_wrong():
    with pytest.raises(ValueError, match="teacher_modules must name"):
        CrossHeadKD([])
    with pytest.raises(ValueError, match="regression branch needs scores"):
        CrossHeadKD(["rest"], branch="regression")
    with pytest.raises(ValueError, match="box_coding"):
        CrossHeadKD(["rest"], box_coding="corners")
    assert CrossHeadKD(["a", "b"]).teacher_inputs() == {"predictions": "b"}
    assert loss_for("regression").teacher_inputs() == {"predictions": "rest", "scores": "logits"}
    student, teacher = maps(6)
    part = head(A * K)
    with pytest.raises(ValueError, match="the teacher part gives"):
        loss_for()(student, teacher, part, torch.zeros(N, A * K + 1, H, W))
    with pytest.raises(ValueError, match="box codes of 2 anchor"):
        loss_for("regression")(student, teacher, part, part(teacher), torch.zeros(N, A * K, H, W))
