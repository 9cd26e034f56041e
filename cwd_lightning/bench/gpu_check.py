"""``python -m cwd_lightning.bench.gpu_check [--dry-run]`` (``make gpu-check``): everything a GPU changes, in one
command of a few minutes, so that a GPU lent for a short while is used at once and the GPU path cannot rot.

1. ``make bench`` of ``cityscapes_cwd`` at its real sizes (512×512 crops, batch 8, bf16 autocast, channels-last,
   the student compiled with ``inductor``; every loss at the paper's sizes; torchdistill beside), on generated
   ``shapes`` images at 512×512 (no Cityscapes needed) and random teacher weights where its checkpoint is missing;
2. a CUDA fit of ``shapes_cwd`` from a teacher cache in ``16-mixed`` (its gradient scaler), a few hundred steps,
   then a resume of it that must continue from its last step;
3. the export of that student, its ``torch.export`` program run on the GPU against the PyTorch student.

Writes ``benchmarks/gpu_check-<hardware>.json`` (every stage: ok or its error, its seconds, its figures) and
``…log`` (every command's output), besides the bench record. ``--dry-run`` runs the same stages on the CPU at tiny
sizes (an fp32 bench without the loss and peer parts, a ``bf16-mixed`` fit as Lightning has no ``16-mixed`` on
the CPU, ``aot_eager`` instead of ``inductor``), as the tests do.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from cwd_lightning.analysis.runs import build
from cwd_lightning.bench.harness import Options, run_benchmark
from cwd_lightning.models.pretrained import without_pretrained
from cwd_lightning.runs import provenance
from cwd_lightning.safe_load import load_weights_only

REPO = Path(__file__).resolve().parents[2]


def sizes(dry_run: bool) -> dict:
    """The GPU check's real sizes, or the dry run's tiny ones (an fp32 bench: bf16 convolutions crawl on CPUs without
    bf16 instructions; the loss and peer benchmarks are left to ``make bench``'s own tests)."""
    if dry_run:
        return {"device": "cpu", "image": 32, "batch": 2, "images": 8, "repeats": 1, "warmup": 1, "steps": 4,
                "more_steps": 2, "bench_precision": "32", "precision": "bf16-mixed", "compile": "aot_eager",
                "skip_losses_and_peer": True}  # fmt: skip
    return {"device": "cuda", "image": 512, "batch": 8, "images": 64, "repeats": 20, "warmup": 5, "steps": 300,
            "more_steps": 50, "bench_precision": "bf16-mixed", "precision": "16-mixed", "compile": "inductor",
            "skip_losses_and_peer": False}  # fmt: skip


def shapes_data(root: Path, image: int, images: int, batch: int) -> list[str]:
    """The experiment's data replaced by generated ``shapes`` images of ``image`` pixels (VOC layout)."""
    spec = f"{{num_train: {images}, num_val: {max(batch, 4)}, image_size: {image}, seed: 0}}"
    return ["--data.init_args.root", str(root), "--data.init_args.layout", "voc", "--data.init_args.shapes", spec,
            "--data.init_args.crop_size", str(image), "--data.init_args.base_size", str(image),
            "--data.init_args.batch_size", str(batch), "--data.init_args.val_batch_size", str(batch),
            "--data.init_args.num_workers", "2"]  # fmt: skip


def bench_stage(size: dict, scratch: Path, out: Path) -> dict:
    options = Options(
        experiment=REPO / "experiments" / "cityscapes_cwd.yaml", repeats=size["repeats"], warmup=size["warmup"],
        out=out, device=size["device"], precision=size["bench_precision"], overwrite=True,
        skip_losses=size["skip_losses_and_peer"], skip_peer=size["skip_losses_and_peer"],
        extra_args=[*shapes_data(scratch / "shapes_bench", size["image"], size["images"], size["batch"]),
                    "--model.channels_last", "true", "--model.compile_student", size["compile"],
                    "--model.task.init_args.example_size", str(size["image"]),
                    "--model.teacher.init_args.encoder_weights", "null",  # no download: random where none is here
                    "--model.student.init_args.encoder_weights", "null"],
    )  # fmt: skip
    record, path = run_benchmark(options)
    steps = {name: round(step["median_ms"], 2) for name, step in record["steps"].items()}
    return {"record": str(path), "median_ms": steps, "cached_to_student_only": record["cached_to_student_only"],
            "overhead_percent": record["overhead"]["percent_of_distillation"],
            "memory_ratio": record["memory"]["ratio"], "teacher_weights": record["teacher_weights"]}  # fmt: skip


def _run(args: list[str], log: Path, cwd: Path | None = None) -> None:
    """``python -m <args>``, its output appended to ``log``; an error names the command."""
    with open(log, "a") as handle:
        handle.write(f"\n$ python -m {' '.join(args)}\n")
        handle.flush()
        environment = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline"}
        done = subprocess.run([sys.executable, "-m", *args], cwd=cwd, stdout=handle, stderr=subprocess.STDOUT,
                              env=environment)  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"python -m {' '.join(args[:2])} … exited {done.returncode} (see the log)")


def fit_stage(size: dict, scratch: Path, log: Path) -> dict:
    """A cached ``16-mixed`` fit, then its resume for ``more_steps`` more; the resume must start where it ended."""
    teacher = scratch / "random_teacher.pt"  # the experiment's own teacher network, random weights
    torch.manual_seed(0)
    experiment = REPO / "experiments" / "shapes_cwd.yaml"
    network = yaml.safe_load(experiment.read_text())["model"]["teacher"]  # a file beside the experiment
    spec = yaml.safe_load((experiment.parent / network).read_text())
    torch.save(build(without_pretrained(spec)).state_dict(), teacher)
    accelerator = "cpu" if size["device"] == "cpu" else "gpu"
    common = [*shapes_data(scratch / "shapes_fit", 64, max(64, size["images"]), 16 if accelerator == "gpu" else 4),
              "--runs_root", str(scratch / "runs"), "--trainer.accelerator", accelerator, "--trainer.devices", "1",
              "--trainer.enable_progress_bar", "false", "--trainer.callbacks", "[]"]  # fmt: skip
    steps, interval = size["steps"], max(2, size["steps"] // 3)
    started = time.perf_counter()
    _run(["cwd_lightning", "fit", "--config", str(experiment),
          "--experiment", "gpu_check",
          "--model.teacher_checkpoint", str(teacher), "--model.lr_schedule", "poly",
          "--model.teacher_cache.views", "2", "--model.teacher_cache.folder", str(scratch / "cache"),
          "--trainer.precision", size["precision"], "--trainer.max_steps", str(steps),
          "--trainer.val_check_interval", str(interval), *common], log, scratch)  # fmt: skip
    fit_seconds = time.perf_counter() - started
    run = scratch / "runs" / "gpu_check"
    started = time.perf_counter()
    _run(["cwd_lightning", "fit", "--config", str(run / "config.yaml"), "--ckpt_path", "last", "--trainer.max_steps",
          str(steps + size["more_steps"])], log, scratch)  # fmt: skip
    resumed = load_weights_only(run / "last.ckpt", "checkpoint")
    if resumed["global_step"] != steps + size["more_steps"]:
        raise RuntimeError(f"the resume ended at step {resumed['global_step']}, not {steps + size['more_steps']}")
    scaler = resumed.get("MixedPrecision")  # Lightning saves the 16-mixed gradient scaler's state under this key
    if size["device"] == "cuda" and not scaler:  # on the CPU, Lightning's 16-mixed runs without a scaler
        raise RuntimeError("a 16-mixed checkpoint without its gradient scaler's state")
    return {"steps": steps, "fit_seconds": round(fit_seconds, 1), "resumed_to": resumed["global_step"],
            "resume_seconds": round(time.perf_counter() - started, 1), "precision": size["precision"],
            "loss_scale_at_the_end": (scaler or {}).get("scale"), "run": str(run)}  # fmt: skip


def export_stage(size: dict, scratch: Path, log: Path) -> dict:
    """Export the fitted student; run its ``torch.export`` program on the check's device against the student."""
    from cwd_lightning.export import load_student

    out = scratch / "export"
    _run(["cwd_lightning.export", str(scratch / "runs" / "gpu_check"), str(out), "--checkpoint", "last"], log)
    device = torch.device(size["device"])
    student = load_student(out).to(device)
    program = torch.export.load(out / "student.pt2").module().to(device)
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        expected, got = student(images), program(images)
    difference = float((got - expected).abs().max())
    if not difference <= 1e-3 * max(1.0, float(expected.abs().max())):
        raise RuntimeError(f"the exported program differs from the student on {device} by {difference:g}")
    return {"device": str(device), "max_abs_difference": difference, "files": sorted(p.name for p in out.iterdir())}


def run_check(dry_run: bool, out: Path) -> tuple[dict, Path]:
    """Every stage, each recorded as ok (with its figures) or failed (with its error); the record's path."""
    size = sizes(dry_run)
    if not dry_run and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device: run on a GPU, or --dry-run for the CPU rehearsal")
    out.mkdir(parents=True, exist_ok=True)
    hardware = provenance.hardware(torch.device(size["device"]))
    stem = f"gpu_check-{provenance.slug(hardware)}{'-dry-run' if dry_run else ''}"
    log = out / f"{stem}.log"
    log.write_text(f"{stem}: {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    git = dict(zip(("commit", "dirty"), provenance.git_state(), strict=True))
    record: dict = {"hardware": hardware, "dry_run": dry_run, "sizes": size, "versions": provenance.versions(),
                    "git": git, "stages": {}}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="cwd_gpu_check_") as folder:
        scratch = Path(folder)
        stages: dict[str, Callable[[], dict]] = {
            "bench": lambda: bench_stage(size, scratch, out),
            "fit_and_resume": lambda: fit_stage(size, scratch, log),
            "export": lambda: export_stage(size, scratch, log),
        }
        for name, stage in stages.items():
            started = time.perf_counter()
            try:
                result = {"ok": True, **stage()}
            except Exception as error:  # record it and go on: one broken stage must not hide the others
                with open(log, "a") as handle:
                    handle.write(f"\n{name} failed:\n{traceback.format_exc()}")
                result = {"ok": False, "error": f"{type(error).__name__}: {error}"[:1000]}
            record["stages"][name] = {**result, "seconds": round(time.perf_counter() - started, 1)}
            print(f"[gpu-check] {name}: {'ok' if result['ok'] else 'FAILED ' + result['error']}", flush=True)
    path = out / f"{stem}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    return record, path


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m cwd_lightning.bench.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--dry-run", action="store_true", help="the same stages on the CPU at tiny sizes")
    parser.add_argument("--out", type=Path, default=Path("benchmarks"))
    args = parser.parse_args(argv)
    record, path = run_check(args.dry_run, args.out)
    print(f"wrote {path} (and {path.with_suffix('.log').name})")
    if not all(stage["ok"] for stage in record["stages"].values()):
        raise SystemExit(1)
    return path


if __name__ == "__main__":
    main()
