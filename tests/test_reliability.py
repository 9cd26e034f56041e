"""Nothing lost, nothing silent: exact resume after SIGKILL, refusals that change nothing on disk, no
diverged model saved."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import torch

from cwd_lightning.safe_load import load_weights_only
from tests.conftest import REPO, run_cli, tiny_overrides

CWD = str(REPO / "experiments" / "shapes_cwd.yaml")


def _cwd_args(teacher_run, tiny_shapes, runs: Path, experiment: str, steps: int) -> list[str]:
    _, teacher_dir, _, _ = teacher_run
    return [
        "fit", "--config", CWD, "--experiment", experiment, "--runs_root", str(runs),
        "--model.teacher", str(REPO / "experiments" / "common" / "shapes_student_net.yaml"),
        "--model.teacher_checkpoint", str(teacher_dir / "best.ckpt"), "--model.lr_schedule", "poly",
        *tiny_overrides(tiny_shapes, steps), "--trainer.val_check_interval", "4",
    ]  # fmt: skip


def _student(path: Path) -> dict[str, torch.Tensor]:
    state = load_weights_only(path, "checkpoint")["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("student.")}


def _train_steps(run_dir: Path) -> list[int]:
    with open(run_dir / "metrics.csv", newline="") as handle:
        return [int(float(row["step"])) for row in csv.DictReader(handle) if row.get("train/loss")]


def test_sigkill_mid_epoch_then_resume_gives_the_uninterrupted_student(teacher_run, tiny_shapes, tmp_path, monkeypatch):
    """24 images, batch 4: 6 steps an epoch; checkpoints at steps 4 and 8; the process is killed as step 9
    starts (epoch 1, third batch), resumed from last.ckpt (step 8, mid-epoch) and run to step 11."""
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # the killer callback lives in tests/
    runs = tmp_path / "runs"
    straight = run_cli(*_cwd_args(teacher_run, tiny_shapes, runs, "straight", 11), "--trainer.callbacks", "[]",
                       cwd=tmp_path)  # fmt: skip
    assert straight.returncode == 0, straight.stderr[-3000:]

    killer = '[{"class_path": "tests.process_killer.KillAtStep", "init_args": {"step": 9}}]'
    killed = run_cli(*_cwd_args(teacher_run, tiny_shapes, runs, "killed", 11), "--trainer.callbacks", killer,
                     cwd=tmp_path)  # fmt: skip
    assert killed.returncode == -9, (killed.returncode, killed.stderr[-2000:])
    run_dir = runs / "killed"
    assert load_weights_only(run_dir / "last.ckpt", "checkpoint")["global_step"] == 8
    run_id = (run_dir / "wandb_id").read_text().strip()

    resumed = run_cli("fit", "--config", str(run_dir / "config.yaml"), "--ckpt_path", "last",
                      "--trainer.callbacks", "[]", cwd=tmp_path)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    expected, got = _student(runs / "straight" / "last.ckpt"), _student(run_dir / "last.ckpt")
    assert expected.keys() == got.keys()
    different = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    steps = _train_steps(run_dir)
    assert sorted(steps) == _train_steps(runs / "straight") == list(range(11))
    assert not [s for s, n in Counter(steps).items() if n > 1]
    assert (run_dir / "wandb_id").read_text().strip() == run_id
    assert load_weights_only(run_dir / "last.ckpt", "checkpoint")["run_id"] == run_id
