"""FGD against a float64 loop reference (box masks, attention-weighted foreground/background imitation,
attention and relation terms), zero at student = teacher, gradients to the student and its own modules only."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from cwd_lightning.losses import FocalGlobalDistillation
from cwd_lightning.losses.fgd import box_masks
from tests.helpers import random_maps

N, C, H, W = 2, 4, 5, 6
BOXES = [torch.tensor([[0.5, 1.2, 2.5, 3.0], [3.0, 0.0, 5.2, 1.5]]), torch.zeros(0, 4)]


def reference_masks(boxes, height, width):
    foreground = [[[0.0] * width for _ in range(height)] for _ in boxes]
    for image, image_boxes in enumerate(boxes):
        for x1, y1, x2, y2 in image_boxes.tolist():
            rows = range(math.floor(y1), min(math.ceil(y2), height - 1) + 1)
            columns = range(math.floor(x1), min(math.ceil(x2), width - 1) + 1)
            area = 1 / ((math.ceil(y2) + 1 - math.floor(y1)) * (math.ceil(x2) + 1 - math.floor(x1)))
            for y in rows:
                for x in columns:
                    foreground[image][y][x] = max(foreground[image][y][x], area)
    background = []
    for image in foreground:
        cells = [[1.0 if value == 0 else 0.0 for value in row] for row in image]
        total = sum(map(sum, cells))
        background.append([[value / total if total else value for value in row] for row in cells])
    return torch.tensor(foreground, dtype=torch.float64), torch.tensor(background, dtype=torch.float64)


def test_box_masks_follow_the_rows_and_columns_of_each_box():
    foreground, background = box_masks(BOXES, torch.Size((H, W)))
    expected_fg, expected_bg = reference_masks(BOXES, H, W)
    torch.testing.assert_close(foreground.double(), expected_fg)
    torch.testing.assert_close(background.double(), expected_bg)
    assert foreground[0, 2, 1] == pytest.approx(1 / (3 * 4)) and foreground[0, 4, 1] == 0  # rows 1..3, cols 0..3
    assert background[1].sum() == pytest.approx(1.0) and foreground[1].sum() == 0  # an image without boxes


def built(student_channels: int = C) -> FocalGlobalDistillation:
    torch.manual_seed(0)
    loss = FocalGlobalDistillation()
    loss.build(torch.Size((N, student_channels, H, W)), torch.Size((N, C, H, W)))
    for context in loss.context.values():  # away from the zero init, so the relation term counts
        torch.nn.init.normal_(context.transform[-1].weight, std=0.3)
    return loss


def reference_value(loss, student, teacher):
    reference = copy.deepcopy(loss).double()
    s, t = reference.align(student.double()), teacher.double()
    fg, bg = reference_masks(BOXES, H, W)

    def attention(maps):
        value = maps.abs()
        spatial = H * W * torch.softmax((value.mean(1) / 0.5).flatten(1), 1).view(N, H, W)
        return spatial, C * torch.softmax(value.mean((2, 3)) / 0.5, 1)

    (sp_t, ch_t), (sp_s, ch_s) = attention(t), attention(s)
    focal = 0.0
    for n in range(N):
        for c in range(C):
            for y in range(H):
                for x in range(W):
                    square = float((s[n, c, y, x] - t[n, c, y, x]) ** 2 * sp_t[n, y, x] * ch_t[n, c])
                    focal += 1e-3 * square * float(fg[n, y, x]) + 5e-4 * square * float(bg[n, y, x])
    attention_term = float((ch_s - ch_t).abs().sum() + (sp_s - sp_t).abs().sum())
    relation = float((reference.context["student"](s) - reference.context["teacher"](t)).pow(2).sum())
    return (focal + 1e-3 * attention_term + 5e-6 * relation) / N


@pytest.mark.parametrize("student_channels", [C, 3])
def test_value_matches_a_float64_reference(student_channels):
    loss = built(student_channels)
    student, teacher = random_maps(N, student_channels, H, W, seed=1), random_maps(N, C, H, W, seed=2, scale=2.0)
    value = loss(student, teacher, boxes=BOXES)
    assert value.item() == pytest.approx(reference_value(loss, student, teacher), rel=1e-5)


def test_zero_at_equality_and_gradients_to_the_student_and_its_own_modules():
    loss = FocalGlobalDistillation()
    loss.build(torch.Size((N, C, H, W)), torch.Size((N, C, H, W)))
    teacher = random_maps(N, C, H, W, seed=3)
    assert loss(teacher.clone(), teacher, boxes=BOXES).item() == pytest.approx(0.0, abs=1e-7)
    loss = built()
    student = random_maps(N, C, H, W, seed=4).requires_grad_(True)
    teacher.requires_grad_(True)
    loss(student, teacher, boxes=BOXES).backward()
    assert student.grad.abs().sum() > 0 and teacher.grad is None
    assert all(context.transform[-1].weight.grad.abs().sum() > 0 for context in loss.context.values())
    aligned = built(student_channels=3)  # fewer student channels: the align conv learns too
    student = random_maps(N, 3, H, W, seed=5).requires_grad_(True)
    aligned(student, teacher, boxes=BOXES).backward()
    assert student.grad.abs().sum() > 0 and teacher.grad is None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in aligned.align.parameters())


def test_bad_input_is_refused():
    loss = built()
    with pytest.raises(ValueError, match="1 images' boxes for a batch of 2"):
        loss(random_maps(N, C, H, W, seed=5), random_maps(N, C, H, W, seed=6), boxes=BOXES[:1])
    with pytest.raises(ValueError, match="temperature"):
        FocalGlobalDistillation(temperature=0)
