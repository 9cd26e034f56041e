"""The benchmark harness's parts: the reference CWD, the timing summary, the loss micro-benchmark, the peer
without torchdistill."""

from __future__ import annotations

import sys

import pytest
import torch

from cwd_lightning import losses as loss_package
from cwd_lightning.bench import peer
from cwd_lightning.bench.losses import FEATURES_ONLY, NEEDS_TEACHER, LossCase, benchmark_losses, reference_cwd
from cwd_lightning.bench.timing import summarize
from cwd_lightning.losses import ChannelWiseDivergence

#: the losses of cwd_lightning.losses today; a new loss must show up in the table as well (checked below)
KNOWN_LOSSES = {
    "DIST", "AttentionTransfer", "ChannelMeanMSE", "ChannelWiseDivergence", "FitNets", "HolisticAdversarial",
    "IntraClassFeatureVariation", "LocalAffinity", "MaskedGenerativeDistillation", "NormalizedFeatureDistillation",
    "PairwiseAffinity", "PixelWiseKD",
}  # fmt: skip


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_reference_cwd_equals_channel_wise_divergence(tau):
    generator = torch.Generator().manual_seed(3)
    student = (3 * torch.randn(2, 5, 6, 7, generator=generator)).requires_grad_(True)
    teacher = 3 * torch.randn(2, 5, 6, 7, generator=generator)
    ours = ChannelWiseDivergence(tau=tau)(student, teacher)
    (ours_gradient,) = torch.autograd.grad(ours, student)
    reference = reference_cwd(student, teacher, tau)
    (reference_gradient,) = torch.autograd.grad(reference, student)
    assert ours.item() > 0
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ours_gradient, reference_gradient, rtol=1e-4, atol=1e-8)


def test_summarize_median_quartiles_and_range():
    timing = summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (timing.median_ms, timing.iqr_ms, timing.min_ms, timing.max_ms, timing.repeats) == (3.0, 2.0, 1.0, 5.0, 5)
    assert summarize([7.0]).iqr_ms == 0.0


def test_micro_benchmark_times_every_loss():
    cases = (LossCase("logits", (2, 19, 16, 16)), LossCase("features", (2, 8, 6, 6)))
    rows, comparison = benchmark_losses(cases, repeats=1, warmup=0, device=torch.device("cpu"))
    exported = {name for name in loss_package.__all__ if name != "DistillationLoss"}
    assert exported >= KNOWN_LOSSES
    assert {row["loss"] for row in rows} == exported
    logits = {row["loss"]: row for row in rows if row["case"] == "logits 16×16"}
    assert set(logits) == exported
    for name, row in logits.items():  # every loss runs on class logits (the discriminator needs >= 16×16)
        if name in FEATURES_ONLY:  # but those defined on features alone
            assert "defined for feature maps only" in row["skipped"]
            continue
        if name in NEEDS_TEACHER:  # and those that run part of the teacher (CrossKD), said per case
            assert "teacher" in row["skipped"]
            continue
        assert "skipped" not in row, (name, row.get("skipped"))
        assert row["median_ms"] > 0 and row["min_ms"] <= row["median_ms"] <= row["max_ms"]
    features = {row["loss"]: row for row in rows if row["case"] == "FPN 6×6"}
    assert "class logits only" in features["DIST"]["skipped"]
    assert "class logits only" in features["HolisticAdversarial"]["skipped"]
    assert features["ChannelWiseDivergence"]["median_ms"] > 0
    assert features["FocalGlobalDistillation"]["median_ms"] > 0  # given boxes, as the engine gives them
    assert [row["case"] for row in comparison] == ["logits 16×16", "FPN 6×6"]
    for row in comparison:
        # the median of per-repetition ratios (paired timing), not the ratio of the medians
        assert row["ratio"] > 0 and row["ratio_iqr"] >= 0 and row["cwd_ms"] > 0 and row["reference_ms"] > 0
        assert row["cwd_value"] == pytest.approx(row["reference_value"], rel=1e-5)


def test_peer_without_torchdistill_is_recorded_not_fatal(monkeypatch):
    for name in ["torchdistill", *(name for name in sys.modules if name.startswith("torchdistill."))]:
        monkeypatch.setitem(
            sys.modules, name, None
        )  # importing it (or an already imported part) now raises ImportError
    result = peer.compare(None, None, repeats=1, warmup=0, precision="32", ours=None)
    assert result["skipped"].startswith("torchdistill not installed")
