"""Shared fixtures: tiny models and tiny data in the real formats; nothing is downloaded."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("WANDB_SILENT", "true")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_shapes(tmp_path_factory) -> Path:
    """A small generated `shapes` dataset (VOC layout), shared by the tests of a session."""
    from cwd_lightning.data.shapes import ShapesSpec, generate_shapes

    root = tmp_path_factory.mktemp("data") / "shapes"
    return generate_shapes(root, ShapesSpec(num_train=24, num_val=8, image_size=32, seed=1))


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m cwd_lightning ...`` in a fresh process, W&B offline, no hub access."""
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    # a W&B service started by this pytest process (in-process fits) must not be shared with the command,
    # as a user's shell would not: a killed run's id would stay "in use" in it and its resume be refused
    env.pop("WANDB_SERVICE", None)
    return subprocess.run([sys.executable, "-m", "cwd_lightning", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip


def tiny_overrides(data_root: Path, steps: int) -> list[str]:
    """Shrink an experiment to a few steps on the tiny dataset (32×32, batch 4)."""
    return [
        "--trainer.max_steps", str(steps), "--trainer.val_check_interval", "2",
        "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
        "--data.init_args.root", str(data_root), "--data.init_args.shapes", "null",
        "--data.init_args.crop_size", "32", "--data.init_args.base_size", "32",
        "--data.init_args.batch_size", "4", "--data.init_args.num_workers", "0",
        "--model.task.init_args.example_size", "32",
    ]  # fmt: skip


def tiny_cwd_fit(teacher_run, data_root: Path, runs: Path, experiment: str, steps: int) -> list[str]:
    """``fit`` of shapes_cwd shrunk by ``tiny_overrides``, distilled from ``teacher_run`` (poly schedule, so
    a resume may extend it), into ``runs/<experiment>``."""
    _, teacher_dir, _, _ = teacher_run
    return [
        "fit", "--config", str(REPO / "experiments" / "shapes_cwd.yaml"), "--experiment", experiment,
        "--runs_root", str(runs), "--model.teacher", str(REPO / "experiments" / "common" / "shapes_student_net.yaml"),
        "--model.teacher_checkpoint", str(teacher_dir / "best.ckpt"), "--model.lr_schedule", "poly",
        *tiny_overrides(data_root, steps),
    ]  # fmt: skip


@pytest.fixture(scope="session")
def teacher_run(tiny_shapes, tmp_path_factory):
    """A tiny teacher run (the PSPNet-R18 of shapes_student) through the CLI, fit for 4 steps."""
    work = tmp_path_factory.mktemp("work")
    # poly schedule: the resume test extends max_steps, which one-cycle (fixed total) does not allow
    args = ["fit", "--config", str(REPO / "experiments" / "shapes_student.yaml"), "--experiment", "tiny_teacher",
            "--runs_root", str(work / "runs"), "--model.lr_schedule", "poly",
            *tiny_overrides(tiny_shapes, 4)]  # fmt: skip
    result = run_cli(*args, cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    return work, work / "runs" / "tiny_teacher", args, result


@pytest.fixture(scope="session")
def cwd_run(teacher_run, tiny_shapes):
    """A tiny shapes_cwd run distilled from ``teacher_run`` (2 steps), with the W&B monitors on."""
    work, teacher_dir, _, _ = teacher_run
    config = REPO / "experiments" / "shapes_cwd.yaml"
    result = run_cli("fit", "--config", str(config), "--runs_root", str(work / "runs"),
                     "--model.teacher", str(REPO / "experiments" / "common" / "shapes_student_net.yaml"),
                     "--model.teacher_checkpoint", str(teacher_dir / "best.ckpt"),
                     *tiny_overrides(tiny_shapes, 2), cwd=work)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return work, work / "runs" / "shapes_cwd"
