"""The benchmark harness (``python -m cwd_lightning.bench``): its reference CWD, its loss table, one end-to-end
run on the tiny dataset, and the torchdistill comparison. Correctness only: no timing thresholds."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from cwd_lightning import losses as loss_package
from cwd_lightning.bench import environment, peer
from cwd_lightning.bench.__main__ import main
from cwd_lightning.bench.losses import LossCase, benchmark_losses, reference_cwd
from cwd_lightning.bench.timing import summarize
from cwd_lightning.losses import ChannelWiseDivergence
from tests.conftest import REPO

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


def test_hardware_slug():
    assert environment.slug("AMD EPYC, 2 cores, CPU") == "amd-epyc-2-cores-cpu"
    assert environment.slug("NVIDIA H200") == "nvidia-h200"
    assert environment.slug("Intel(R) Xeon(R) Gold 6148 CPU @ 2.40GHz, 8 cores, CPU") == (
        "intel-xeon-gold-6148-cpu-2-40ghz-8-cores-cpu"
    )


def test_micro_benchmark_times_every_loss():
    cases = (LossCase("logits", (2, 19, 16, 16)), LossCase("features", (2, 8, 6, 6)))
    rows, comparison = benchmark_losses(cases, repeats=1, warmup=0, device=torch.device("cpu"))
    exported = {name for name in loss_package.__all__ if name != "DistillationLoss"}
    assert exported >= KNOWN_LOSSES
    assert {row["loss"] for row in rows} == exported
    logits = {row["loss"]: row for row in rows if row["case"] == "logits 16×16"}
    assert set(logits) == exported
    for name, row in logits.items():  # every loss runs on class logits (the discriminator needs >= 16×16)
        assert "skipped" not in row, (name, row.get("skipped"))
        assert row["median_ms"] > 0 and row["min_ms"] <= row["median_ms"] <= row["max_ms"]
    features = {row["loss"]: row for row in rows if row["case"] == "FPN 6×6"}
    assert "class logits only" in features["DIST"]["skipped"]
    assert "class logits only" in features["HolisticAdversarial"]["skipped"]
    assert features["ChannelWiseDivergence"]["median_ms"] > 0
    assert [row["case"] for row in comparison] == ["logits 16×16", "FPN 6×6"]
    for row in comparison:
        # the median of per-repetition ratios (paired timing), not the ratio of the medians
        assert row["ratio"] > 0 and row["ratio_iqr"] >= 0 and row["cwd_ms"] > 0 and row["reference_ms"] > 0
        assert row["cwd_value"] == pytest.approx(row["reference_value"], rel=1e-5)


def test_peer_without_torchdistill_is_recorded_not_fatal(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchdistill", None)  # import torchdistill now raises ImportError
    result = peer.compare(None, None, repeats=1, warmup=0, precision="32", ours_ms=None)
    assert result["skipped"].startswith("torchdistill not installed")


@pytest.fixture(scope="module")
def bench_record(tiny_shapes, tmp_path_factory):
    """One harness run of shapes_cwd on the tiny dataset (batch 4 of 32×32), its teacher checkpoint
    missing (so a random teacher), tiny repeats and loss sizes scaled down."""
    work = tmp_path_factory.mktemp("bench")
    overrides = [
        "--data.init_args.root", str(tiny_shapes), "--data.init_args.shapes", "null",
        "--data.init_args.crop_size", "32", "--data.init_args.base_size", "32",
        "--data.init_args.batch_size", "4", "--data.init_args.num_workers", "0",
        "--model.task.init_args.example_size", "32", "--runs_root", str(work / "runs"),
    ]  # fmt: skip
    config = REPO / "experiments" / "shapes_cwd.yaml"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(work)  # runs/shapes_teacher/best.ckpt is read from the working directory: missing here
        path = main([str(config), "--repeats", "2", "--warmup", "1", "--loss-scale", "0.1", "--out",
                     str(work / "out"), "--", *overrides])  # fmt: skip
    return path, json.loads(path.read_text())


def test_bench_writes_the_record(bench_record):
    path, record = bench_record
    assert path.name == f"shapes_cwd-{environment.slug(record['hardware'])}-partial.json"  # scaled loss sizes
    for key in ("experiment", "hardware", "versions", "git", "device", "precision", "batch_size", "input_size",
                "repeats", "warmup", "teacher_weights", "steps", "overhead", "memory", "losses", "cwd_vs_reference",
                "peer", "targets", "load_average"):  # fmt: skip
        assert key in record, key
    assert record["experiment"] == "shapes_cwd" and record["device"] == "cpu"
    assert record["teacher_weights"] == "random (checkpoint missing)"
    assert record["batch_size"] == 4 and record["input_size"] == [3, 32, 32] and record["repeats"] == 2
    assert {"torch", "lightning"} <= set(record["versions"]) and "commit" in record["git"]

    steps = record["steps"]
    assert set(steps) == {"student_only", "teacher_forward", "distillation", "distillation_from_cache"}
    for step in steps.values():
        assert step["repeats"] == 2
        assert 0 < step["min_ms"] <= step["median_ms"] <= step["max_ms"] and step["iqr_ms"] >= 0
        assert step["images_per_s"] == pytest.approx(4 / (step["median_ms"] / 1000))
    medians = {name: step["median_ms"] for name, step in steps.items()}
    assert record["cached_to_student_only"] == pytest.approx(
        medians["distillation_from_cache"] / medians["student_only"]
    )
    assert record["targets"]["cached_le_1_10_student_only"] == (record["cached_to_student_only"] <= 1.10)
    overhead = medians["distillation"] - medians["student_only"] - medians["teacher_forward"]
    assert record["overhead"]["ms"] == pytest.approx(overhead)
    assert record["overhead"]["percent_of_distillation"] == pytest.approx(100 * overhead / medians["distillation"])
    paired = record["overhead"]["paired_percent"]
    assert paired["repeats"] == 2 and paired["min"] <= paired["median"] <= paired["max"] < 100
    assert record["targets"]["paired_overhead_le_5_percent"] == (paired["median"] <= 5.0)

    memory = record["memory"]
    assert memory["student_only"]["peak_bytes"] > 0 and memory["distillation"]["peak_bytes"] > 0
    assert memory["teacher_weight_bytes"] > 1_000_000  # the shapes U-Net-R18 teacher: 14.3 M float32 parameters
    # on the CPU the teacher's weights are resident in both phases: they are not added to the student's peak
    assert memory["ratio"] == pytest.approx(memory["distillation"]["peak_bytes"] / memory["student_only"]["peak_bytes"])

    checks = record["non_finite_checks"]
    for name in ("loss_per_step", "gradients_per_step", "weights_and_statistics_per_validation"):
        assert checks[name]["repeats"] == 2 and checks[name]["median_ms"] > 0, name
    per_step = checks["loss_per_step"]["median_ms"] + checks["gradients_per_step"]["median_ms"]
    assert checks["per_step_percent_of_distillation"] == pytest.approx(100 * per_step / medians["distillation"])

    rows = record["losses"]["rows"]
    assert {row["loss"] for row in rows} == {name for name in loss_package.__all__ if name != "DistillationLoss"}
    assert len(record["losses"]["cases"]) == 7  # two logits sizes, five FPN levels
    assert any(row["loss"] == "ChannelWiseDivergence" and row.get("median_ms", 0) > 0 for row in rows)
    compared = [row for row in record["cwd_vs_reference"] if "ratio" in row]
    assert compared and all(row["ratio"] > 0 for row in compared)

    targets = record["targets"]
    assert targets["overhead_le_5_percent"] == (record["overhead"]["percent_of_distillation"] <= 5.0)
    assert targets["memory_ratio_le_1_10"] == (memory["ratio"] <= 1.10)
    assert set(targets["cwd_le_reference"]) == {row["case"] for row in compared}
    assert all(isinstance(value, bool) for value in targets["cwd_le_reference"].values())


def test_torchdistill_loss_equals_ours(bench_record):
    # torchdistill comes with `make install` (the bench extra): a missing peer fails here, it is not skipped
    _, record = bench_record
    result = record["peer"]
    assert "skipped" not in result, result.get("skipped")
    check = result["loss_check"]
    assert math.isfinite(check["ours_total"]) and check["ours_total"] > 0
    assert check["torchdistill_total"] == pytest.approx(check["ours_total"], rel=1e-5)
    assert set(check["terms"]) == {"cwd_logits"}
    term = check["terms"]["cwd_logits"]
    assert term["ours"] > 0 and term["torchdistill"] == pytest.approx(term["ours"], rel=1e-5)
    assert check["equal"] is True and record["targets"]["torchdistill_loss_equal"] is True
    assert result["step"]["median_ms"] > 0
    assert result["ratio_ours_to_torchdistill"] == pytest.approx(
        record["steps"]["distillation"]["median_ms"] / result["step"]["median_ms"]
    )


def test_a_record_is_never_overwritten_unless_asked(bench_record):
    from cwd_lightning.bench.harness import Options, run_benchmark

    path, record = bench_record
    before = path.read_bytes()
    options = Options(Path(record["config"]), repeats=1, warmup=0, out=path.parent, skip_peer=True, skip_losses=True,
                      extra_args=record["extra_args"])  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(path.parent.parent)
        _, second = run_benchmark(options)
    assert second != path and second.name.startswith(path.stem + ".") and path.read_bytes() == before
