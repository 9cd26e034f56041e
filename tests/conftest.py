"""Fixtures shared by the test modules: tiny data in the real formats, tiny runs through the CLI and teacher
weights files; nothing is downloaded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO, run_cli, tiny_overrides, tiny_segmenter

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def tiny_shapes(tmp_path_factory) -> Path:
    """A small generated `shapes` dataset (VOC layout), shared by the tests of a session."""
    from cwd_lightning.data import ShapesSpec, generate_shapes

    root = tmp_path_factory.mktemp("data") / "shapes"
    return generate_shapes(root, ShapesSpec(num_train=24, num_val=8, image_size=32, seed=1))


@pytest.fixture()
def teacher_file(tmp_path) -> Path:
    """An FPN-R18 teacher (random weights, seed 0) as a state_dict file."""
    return _saved_segmenter(tmp_path / "teacher.pt", "FPN", "resnet18")


def _saved_segmenter(path: Path, arch: str, encoder: str) -> Path:
    """A segmenter with random weights drawn after seed 0, its state_dict saved at ``path``."""
    torch.manual_seed(0)
    torch.save(tiny_segmenter(arch, encoder).state_dict(), path)
    return path


@pytest.fixture(scope="session")
def shapes_teacher(tmp_path_factory) -> Path:
    """A PSPNet-R34 teacher (the `shapes` teacher network, random weights) as a state_dict file."""
    return _saved_segmenter(tmp_path_factory.mktemp("teachers") / "shapes_teacher.pt", "PSPNet", "resnet34")


@pytest.fixture(scope="session")
def unet_teacher(tmp_path_factory) -> Path:
    """A U-Net-R18 teacher (a second teacher of another architecture, random weights) as a state_dict file."""
    return _saved_segmenter(tmp_path_factory.mktemp("teachers") / "unet.pt", "Unet", "resnet18")


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
