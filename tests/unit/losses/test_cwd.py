"""Channel-wise distillation (Shu et al., ICCV 2021): values by hand, the ablation switches against a float64
reference, gradients, precision and refusals."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cwd_lightning.losses import (
    ChannelWiseDivergence,
)
from tests.helpers import H, N, W, random_maps


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


TAU = 2.0


def reference_cwd(student: Tensor, teacher: Tensor, tau: float, normalize: str, divergence: str) -> float:
    """Float64: one distribution per (n, c) over H·W (channel) or per (n, h, w) over C (spatial)."""
    s, t = student.double(), teacher.double()
    n, c = s.shape[:2]
    if normalize == "channel":
        s, t = s.reshape(n * c, -1), t.reshape(n * c, -1)  # rows: (n, c), columns: positions
    else:
        s, t = s.permute(0, 2, 3, 1).reshape(-1, c), t.permute(0, 2, 3, 1).reshape(-1, c)  # rows: (n, h, w)
    p_s, p_t = torch.softmax(s / tau, dim=1), torch.softmax(t / tau, dim=1)
    kl_ts = (p_t * (p_t.log() - p_s.log())).sum(1)
    if divergence == "kl":
        per = kl_ts
    elif divergence == "symmetric_kl":
        per = kl_ts + (p_s * (p_s.log() - p_t.log())).sum(1)
    else:
        per = (p_s - p_t).pow(2).sum(1)
    scale = 1.0 if divergence == "mse" else tau**2
    return scale * float(per.mean())


SWITCHES = [
    (normalize, divergence) for normalize in ("channel", "spatial") for divergence in ("kl", "symmetric_kl", "mse")
]


@pytest.mark.parametrize(("normalize", "divergence"), SWITCHES)
def test_cwd_switches_match_float64_reference(normalize, divergence):
    student, teacher = random_maps(N, 3, H, W, seed=1, scale=2.0), random_maps(N, 3, H, W, seed=2, scale=2.0)
    loss = ChannelWiseDivergence(tau=TAU, normalize=normalize, divergence=divergence)
    expected = reference_cwd(student, teacher, TAU, normalize, divergence)
    value = loss(student, teacher)
    assert value.shape == () and value.dtype == torch.float32
    assert expected > 0
    assert value.item() == pytest.approx(expected, rel=1e-5, abs=1e-9)


def test_cwd_switches_give_distinct_values():
    """The switches really switch: no two of the six settings give the same value on random maps."""
    student, teacher = random_maps(N, 3, H, W, seed=3), random_maps(N, 3, H, W, seed=4)
    values = [ChannelWiseDivergence(TAU, n, d)(student, teacher).item() for n, d in SWITCHES]
    assert len({round(v, 6) for v in values}) == len(values)


def test_cwd_mse_is_not_scaled_by_tau_squared():
    student, teacher = random_maps(N, 3, H, W, seed=5), random_maps(N, 3, H, W, seed=6)
    loss = ChannelWiseDivergence(tau=TAU, divergence="mse")
    unscaled = loss.divergence_per_distribution(student, teacher).mean().item()
    assert loss(student, teacher).item() == pytest.approx(unscaled, rel=1e-6)
    kl = ChannelWiseDivergence(tau=TAU, divergence="kl")
    assert kl(student, teacher).item() == pytest.approx(
        TAU**2 * kl.divergence_per_distribution(student, teacher).mean().item(), rel=1e-6
    )


@pytest.mark.parametrize(("normalize", "divergence"), SWITCHES)
def test_cwd_per_distribution_shape(normalize, divergence):
    student, teacher = random_maps(N, 3, H, W, seed=7), random_maps(N, 3, H, W, seed=8)
    per = ChannelWiseDivergence(TAU, normalize, divergence).divergence_per_distribution(student, teacher)
    assert per.shape == ((N, 3) if normalize == "channel" else (N, H * W))
    assert (per >= -1e-7).all()


@pytest.mark.parametrize(("normalize", "divergence"), SWITCHES)
def test_cwd_zero_when_student_equals_teacher(normalize, divergence):
    maps = random_maps(N, 3, H, W, seed=9, scale=3.0)
    value = ChannelWiseDivergence(TAU, normalize, divergence)(maps, maps.clone())
    assert value.item() == pytest.approx(0.0, abs=1e-6)


def test_cwd_spatial_kl_is_tau_squared_batchmean_kl_div_over_positions():
    student, teacher = random_maps(N, 3, H, W, seed=10, scale=2.0), random_maps(N, 3, H, W, seed=11, scale=2.0)
    s_view = student.double().permute(0, 2, 3, 1).reshape(-1, 3)  # (N·H·W)×C
    t_view = teacher.double().permute(0, 2, 3, 1).reshape(-1, 3)
    kl_div = nn.KLDivLoss(reduction="batchmean")(F.log_softmax(s_view / TAU, dim=1), F.softmax(t_view / TAU, dim=1))
    value = ChannelWiseDivergence(TAU, normalize="spatial", divergence="kl")(student, teacher)
    assert value.item() == pytest.approx(TAU**2 * kl_div.item(), rel=1e-5)


@pytest.mark.parametrize(("normalize", "divergence"), SWITCHES)
def test_cwd_gradient_to_student_only(normalize, divergence):
    student = random_maps(N, 3, H, W, seed=12).requires_grad_(True)
    teacher = random_maps(N, 3, H, W, seed=13).requires_grad_(True)
    ChannelWiseDivergence(TAU, normalize, divergence)(student, teacher).backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.shape == student.shape
    assert student.grad.abs().sum() > 0 and torch.isfinite(student.grad).all()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"normalize": "pixel"}, "normalize"),
        ({"normalize": "Channel"}, "normalize"),
        ({"divergence": "js"}, "divergence"),
        ({"divergence": "KL"}, "divergence"),
        ({"tau": 0.0}, "tau"),
        ({"tau": -1.0}, "tau"),
    ],
)
def test_cwd_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ChannelWiseDivergence(**kwargs)


def test_cwd_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        ChannelWiseDivergence(TAU, "spatial", "mse")(torch.zeros(N, 3, H, W), torch.zeros(N, 4, H, W))


@pytest.mark.parametrize("normalize", ["channel", "spatial"])
def test_cwd_standardize_is_kl_of_z_scored_logits(normalize):
    """Logit standardisation: each distribution's logits z-scored (unbiased std + 1e-7) before τ."""
    student, teacher = random_maps(N, 3, H, W, seed=5, scale=2.0), random_maps(N, 3, H, W, seed=6, scale=4.0)
    axis = (2, 3) if normalize == "channel" else (1,)

    def z(maps: Tensor) -> Tensor:
        maps = maps.double()
        return (maps - maps.mean(axis, keepdim=True)) / (maps.std(axis, keepdim=True) + 1e-7)

    loss = ChannelWiseDivergence(TAU, normalize, standardize=True)
    expected = reference_cwd(z(student), z(teacher), TAU, normalize, "kl")
    assert loss(student, teacher).item() == pytest.approx(expected, rel=1e-5)
    plain = ChannelWiseDivergence(TAU, normalize)(student, teacher)
    assert loss(student, teacher).item() != pytest.approx(plain.item())
    assert loss(teacher, teacher).item() == pytest.approx(0.0, abs=1e-6)
    assert "standardize=True" in repr(loss)
