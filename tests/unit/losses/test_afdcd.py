"""Af-DCD against a float64 loop reference: the masked feature generation and the omni-contrastive term (each
(position, channel group) of a patch against the same of the teacher, negatives in the other groups), built
from the shapes, gradients to the student and its own modules only, clear errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from cwd_lightning.losses import AfDCD
from tests.helpers import random_maps


def built(student_channels=3, channels=8, size=8, **kwargs) -> AfDCD:
    torch.manual_seed(0)
    loss = AfDCD(**{"groups": 4, "pool_size": 2, "patch": 2, **kwargs})
    loss.build(torch.Size((2, student_channels, size, size)), torch.Size((2, channels, size, size)))
    return loss


def reference_contrast(generated, teacher, groups: int, pool: int, patch: int, tau: float) -> float:
    generated = torch.nn.functional.max_pool2d(generated.double(), pool) if pool > 1 else generated.double()
    teacher = torch.nn.functional.max_pool2d(teacher.double(), pool) if pool > 1 else teacher.double()
    n, c, h, w = generated.shape
    width = c // groups
    total = 0.0
    for image in range(n):
        for top in range(0, h, patch):
            for left in range(0, w, patch):
                cells = [(top + r, left + q, g) for r in range(patch) for q in range(patch) for g in range(groups)]

                def vector(maps, cell, image=image):
                    y, x, g = cell
                    return maps[image, g * width : (g + 1) * width, y, x]

                for anchor in cells:
                    a = vector(generated, anchor)
                    positive = -float((a - vector(teacher, anchor)).abs().sum()) / tau
                    negatives = [-float((a - vector(teacher, other)).abs().sum()) / tau
                                 for other in cells if other[2] != anchor[2]]  # fmt: skip
                    top_value = max([positive, *negatives])
                    log_sum = top_value + math.log(sum(math.exp(v - top_value) for v in [positive, *negatives]))
                    total += log_sum - positive
    return total / (n * h * w)


def test_value_matches_a_float64_reference_with_the_mask_reproduced():
    loss = built()
    student, teacher = random_maps(2, 3, 8, 8, seed=1), random_maps(2, 8, 8, 8, seed=2)
    torch.manual_seed(5)
    value = loss(student, teacher).item()
    torch.manual_seed(5)
    keep = torch.rand(2, 1, 8, 8) >= 0.75
    reference = copy.deepcopy(loss).double()
    with torch.no_grad():
        generated = reference.projector(reference.align(student.double()) * keep)
    feature = float((generated - teacher.double()).pow(2).sum()) / 2
    contrast = reference_contrast(generated, teacher, 4, 2, 2, 0.07)
    assert value == pytest.approx(2e-6 * feature + 5e-3 * contrast, rel=1e-5)
    assert loss.contrast(generated.float(), teacher).item() == pytest.approx(contrast, rel=1e-5)


def test_contrast_is_small_when_the_maps_agree_and_gradients_reach_student_and_own_modules():
    loss = built(channels=8, student_channels=8)
    teacher = random_maps(2, 8, 8, 8, seed=3, scale=3.0)
    agree, disagree = loss.contrast(teacher, teacher).item(), loss.contrast(random_maps(2, 8, 8, 8, seed=4), teacher)
    assert agree < disagree.item()
    student = random_maps(2, 8, 8, 8, seed=5).requires_grad_(True)
    teacher.requires_grad_(True)
    loss(student, teacher).backward()
    assert student.grad.abs().sum() > 0 and teacher.grad is None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loss.projector.parameters())
    aligned = built(student_channels=3, channels=8)  # fewer student channels: the align conv learns too
    student = random_maps(2, 3, 8, 8, seed=6).requires_grad_(True)
    aligned(student, teacher).backward()
    assert student.grad.abs().sum() > 0 and teacher.grad is None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in aligned.align.parameters())


@pytest.mark.parametrize(("kwargs", "shape", "match"), [
    ({"groups": 3}, (2, 8, 8, 8), "do not split into 3 groups"),
    ({"pool_size": 8}, (2, 8, 8, 8), "not a multiple of the 2×2 patches"),
])  # fmt: skip
def test_maps_it_cannot_cut_are_refused_when_built(kwargs, shape, match):
    with pytest.raises(ValueError, match=match):
        AfDCD(**{"groups": 4, "pool_size": 2, "patch": 2, **kwargs}).build(torch.Size(shape), torch.Size(shape))
    with pytest.raises(ValueError, match="mask_ratio"):
        AfDCD(mask_ratio=1.0)
