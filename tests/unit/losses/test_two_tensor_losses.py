"""The two-tensor losses (pixel-wise KD, AT, LOCAL, PA, IFVD, channel-mean, NFD, DIST, cosine, PKD) against float64
references, and the properties every loss shares: zero at student = teacher, gradients to the student only,
shape checks, fp32 under autocast, bad arguments refused."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cwd_lightning.losses import (
    DIST,
    PKD,
    AttentionTransfer,
    ChannelMeanMSE,
    ChannelWiseDivergence,
    CosineDistance,
    IntraClassFeatureVariation,
    LocalAffinity,
    NormalizedFeatureDistillation,
    PairwiseAffinity,
    PixelWiseKD,
)
from tests.helpers import random_maps

N, C, H, W = 2, 3, 5, 4


IGNORE = 255


def example_labels() -> Tensor:
    """N×H×W labels in 0..3 with ignore pixels; class 2 is absent from the second image."""
    labels = torch.tensor(
        [
            [[0, 0, 1, 1], [0, 2, 1, IGNORE], [3, 2, 2, 1], [3, 3, IGNORE, 1], [0, 0, 3, 2]],
            [[1, 1, 0, 0], [IGNORE, IGNORE, 0, 3], [1, 3, 3, 0], [1, 1, 0, 0], [3, 3, 1, IGNORE]],
        ]
    )
    assert labels.shape == (N, H, W) and not (labels[1] == 2).any()
    return labels


# name -> (constructor, whether student and teacher may differ in C, extra keyword context)
LOSSES: dict[str, tuple[Callable[[], nn.Module], bool, dict]] = {
    "pixel_kd": (lambda: PixelWiseKD(tau=2.0), False, {}),
    "attention": (lambda: AttentionTransfer(), True, {}),
    "local_cosine": (lambda: LocalAffinity("cosine"), True, {}),
    "local_l2": (lambda: LocalAffinity("l2"), True, {}),
    "pairwise": (lambda: PairwiseAffinity(2), True, {}),
    "ifvd": (lambda: IntraClassFeatureVariation(), True, {"labels": example_labels(), "ignore_index": IGNORE}),
    "channel_mean": (lambda: ChannelMeanMSE(), False, {}),
    "nfd": (lambda: NormalizedFeatureDistillation(), False, {}),
    "dist": (lambda: DIST(tau=2.0), False, {}),
    "cosine": (lambda: CosineDistance(), False, {}),
    "pkd": (lambda: PKD(), False, {}),
    "pixel_kd_standardized": (lambda: PixelWiseKD(tau=2.0, standardize=True), False, {}),
}
#: losses that resize one side when the maps' H×W differ (PKD, as its reference)
RESIZE_THEMSELVES = {"pkd"}


def reference_pixel_kd(student: Tensor, teacher: Tensor, tau: float) -> float:
    student, teacher = student.double(), teacher.double()
    total = 0.0
    for n in range(student.shape[0]):
        for h in range(student.shape[2]):
            for w in range(student.shape[3]):
                log_p_s = torch.log_softmax(student[n, :, h, w] / tau, 0)
                log_p_t = torch.log_softmax(teacher[n, :, h, w] / tau, 0)
                total += float((log_p_t.exp() * (log_p_t - log_p_s)).sum())
    return tau**2 * total / (student.shape[0] * student.shape[2] * student.shape[3])


def reference_attention(student: Tensor, teacher: Tensor, p: float) -> float:
    def attention(maps: Tensor) -> list[list[float]]:
        vectors = []
        for n in range(maps.shape[0]):
            values = [float(maps[n, :, h, w].abs().pow(p).mean()) for h in range(H) for w in range(W)]
            norm = math.sqrt(sum(v * v for v in values))
            vectors.append([v / max(norm, 1e-12) for v in values])
        return vectors

    a_s, a_t = attention(student.double()), attention(teacher.double())
    total = sum((s - t) ** 2 for row_s, row_t in zip(a_s, a_t, strict=True) for s, t in zip(row_s, row_t, strict=True))
    return total / (student.shape[0] * H * W)


def reference_local(student: Tensor, teacher: Tensor, similarity: str) -> float:
    offsets = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]

    def affinity(maps: Tensor, n: int, h: int, w: int) -> list[float]:
        f = maps[n, :, h, w]
        values = []
        for dy, dx in offsets:
            g = maps[n, :, h + dy, w + dx]
            if similarity == "cosine":
                values.append(float((f * g).sum() / max(float(f.norm() * g.norm()), 1e-8)))
            else:
                values.append(float((f - g).pow(2).sum()))
        return values if similarity == "cosine" else [sum(values)]

    student, teacher = student.double(), teacher.double()
    squares = []
    for n in range(student.shape[0]):
        for h in range(1, student.shape[2] - 1):
            for w in range(1, student.shape[3] - 1):
                s, t = affinity(student, n, h, w), affinity(teacher, n, h, w)
                squares += [(a - b) ** 2 for a, b in zip(s, t, strict=True)]
    return sum(squares) / len(squares)


def reference_pairwise(student: Tensor, teacher: Tensor, pool: int) -> float:
    def nodes(maps: Tensor, n: int) -> list[Tensor]:
        vectors = []
        for top in range(0, maps.shape[2], pool):
            for left in range(0, maps.shape[3], pool):
                block = maps[n, :, top : top + pool, left : left + pool]  # ceil mode: a partial last block
                vector = block.amax(dim=(1, 2))
                vectors.append(vector / max(float(vector.norm()), 1e-12))
        return vectors

    student, teacher = student.double(), teacher.double()
    squares = []
    for n in range(student.shape[0]):
        nodes_s, nodes_t = nodes(student, n), nodes(teacher, n)
        for i in range(len(nodes_s)):
            for j in range(len(nodes_s)):
                squares.append((float(nodes_t[i] @ nodes_t[j]) - float(nodes_s[i] @ nodes_s[j])) ** 2)
    return sum(squares) / len(squares)


def reference_ifvd(
    student: Tensor, teacher: Tensor, labels: Tensor, ignore_index: int, over_all_pixels: bool = False
) -> float:
    """Ours: mean over the labelled pixels. ``over_all_pixels``: the original's mean over N·H·W, where an
    ignore pixel keeps its own feature, so its cosine is 1 for both networks and it adds 0."""

    def cosines(maps: Tensor, n: int) -> dict[tuple[int, int], float]:
        result = {}
        for k in {int(v) for v in labels[n].flatten()} - {ignore_index}:
            pixels = [(h, w) for h in range(H) for w in range(W) if int(labels[n, h, w]) == k]
            centre = sum(maps[n, :, h, w] for h, w in pixels) / (len(pixels) + 1e-6)
            for h, w in pixels:
                f = maps[n, :, h, w]
                result[(h, w)] = float((f @ centre) / (f.norm() * centre.norm()))
        return result

    student, teacher = student.double(), teacher.double()
    squares = []
    for n in range(student.shape[0]):
        cos_s, cos_t = cosines(student, n), cosines(teacher, n)
        squares += [(cos_s[pixel] - cos_t[pixel]) ** 2 for pixel in cos_s]
    return sum(squares) / (labels.numel() if over_all_pixels else len(squares))


def reference_channel_mean(student: Tensor, teacher: Tensor) -> float:
    student, teacher = student.double(), teacher.double()
    total = 0.0
    for n in range(student.shape[0]):
        for c in range(student.shape[1]):
            total += (float(student[n, c].sum()) / (H * W) - float(teacher[n, c].sum()) / (H * W)) ** 2
    return total / (student.shape[0] * student.shape[1])


def reference_nfd(student: Tensor, teacher: Tensor, axis: str, eps: float) -> float:
    def standardize(maps: Tensor) -> Tensor:
        out = torch.empty_like(maps)
        groups = {
            "spatial": [(n, c, slice(None), slice(None)) for n in range(N) for c in range(C)],
            "channel": [(n, slice(None), h, w) for n in range(N) for h in range(H) for w in range(W)],
            "layer": [(n,) for n in range(N)],
        }[axis]
        for index in groups:
            values = maps[index]
            mean = values.sum() / values.numel()
            variance = ((values - mean) ** 2).sum() / values.numel()
            out[index] = (values - mean) / torch.sqrt(variance + eps)
        return out

    return float(((standardize(student.double()) - standardize(teacher.double())) ** 2).mean())


def reference_dist(student: Tensor, teacher: Tensor, beta: float, gamma: float, tau: float) -> float:
    def pearson(a: list[float], b: list[float]) -> float:
        mean_a, mean_b = sum(a) / len(a), sum(b) / len(b)
        a, b = [x - mean_a for x in a], [x - mean_b for x in b]
        dot = sum(x * y for x, y in zip(a, b, strict=True))
        return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)) + 1e-8)

    def rows(maps: Tensor) -> list[list[float]]:
        maps = maps.double()
        return [
            torch.softmax(maps[n, :, h, w] / tau, 0).tolist()
            for n in range(maps.shape[0])
            for h in range(maps.shape[2])
            for w in range(maps.shape[3])
        ]

    rows_s, rows_t = rows(student), rows(teacher)
    inter = 1 - sum(pearson(s, t) for s, t in zip(rows_s, rows_t, strict=True)) / len(rows_s)
    columns = range(student.shape[1])
    intra = 1 - sum(pearson([r[c] for r in rows_s], [r[c] for r in rows_t]) for c in columns) / len(columns)
    return tau**2 * (beta * inter + gamma * intra)


@pytest.mark.parametrize("tau", [1.0, 3.0])
def test_pixel_kd_value(tau):
    student, teacher = random_maps(N, C, H, W, seed=0, scale=2), random_maps(N, C, H, W, seed=1, scale=2)
    assert PixelWiseKD(tau)(student, teacher).item() == pytest.approx(
        reference_pixel_kd(student, teacher, tau), rel=1e-5
    )


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_pixel_kd_is_spatial_cwd_and_batchmean_kl(tau):
    student, teacher = random_maps(N, C, H, W, seed=2, scale=3), random_maps(N, C, H, W, seed=3, scale=3)
    value = PixelWiseKD(tau)(student, teacher)
    torch.testing.assert_close(value, ChannelWiseDivergence(tau, normalize="spatial")(student, teacher))
    rows_s = student.permute(0, 2, 3, 1).reshape(-1, C)
    rows_t = teacher.permute(0, 2, 3, 1).reshape(-1, C)
    kl = nn.KLDivLoss(reduction="batchmean")(F.log_softmax(rows_s / tau, 1), F.softmax(rows_t / tau, 1))
    torch.testing.assert_close(value, tau**2 * kl, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0])
def test_attention_value(p):
    student, teacher = random_maps(N, C, H, W, seed=4), random_maps(N, 5, H, W, seed=5)
    expected = reference_attention(student, teacher, p)
    assert AttentionTransfer(p)(student, teacher).item() == pytest.approx(expected, rel=1e-5)


def test_attention_p2_is_the_squared_map():
    student, teacher = random_maps(N, C, H, W, seed=6), random_maps(N, C, H, W, seed=7)
    a_s = F.normalize(student.pow(2).mean(1).flatten(1), dim=1)
    a_t = F.normalize(teacher.pow(2).mean(1).flatten(1), dim=1)
    torch.testing.assert_close(AttentionTransfer(2.0)(student, teacher), (a_s - a_t).pow(2).mean())


@pytest.mark.parametrize("similarity", ["cosine", "l2"])
def test_local_affinity_value(similarity):
    student, teacher = random_maps(N, C, H, W, seed=8), random_maps(N, 5, H, W, seed=9)
    expected = reference_local(student, teacher, similarity)
    assert LocalAffinity(similarity)(student, teacher).item() == pytest.approx(expected, rel=1e-5)


def test_local_cosine_finite_for_all_zero_pixels():
    student = random_maps(1, C, 4, 4, seed=10).relu()
    student[:, :, 1:3, 1:3] = 0  # dead ReLU pixels: the reference's rsqrt(0) would give inf / NaN
    student.requires_grad_(True)
    value = LocalAffinity("cosine")(student, random_maps(1, C, 4, 4, seed=11))
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(student.grad).all()


def test_local_affinity_needs_3x3():
    with pytest.raises(ValueError, match="at least 3×3"):
        LocalAffinity()(torch.zeros(1, 2, 2, 5), torch.zeros(1, 2, 2, 5))


@pytest.mark.parametrize("pool", [1, 2, 3])
def test_pairwise_value(pool):
    student, teacher = random_maps(N, C, H, W, seed=12), random_maps(N, 5, H, W, seed=13)
    expected = reference_pairwise(student, teacher, pool)
    assert PairwiseAffinity(pool)(student, teacher).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("num_classes", [None, 4, 7])
def test_ifvd_value(num_classes):
    student, teacher = random_maps(N, C, H, W, seed=14), random_maps(N, 5, H, W, seed=15)
    labels = example_labels()
    expected = reference_ifvd(student, teacher, labels, IGNORE)
    value = IntraClassFeatureVariation(num_classes)(student, teacher, labels=labels, ignore_index=IGNORE)
    assert value.item() == pytest.approx(expected, rel=1e-5)


def test_ifvd_other_ignore_index_and_reference_dilution():
    student, teacher = random_maps(N, C, H, W, seed=16), random_maps(N, C, H, W, seed=17)
    labels = example_labels()
    shifted = torch.where(labels == IGNORE, torch.full_like(labels, -1), labels)
    ours = IntraClassFeatureVariation()(student, teacher, labels=shifted, ignore_index=-1)
    assert ours.item() == pytest.approx(reference_ifvd(student, teacher, labels, IGNORE), rel=1e-5)
    # the original averages over all N·H·W pixels, ignore pixels adding 0: ours times the valid fraction
    valid_fraction = (labels != IGNORE).float().mean().item()
    original = reference_ifvd(student, teacher, labels, IGNORE, over_all_pixels=True)
    assert ours.item() * valid_fraction == pytest.approx(original, rel=1e-5)
    assert 0 < valid_fraction < 1


def test_ifvd_all_ignore_is_zero_with_gradient_path():
    student = random_maps(N, C, H, W, seed=18).requires_grad_(True)
    labels = torch.full((N, H, W), IGNORE)
    value = IntraClassFeatureVariation()(student, random_maps(N, C, H, W, seed=19), labels=labels)
    assert value.item() == 0.0 and value.dtype == torch.float32 and value.grad_fn is not None
    value.backward()
    assert (student.grad == 0).all()


def test_ifvd_label_errors():
    loss = IntraClassFeatureVariation(num_classes=4)
    student, teacher = random_maps(N, C, H, W, seed=20), random_maps(N, C, H, W, seed=21)
    labels = example_labels()
    labels[0, 0, 0] = 7
    with pytest.raises(ValueError, match="label 7"):
        loss(student, teacher, labels=labels)
    with pytest.raises(ValueError, match="needs ground-truth labels"):
        loss(student, teacher, labels=None)
    with pytest.raises(ValueError, match="do not match the maps"):
        loss(student, teacher, labels=torch.zeros(N, H + 1, W, dtype=torch.long))
    with pytest.raises(ValueError, match="num_classes"):
        IntraClassFeatureVariation(num_classes=0)


def test_channel_mean_value():
    student, teacher = random_maps(N, C, H, W, seed=22), random_maps(N, C, H, W, seed=23)
    expected = reference_channel_mean(student, teacher)
    assert ChannelMeanMSE()(student, teacher).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("axis", ["spatial", "channel", "layer"])
def test_nfd_value(axis):
    student, teacher = random_maps(N, C, H, W, seed=24, scale=3), random_maps(N, C, H, W, seed=25)
    expected = reference_nfd(student, teacher, axis, 1e-5)
    value = NormalizedFeatureDistillation(axis)(student, teacher)
    assert value.item() == pytest.approx(expected, rel=1e-5)


def test_nfd_ignores_magnitude_and_survives_constant_channel():
    teacher = random_maps(N, C, H, W, seed=26)
    value = NormalizedFeatureDistillation("spatial")(teacher * 50 + 7, teacher)
    assert value.item() == pytest.approx(0.0, abs=1e-6)
    student = random_maps(N, C, H, W, seed=27)
    student[:, 0] = 0.0  # a dead channel: std 0
    assert torch.isfinite(NormalizedFeatureDistillation("spatial")(student, teacher))


@pytest.mark.parametrize(("beta", "gamma", "tau"), [(1.0, 1.0, 1.0), (2.0, 0.5, 3.0)])
def test_dist_value(beta, gamma, tau):
    student, teacher = random_maps(N, C, H, W, seed=28, scale=2), random_maps(N, C, H, W, seed=29, scale=2)
    expected = reference_dist(student, teacher, beta, gamma, tau)
    assert DIST(beta, gamma, tau)(student, teacher).item() == pytest.approx(expected, rel=1e-5)


def reference_pkd(student: Tensor, teacher: Tensor) -> float:
    """½ · mean of the squared difference of each channel z-scored over its N·H·W values (unbiased std)."""

    def standardized(maps: Tensor, c: int) -> list[float]:
        values = maps[:, c].double().flatten().tolist()
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
        return [(v - mean) / (std + 1e-6) for v in values]

    squares = [(s - t) ** 2 for c in range(student.shape[1])
               for s, t in zip(standardized(student, c), standardized(teacher, c), strict=True)]  # fmt: skip
    return 0.5 * sum(squares) / len(squares)


def test_pkd_value_and_one_minus_pearson():
    student, teacher = random_maps(N, C, H, W, seed=41, scale=3), random_maps(N, C, H, W, seed=42)
    value = PKD()(student, teacher).item()
    assert value == pytest.approx(reference_pkd(student, teacher), rel=1e-5)
    count = N * H * W  # = 1 − r with the unbiased std, up to (count − 1)/count
    pearson = [float(torch.corrcoef(torch.stack([student[:, c].flatten(), teacher[:, c].flatten()]).double())[0, 1])
               for c in range(C)]  # fmt: skip
    assert value == pytest.approx((1 - sum(pearson) / C) * (count - 1) / count, rel=1e-4)
    assert PKD()(student * 7 + 3, teacher).item() == pytest.approx(value, rel=1e-4)  # scale and offset free


@pytest.mark.parametrize("side", ["student", "teacher"])
def test_pkd_resizes_the_named_side_bilinearly(side):
    student, teacher = random_maps(N, C, 4, 6, seed=43), random_maps(N, C, 8, 12, seed=44)
    resized = {"student": (F.interpolate(student, size=(8, 12), mode="bilinear"), teacher),
               "teacher": (student, F.interpolate(teacher, size=(4, 6), mode="bilinear"))}[side]  # fmt: skip
    assert PKD(side)(student, teacher).item() == pytest.approx(reference_pkd(*resized), rel=1e-5)
    with pytest.raises(ValueError, match="no variance"):
        PKD()(torch.randn(1, C, 1, 1), torch.randn(1, C, 1, 1))


def reference_standardized_pixel_kd(student: Tensor, teacher: Tensor, tau: float) -> float:
    def z(maps: Tensor) -> Tensor:
        maps = maps.double()
        return (maps - maps.mean(1, keepdim=True)) / (maps.std(1, keepdim=True) + 1e-7)

    return reference_pixel_kd(z(student), z(teacher), tau)


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_standardized_pixel_kd_value_and_scale_invariance(tau):
    student, teacher = random_maps(N, C, H, W, seed=45, scale=2), random_maps(N, C, H, W, seed=46, scale=5)
    value = PixelWiseKD(tau, standardize=True)(student, teacher)
    assert value.item() == pytest.approx(reference_standardized_pixel_kd(student, teacher, tau), rel=1e-5)
    # the teacher's logit scale no longer matters; without the switch it does
    scaled = PixelWiseKD(tau, standardize=True)(student, teacher * 10 + 1)
    assert scaled.item() == pytest.approx(value.item(), rel=1e-4)
    assert PixelWiseKD(tau)(student, teacher * 10).item() != pytest.approx(PixelWiseKD(tau)(student, teacher).item())


@pytest.mark.parametrize("name", list(LOSSES))
def test_zero_when_student_equals_teacher(name):
    make, _, context = LOSSES[name]
    maps = random_maps(N, C, H, W, seed=30, scale=2)
    assert make()(maps, maps.clone(), **context).item() == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("name", list(LOSSES))
def test_gradient_to_student_only(name):
    make, _, context = LOSSES[name]
    student = random_maps(N, C, H, W, seed=31).requires_grad_(True)
    teacher = random_maps(N, C, H, W, seed=32).requires_grad_(True)
    make()(student, teacher, **context).backward()
    assert teacher.grad is None
    assert student.grad is not None and torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


@pytest.mark.parametrize("name", list(LOSSES))
def test_rejects_mismatched_shapes(name):
    make, any_channels, context = LOSSES[name]
    loss = make()
    student = random_maps(N, C, H, W, seed=33)
    with pytest.raises(ValueError, match="same N, H, W" if any_channels else "same shape"):
        other = (N + 1, C, H, W) if name in RESIZE_THEMSELVES else (N, C, H, W + 1)
        loss(student, random_maps(*other, seed=34), **context)
    with pytest.raises(ValueError, match="N×C×H×W"):
        loss(student[0], random_maps(C, H, W, seed=35), **context)
    if not any_channels:
        with pytest.raises(ValueError, match="same shape"):
            loss(student, random_maps(N, C + 2, H, W, seed=36), **context)


@pytest.mark.parametrize("name", [name for name, (_, any_channels, _) in LOSSES.items() if any_channels])
def test_different_channel_counts(name):
    make, _, context = LOSSES[name]
    value = make()(random_maps(N, 3, H, W, seed=37), random_maps(N, 5, H, W, seed=38), **context)
    assert value.ndim == 0 and torch.isfinite(value) and value.item() > 0


@pytest.mark.parametrize("name", list(LOSSES))
def test_fp32_under_autocast(name):
    make, _, context = LOSSES[name]
    student = random_maps(N, C, H, W, seed=39).bfloat16()
    teacher = random_maps(N, C, H, W, seed=40).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = make()(student, teacher, **context)
    assert value.dtype == torch.float32 and value.ndim == 0 and torch.isfinite(value)


@pytest.mark.parametrize(
    "build",
    [
        lambda: PixelWiseKD(tau=0),
        lambda: AttentionTransfer(p=0),
        lambda: LocalAffinity("dot"),
        lambda: PairwiseAffinity(0),
        lambda: NormalizedFeatureDistillation("batch"),
        lambda: DIST(tau=-1),
    ],
)
def test_rejects_bad_arguments(build):
    with pytest.raises(ValueError):
        build()


# ---------------------------------------------------------------- cosine distance
def reference_cosine(student: Tensor, teacher: Tensor, eps: float = 1e-8) -> float:
    """1 − cos over channels at each location, mean over N·H·W, in float64 by explicit sums."""
    s, t = student.double(), teacher.double()
    dot = (s * t).sum(1)
    norms = s.pow(2).sum(1).sqrt().clamp_min(eps) * t.pow(2).sum(1).sqrt().clamp_min(eps)
    return float((1 - dot / norms).mean())


def test_cosine_distance_value_zero_at_the_teacher_and_scale_free():
    student, teacher = random_maps(2, 6, 3, 4, seed=11), random_maps(2, 6, 3, 4, seed=12)
    loss = CosineDistance()
    assert float(loss(student, teacher)) == pytest.approx(reference_cosine(student, teacher), abs=1e-6)
    assert float(loss(teacher.clone(), teacher)) == pytest.approx(0.0, abs=1e-6)
    assert float(loss(3.0 * teacher, teacher)) == pytest.approx(0.0, abs=1e-6)  # the length is free
    assert float(loss(-teacher, teacher)) == pytest.approx(2.0, abs=1e-6)
    student = student.clone().requires_grad_(True)
    teacher = teacher.clone().requires_grad_(True)
    loss(student, teacher).backward()
    assert student.grad is not None and float(student.grad.abs().sum()) > 0 and teacher.grad is None
    zero = torch.zeros(1, 6, 2, 2)
    assert float(loss(zero, random_maps(1, 6, 2, 2, seed=3))) == pytest.approx(1.0)  # orthogonal, not NaN
    with pytest.raises(ValueError, match="same shape"):
        loss(random_maps(1, 5, 2, 2, seed=1), random_maps(1, 6, 2, 2, seed=2))
    with pytest.raises(ValueError, match="eps must be > 0"):
        CosineDistance(eps=0)
