"""ChannelWiseDivergence against hand-computed values, and its defining properties."""

from __future__ import annotations

import math

import pytest
import torch

from cwd_lightning.losses import ChannelWiseDivergence


def _manual_kl(student: list[float], teacher: list[float], tau: float) -> float:
    """KL(softmax(t/τ) ‖ softmax(s/τ)) of one channel, written out term by term."""
    zs = sum(math.exp(v / tau) for v in student)
    zt = sum(math.exp(v / tau) for v in teacher)
    ps = [math.exp(v / tau) / zs for v in student]
    pt = [math.exp(v / tau) / zt for v in teacher]
    return sum(t * (math.log(t) - math.log(s)) for s, t in zip(ps, pt, strict=True))


def test_single_channel_value_by_hand():
    # one 1×1×2×2 map: teacher [0, 1, 2, 3], student zeros (uniform)
    # p_T = e^k / (1 + e + e² + e³); KL = Σ p_T log p_T + log 4
    teacher = torch.tensor([0.0, 1.0, 2.0, 3.0]).view(1, 1, 2, 2)
    student = torch.zeros(1, 1, 2, 2)
    z = 1 + math.e + math.e**2 + math.e**3
    expected = sum((math.e**k / z) * (k - math.log(z)) for k in range(4)) + math.log(4)
    assert expected == pytest.approx(0.43876, abs=1e-5)
    assert ChannelWiseDivergence(tau=1.0)(student, teacher).item() == pytest.approx(expected, rel=1e-6)


def test_batch_value_is_tau_squared_mean_over_n_and_c_of_summed_kl():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 3, 2, 3), torch.randn(2, 3, 2, 3)
    tau = 2.0
    per_map = [
        _manual_kl(student[n, c].flatten().tolist(), teacher[n, c].flatten().tolist(), tau)
        for n in range(2)
        for c in range(3)
    ]
    expected = tau**2 * sum(per_map) / 6  # summed over positions, averaged over N·C, never over H·W
    assert ChannelWiseDivergence(tau)(student, teacher).item() == pytest.approx(expected, rel=1e-5)


def test_zero_for_identical_inputs():
    x = torch.randn(2, 4, 5, 5)
    assert ChannelWiseDivergence(3.0)(x, x.clone()).item() == pytest.approx(0.0, abs=1e-6)


def test_invariant_to_per_channel_additive_shift():
    torch.manual_seed(1)
    student, teacher = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    shift = torch.randn(2, 3, 1, 1) * 10
    loss = ChannelWiseDivergence(2.0)
    assert loss(student + shift, teacher).item() == pytest.approx(loss(student, teacher).item(), rel=1e-5)
    assert loss(student, teacher - shift).item() == pytest.approx(loss(student, teacher).item(), rel=1e-5)


def test_asymmetric():
    torch.manual_seed(2)
    a, b = torch.randn(1, 2, 4, 4) * 3, torch.randn(1, 2, 4, 4)
    loss = ChannelWiseDivergence(1.0)
    assert abs(loss(a, b).item() - loss(b, a).item()) > 1e-3


def test_tau_squared_scaling():
    """The value is τ² times the KL between the τ-softened maps."""
    torch.manual_seed(3)
    student, teacher = torch.randn(2, 2, 3, 3), torch.randn(2, 2, 3, 3)
    for tau in (0.5, 1.0, 4.0):
        softened = ChannelWiseDivergence(1.0)(student / tau, teacher / tau).item()
        assert ChannelWiseDivergence(tau)(student, teacher).item() == pytest.approx(tau**2 * softened, rel=1e-5)


def test_gradient_only_to_student_and_matches_closed_form():
    torch.manual_seed(4)
    tau = 2.0
    student = torch.randn(2, 3, 4, 4, requires_grad=True)
    teacher = torch.randn(2, 3, 4, 4, requires_grad=True)
    ChannelWiseDivergence(tau)(student, teacher).backward()
    assert teacher.grad is None
    # d/ds = τ/(N·C) · (p_S − p_T)
    p_s = torch.softmax(student.detach().flatten(2) / tau, -1)
    p_t = torch.softmax(teacher.detach().flatten(2) / tau, -1)
    expected = (tau / 6) * (p_s - p_t)
    torch.testing.assert_close(student.grad.flatten(2), expected, rtol=1e-5, atol=1e-7)


def test_fp32_under_autocast_and_no_log_zero():
    student = torch.full((1, 2, 8, 8), -1e4)
    student[..., 0, 0] = 1e4  # a one-hot softmax: softmax-then-log would give log 0 = -inf
    teacher = torch.randn(1, 2, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = ChannelWiseDivergence(1.0)(student.bfloat16(), teacher.bfloat16())
    assert value.dtype == torch.float32
    assert torch.isfinite(value)


def test_per_sample_channel_matrix_matches_loss():
    torch.manual_seed(5)
    student, teacher = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    loss = ChannelWiseDivergence(2.0)
    matrix = loss.kl_per_sample_channel(student, teacher)
    assert matrix.shape == (3, 4)
    assert (matrix >= -1e-6).all()
    assert (matrix.mean() * 4).item() == pytest.approx(loss(student, teacher).item(), rel=1e-6)


def test_rejects_bad_shapes_and_tau():
    with pytest.raises(ValueError, match="same shape"):
        ChannelWiseDivergence()(torch.zeros(1, 2, 3, 3), torch.zeros(1, 3, 3, 3))
    with pytest.raises(ValueError, match="tau"):
        ChannelWiseDivergence(tau=0)
