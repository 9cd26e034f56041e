"""Pinned short runs: what a refactoring must leave bit for bit unchanged.

``python scripts/pinned_runs.py record`` trains a fixed set of short runs through the CLI (a segmentation and a
detection teacher, then CWD on the logits, CWD on FPN levels, the holistic and MGD methods, CWD from a teacher
cache and an interrupted-then-resumed CWD run) on a small generated ``shapes`` set and writes, per run, every
value of its ``metrics.csv`` and a sha256 of every tensor of its final checkpoint (student and distiller) to
``scripts/pinned_runs.json``. ``python scripts/pinned_runs.py check`` runs the same set again and lists every
value and tensor that differs from the record (exit 1), or says that all are bit-identical.

Floating-point results depend on the CPU's instruction set and the thread count, so a record is compared on the
machine kind it was written on (the record names the CPU); ``--steps`` and ``--only`` shrink the set for a smoke
check (compare such a record only with one written with the same options).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from cwd_lightning.runs.provenance import cpu_model

REPO = Path(__file__).resolve().parents[1]
RECORD = Path(__file__).with_suffix(".json")
#: metrics that measure time, not what the run computes
VOLATILE = ("seconds", "time")


def data_args(root: Path) -> list[str]:
    """A 64-image shapes set at the real image size (64×64), batch 16, no progress bar, no monitors."""
    return [
        "--data.init_args.root", str(root), "--data.init_args.shapes.num_train", "64",
        "--data.init_args.shapes.num_val", "16", "--data.init_args.num_workers", "0",
        "--trainer.enable_progress_bar", "false", "--trainer.callbacks", "[]",
    ]  # fmt: skip


def schedule(steps: int) -> list[str]:
    return ["--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(max(1, steps // 3)),
            "--trainer.log_every_n_steps", "1"]  # fmt: skip


def cache_args(views: int, folder: Path) -> list[str]:
    """The teacher-cache switches (their spelling is the one thing a redesign may change here)."""
    import inspect

    from cwd_lightning.distill.module import DistillationModule

    if "teacher_cache" in inspect.signature(DistillationModule).parameters:
        return ["--model.teacher_cache.views", str(views), "--model.teacher_cache.folder", str(folder)]
    return ["--model.teacher_cache_views", str(views), "--model.teacher_cache_dir", str(folder)]


def runs(steps: int, data: Path, work: Path) -> list[tuple[str, list[list[str]]]]:
    """(name, [CLI argument lists run one after the other in that run's folder])."""
    seg_teacher = ["--model.teacher_checkpoint", str(work / "runs" / "seg_teacher" / "last.ckpt")]
    det_teacher = ["--model.teacher_checkpoint", str(work / "runs" / "det_teacher" / "last.ckpt")]
    cwd = ["--config", str(REPO / "experiments" / "shapes_cwd.yaml"), *seg_teacher]
    half = max(1, steps // 2)
    return [
        ("seg_teacher", [["--config", str(REPO / "experiments" / "shapes_teacher.yaml"), *schedule(steps)]]),
        ("det_teacher", [["--config", str(REPO / "experiments" / "shapes_det_teacher.yaml"), *schedule(steps)]]),
        ("cwd", [[*cwd, *schedule(steps)]]),
        ("det_cwd", [["--config", str(REPO / "experiments" / "shapes_det_cwd.yaml"), *det_teacher, *schedule(steps)]]),
        (
            "holistic",
            [
                [
                    "--config",
                    str(REPO / "experiments" / "methods" / "shapes_holistic_logits.yaml"),
                    *seg_teacher,
                    *schedule(steps),
                ]
            ],
        ),
        (
            "mgd",
            [
                [
                    "--config",
                    str(REPO / "experiments" / "methods" / "shapes_mgd_logits.yaml"),
                    *seg_teacher,
                    *schedule(steps),
                ]
            ],
        ),
        ("cwd_cached", [[*cwd, *schedule(steps), *cache_args(2, work / "cache")]]),
        # poly, so that the resume may continue past the first run's max_steps
        (
            "cwd_resumed",
            [
                [*cwd, *schedule(half), "--model.lr_schedule", "poly"],
                [*cwd, *schedule(steps), "--model.lr_schedule", "poly", "--ckpt_path", "last"],
            ],
        ),
    ]


def fit(arguments: list[str], name: str, work: Path) -> None:
    command = [sys.executable, "-m", "cwd_lightning", "fit", *arguments, "--experiment", name,
               "--runs_root", str(work / "runs")]  # fmt: skip
    environment = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1",
                   "XDG_CACHE_HOME": str(work / "xdg")}  # fmt: skip
    environment.pop("WANDB_SERVICE", None)
    result = subprocess.run(command, cwd=work, env=environment, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{name}: {' '.join(command[3:])} failed:\n{result.stderr[-4000:]}")


def measure(run_dir: Path) -> dict:
    """Every non-volatile metrics.csv value (as written) and the sha256 of every tensor of last.ckpt."""
    with open(run_dir / "metrics.csv", newline="") as handle:
        rows = [
            {key: value for key, value in row.items() if value and not any(word in key for word in VOLATILE)}
            for row in csv.DictReader(handle)
        ]
    checkpoint = torch.load(run_dir / "last.ckpt", map_location="cpu", weights_only=True)
    tensors = {
        key: hashlib.sha256(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()[:16]
        for key, tensor in sorted(checkpoint["state_dict"].items())
        if tensor.numel()
    }
    # rows logged at the same step may be written in another order: compare them sorted
    rows = sorted((row for row in rows if len(row) > 2), key=lambda row: (float(row.get("step", -1)), json.dumps(row)))
    return {"metrics": rows, "tensors": tensors}


def record_set(steps: int, only: list[str] | None, work: Path) -> dict:
    data = work / "shapes"
    measured = {}
    for name, calls in runs(steps, data, work):
        if only and name not in only and name not in ("seg_teacher", "det_teacher"):
            continue
        if only and name == "det_teacher" and "det_cwd" not in only:
            continue
        for arguments in calls:
            fit([*arguments, *data_args(data)], name, work)
        measured[name] = measure(work / "runs" / name)
        print(f"{name}: {len(measured[name]['metrics'])} metric rows, {len(measured[name]['tensors'])} tensors",
              flush=True)  # fmt: skip
    return {
        "machine": f"{cpu_model()}, {os.cpu_count()} cores",
        "platform": platform.platform(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "steps": steps,
        "only": only,
        "runs": measured,
    }


def differences(recorded: dict, now: dict) -> list[str]:
    found = []
    for name, expected in recorded["runs"].items():
        got = now["runs"].get(name)
        if got is None:
            found.append(f"{name}: not run")
            continue
        if len(got["metrics"]) != len(expected["metrics"]):
            found.append(f"{name}: {len(got['metrics'])} metric rows, recorded {len(expected['metrics'])}")
        for index, (row, old) in enumerate(zip(got["metrics"], expected["metrics"], strict=False)):
            for key in sorted(set(row) | set(old)):
                if row.get(key) != old.get(key):
                    found.append(f"{name}: metrics row {index} {key}: {row.get(key)} (recorded {old.get(key)})")
        for key in sorted(set(got["tensors"]) | set(expected["tensors"])):
            if got["tensors"].get(key) != expected["tensors"].get(key):
                found.append(
                    f"{name}: tensor {key}: {got['tensors'].get(key)} (recorded {expected['tensors'].get(key)})"
                )
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("record", "check"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--only", nargs="+", help="only these runs (their teachers are trained too)")
    parser.add_argument("--record", type=Path, default=RECORD)
    parser.add_argument("--work", type=Path, help="folder for data and runs (default: a temporary one)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pinned_runs_") as scratch:
        work = args.work or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        now = record_set(args.steps, args.only, work)
    if args.mode == "record":
        args.record.write_text(json.dumps(now, indent=1) + "\n")
        print(f"wrote {args.record}")
        return 0
    recorded = json.loads(args.record.read_text())
    if (recorded["steps"], recorded["only"]) != (now["steps"], now["only"]):
        raise SystemExit(f"{args.record} was written with --steps {recorded['steps']} --only {recorded['only']}")
    found = differences(recorded, now)
    if recorded["machine"] != now["machine"]:
        print(f"note: recorded on {recorded['machine']}, checked on {now['machine']}")
    if found:
        print(f"{len(found)} difference(s):\n  " + "\n  ".join(found[:50]))
        return 1
    total = sum(len(run["metrics"]) for run in now["runs"].values())
    tensors = sum(len(run["tensors"]) for run in now["runs"].values())
    print(f"bit-identical: {len(now['runs'])} runs, {total} metric rows, {tensors} tensors")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
