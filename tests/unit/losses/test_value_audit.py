"""What a value audit of the losses found, each fixed: a test per finding that fails on the code before its fix."""

from __future__ import annotations

import pytest
import torch
import torch.distributed

from cwd_lightning.losses import (
    AttentionTransfer,
    HolisticAdversarial,
    IntraClassFeatureVariation,
    MaskedGenerativeDistillation,
    NormalizedFeatureDistillation,
    PairwiseAffinity,
    maps,
)
from tests.helpers import random_maps


@pytest.mark.parametrize("p", [0.5, 0.99])
def test_attention_refuses_p_below_one(p):
    with pytest.raises(ValueError, match="p must be ≥ 1"):
        AttentionTransfer(p)


def test_attention_gradient_is_finite_at_exact_zeros_for_p_one():
    student = random_maps(2, 3, 4, 4, seed=0).relu()
    student[:, :, :2] = 0  # dead ReLU positions, exactly 0
    student.requires_grad_(True)
    AttentionTransfer(1.0)(student, random_maps(2, 3, 4, 4, seed=1)).backward()
    assert torch.isfinite(student.grad).all()


@pytest.mark.parametrize(("axis", "shape"), [("spatial", (2, 3, 1, 1)), ("channel", (2, 1, 4, 4)),
                                             ("layer", (2, 1, 1, 1))])  # fmt: skip
def test_nfd_refuses_a_group_of_one_value(axis, shape):
    """Before: 0 for any input (x − mean = 0), without a word."""
    with pytest.raises(ValueError, match="identically 0"):
        NormalizedFeatureDistillation(axis)(torch.randn(shape), torch.randn(shape))
    other = NormalizedFeatureDistillation("layer" if axis != "layer" else "spatial")
    if axis != "layer":  # the same maps on an axis with more than one value: a real, positive loss
        assert other(torch.randn(shape), torch.randn(shape)).item() > 0


@pytest.mark.parametrize(("pool", "size"), [(4, (4, 4)), (8, (5, 7)), (2, (1, 2))])
def test_pairwise_refuses_a_pool_that_leaves_one_node(pool, size):
    with pytest.raises(ValueError, match="one node"):
        PairwiseAffinity(pool)(torch.randn(2, 3, *size), torch.randn(2, 5, *size))
    assert PairwiseAffinity(pool)(torch.randn(2, 3, pool + 1, pool), torch.randn(2, 5, pool + 1, pool)).item() > 0


def test_ifvd_without_an_ignore_index_uses_every_pixel():
    """Before: ``labels != None`` raised AttributeError (from torch's comparison with None)."""
    student, teacher = random_maps(2, 3, 4, 4, seed=2), random_maps(2, 5, 4, 4, seed=3)
    labels = torch.randint(0, 3, (2, 4, 4), generator=torch.Generator().manual_seed(0))
    loss = IntraClassFeatureVariation()
    without = loss(student, teacher, labels=labels, ignore_index=None)
    # no label equals 255, so ignoring 255 ignores nothing: the same value
    torch.testing.assert_close(without, loss(student, teacher, labels=labels, ignore_index=255))
    assert without.item() > 0


def built_mgd(channels: int = 3, size: int = 6) -> MaskedGenerativeDistillation:
    loss = MaskedGenerativeDistillation(0.5)
    shape = torch.Size((2, channels, size, size))
    loss.build(shape, shape)
    return loss


def masked_value_as(rank: int, world: int, monkeypatch) -> tuple[float, float]:
    """The MGD loss from the same RNG state, as rank ``rank`` of a ``world``-process job would compute it."""
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: world > 1)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: rank)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: world)
    torch.manual_seed(7)  # the same generator weights in every call
    loss = built_mgd()
    student, teacher = random_maps(2, 3, 6, 6, seed=4), random_maps(2, 3, 6, 6, seed=5)
    torch.manual_seed(11)  # Lightning seeds every rank alike
    value = loss(student, teacher).item()
    return value, torch.rand(()).item()  # the value, and where the shared RNG stands after it


def test_mgd_ranks_mask_different_positions_and_stay_in_step(monkeypatch):
    """Before: every rank drew its mask from the same RNG state, so all masked the same positions."""
    (rank0, after0), (rank1, after1) = masked_value_as(0, 2, monkeypatch), masked_value_as(1, 2, monkeypatch)
    assert rank0 != pytest.approx(rank1, rel=1e-6)
    assert after0 == after1  # every rank's RNG advanced alike


def test_mgd_single_process_mask_is_the_plain_draw(monkeypatch):
    """One process draws exactly the mask it drew before the fix: seeded runs repeat their old results."""
    value, _ = masked_value_as(0, 1, monkeypatch)
    torch.manual_seed(7)
    loss = built_mgd()
    student, teacher = random_maps(2, 3, 6, 6, seed=4), random_maps(2, 3, 6, 6, seed=5)
    torch.manual_seed(11)
    keep = torch.rand(2, 1, 6, 6) >= 0.5
    with torch.no_grad():
        expected = (loss.generator(loss.align(student) * keep) - teacher).pow(2).sum() / 2
    assert value == pytest.approx(expected.item(), rel=1e-6)
    assert maps.rank_mask(2, torch.Size((6, 6)), torch.device("cpu")).shape == (2, 1, 6, 6)


def test_holistic_student_step_leaves_the_discriminator_state_unchanged():
    """Before: the student's forward ran D in train mode and moved its BatchNorm statistics and spectral-norm
    vectors; now only D's own update moves them."""
    loss = HolisticAdversarial(width=16)
    shape = torch.Size((2, 4, 32, 32))
    loss.build(shape, shape)
    loss.train()
    student, teacher = random_maps(*shape, seed=6).requires_grad_(True), random_maps(*shape, seed=7, scale=2.0)
    before = {name: buffer.clone() for name, buffer in loss.discriminator.named_buffers()}
    assert any("_u" in name for name in before) and any("running_mean" in name for name in before)
    loss(student, teacher).backward()
    assert all(torch.equal(buffer, before[name]) for name, buffer in loss.discriminator.named_buffers())
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
    # the student's gradient is the one of D in train mode (batch statistics), not of an eval-mode D
    eval_student = student.detach().clone().requires_grad_(True)
    loss.eval()
    loss(eval_student, teacher).backward()
    assert not torch.allclose(student.grad, eval_student.grad)
    loss.train()
    loss.auxiliary_loss(student.detach(), teacher)  # D's own update does move its state
    moved = [not torch.equal(buffer, before[name]) for name, buffer in loss.discriminator.named_buffers()]
    assert any(moved)
