"""`make bench` end to end on `shapes_cwd`: the JSON record, torchdistill's loss equal to ours, records never
overwritten unless asked."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from cwd_lightning import losses as loss_package
from cwd_lightning.bench.__main__ import main
from cwd_lightning.runs import provenance
from tests.helpers import REPO

pytestmark = pytest.mark.slow  # subprocess fits of minutes: `make test-fast` leaves them out


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
    assert path.name == f"shapes_cwd-{provenance.slug(record['hardware'])}-partial.json"  # scaled loss sizes
    for key in ("experiment", "hardware", "versions", "git", "device", "precision", "batch_size", "input_size",
                "repeats", "warmup", "teacher_weights", "steps", "overhead", "memory", "losses", "cwd_vs_reference",
                "peer", "targets", "load_average"):  # fmt: skip
        assert key in record, key
    assert record["experiment"] == "shapes_cwd" and record["device"] == "cpu"
    assert record["teacher_weights"] == "random (checkpoint missing)"
    assert record["batch_size"] == 4 and record["input_size"] == [3, 32, 32] and record["repeats"] == 2
    assert {"torch", "lightning"} <= set(record["versions"]) and "commit" in record["git"]

    steps = record["steps"]
    assert set(steps) == {"student_only", "teacher_forward", "distillation", "distillation_from_cache",
                          "cache_read_in_loader_worker"}  # fmt: skip
    for step in steps.values():
        assert step["repeats"] == 2
        assert 0 < step["min_ms"] <= step["median_ms"] <= step["max_ms"] and step["iqr_ms"] >= 0
        assert step["images_per_s"] == pytest.approx(4 / (step["median_ms"] / 1000))
    medians = {name: step["median_ms"] for name, step in steps.items()}
    assert record["cached_to_student_only"] == pytest.approx(
        medians["distillation_from_cache"] / medians["student_only"]
    )
    assert record["targets"]["cached_le_1_03_student_only"] == (record["cached_to_student_only"] <= 1.03)
    effect = record["teacher_precision"]
    assert effect["32"]["tensors"]["segmentation_head.0[0]"]["cwd_to_fp32"] == 0.0  # the reference itself
    for precision in ("bf16", "16"):
        moved = effect[precision]["tensors"]["segmentation_head.0[0]"]
        assert effect[precision]["forward_ms"] > 0 and 0 < moved["cwd_to_fp32"] < 0.01, precision
        assert 0 < moved["max_abs_difference_relative"] < 0.1, precision
    overhead = medians["distillation"] - medians["student_only"] - medians["teacher_forward"]
    assert record["overhead"]["ms"] == pytest.approx(overhead)
    assert record["overhead"]["percent_of_distillation"] == pytest.approx(100 * overhead / medians["distillation"])
    paired = record["overhead"]["paired_percent"]
    assert paired["repeats"] == 2 and paired["min"] <= paired["median"] <= paired["max"] < 100
    assert record["targets"]["paired_overhead_le_5_percent"] == (paired["median"] <= 5.0)

    memory = record["memory"]
    assert memory["student_only"]["peak_bytes"] > 0 and memory["distillation"]["peak_bytes"] > 0
    assert memory["teacher_weight_bytes"] > 1_000_000  # the shapes PSPNet-R34 teacher: 1.55 M float32 parameters
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
    assert result["ours_step"]["median_ms"] > 0 and result["ratio_ours_to_torchdistill"] > 0  # paired, per repetition
    assert record["targets"]["paired_ours_to_torchdistill_le_1_00"] == (result["ratio_ours_to_torchdistill"] <= 1.0)


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


def test_the_gpu_check_rehearses_every_stage_on_the_cpu(tmp_path):
    """``make gpu-check --dry-run``: the bench of cityscapes_cwd (compiled student, channels-last), a cached 16-mixed
    fit and its resume, the export run against the student; so the GPU command cannot rot without a GPU."""
    from cwd_lightning.bench.gpu_check import main as gpu_check

    path = gpu_check(["--dry-run", "--out", str(tmp_path)])
    record = json.loads(path.read_text())
    assert record["dry_run"] and path.name.endswith("-dry-run.json") and path.with_suffix(".log").is_file()
    stages = record["stages"]
    assert list(stages) == ["bench", "fit_and_resume", "export"]
    assert all(stage["ok"] for stage in stages.values()), stages
    bench = json.loads(Path(stages["bench"]["record"]).read_text())
    assert bench["experiment"] == "cityscapes_cwd" and bench["input_size"] == [3, 32, 32]
    assert (
        "--model.compile_student" in bench["extra_args"] and bench["teacher_weights"] == "random (checkpoint missing)"
    )
    fit = stages["fit_and_resume"]
    assert fit["steps"] == 4 and fit["resumed_to"] == 6 and fit["precision"] == "bf16-mixed"
    assert stages["export"]["max_abs_difference"] < 1e-3 and "student.pt2" in stages["export"]["files"]
