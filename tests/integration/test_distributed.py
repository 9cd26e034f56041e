"""Two-process DDP on the CPU (gloo, subprocesses): one run record, validation equal to one process, gradient
accumulation, a teacher cache filled once; two torchrun nodes simulated on one box."""

from __future__ import annotations

import csv
import os
import re
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from cwd_lightning.safe_load import load_weights_only
from tests.helpers import run_cli, tiny_cwd_fit

pytestmark = pytest.mark.slow  # subprocess fits of minutes: `make test-fast` leaves them out


def _args(teacher_run, tiny_shapes, runs: Path, experiment: str, steps: int, *extra: str) -> list[str]:
    return [*tiny_cwd_fit(teacher_run, tiny_shapes, runs, experiment, steps), "--trainer.callbacks", "[]",
            "--trainer.accelerator", "cpu", *extra]  # fmt: skip


def _rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def ddp_runs(teacher_run, tiny_shapes, tmp_path_factory):
    """The same 4-step fit (batch 4 per process) with 1 process and with 2 DDP processes; validation of the
    8 val images every 2 steps (4 per rank under DDP, so no padding duplicates)."""
    runs = tmp_path_factory.mktemp("ddp") / "runs"
    single = run_cli(*_args(teacher_run, tiny_shapes, runs, "single", 4, "--trainer.devices", "1"), cwd=runs.parent)
    assert single.returncode == 0, single.stderr[-3000:]
    double = run_cli(*_args(teacher_run, tiny_shapes, runs, "ddp", 4, "--trainer.devices", "2",
                            "--trainer.strategy", "ddp"), cwd=runs.parent)  # fmt: skip
    return runs, single, double


def test_two_processes_write_one_run_record(ddp_runs):
    runs, _, double = ddp_runs
    assert double.returncode == 0, double.stderr[-3000:]
    run_dir = runs / "ddp"
    assert sorted(p.name for p in run_dir.glob("*.ckpt")) == ["best.ckpt", "last.ckpt", "last.prev.ckpt"]
    run_id = (run_dir / "wandb_id").read_text().strip()
    assert [p.name.rsplit("-", 1)[-1] for p in (run_dir / "wandb").glob("offline-run-*")] == [run_id]
    assert double.stdout.count("run folder:") == 1  # the end-of-fit summary, once (rank 0)
    assert "Traceback" not in double.stderr
    steps = [row["step"] for row in _rows(run_dir) if row.get("train/loss")]
    assert not [s for s, n in Counter(steps).items() if n > 1]  # one logger: each step once
    checkpoint = load_weights_only(run_dir / "last.ckpt", "checkpoint")
    assert checkpoint["global_step"] == 4 and checkpoint["run_id"] == run_id
    assert not any(key.startswith("teacher.") for key in checkpoint["state_dict"])  # never wrapped, never saved


def test_ddp_validation_equals_the_single_process_value_on_the_same_weights(ddp_runs, tmp_path):
    """Validate the 2-process run's best checkpoint with 1 and with 2 processes: metrics synchronised
    across ranks give the same mIoU as one process over all 8 images."""
    runs, _, double = ddp_runs
    assert double.returncode == 0, double.stderr[-3000:]
    config, best = runs / "ddp" / "config.yaml", runs / "ddp" / "best.ckpt"
    common = ["validate", "--config", str(config), "--runs_root", str(runs), "--ckpt_path", str(best),
              "--trainer.accelerator", "cpu"]  # fmt: skip
    one = run_cli(*common, "--trainer.devices", "1", cwd=tmp_path)
    two = run_cli(*common, "--trainer.devices", "2", "--trainer.strategy", "ddp", cwd=tmp_path)
    assert one.returncode == 0 and two.returncode == 0, (one.stderr[-2000:], two.stderr[-2000:])

    def miou(output: str) -> float:
        (value,) = re.findall(r"val/mIoU\W+([0-9]+\.[0-9]+(?:e-?[0-9]+)?)", output)
        return float(value)

    assert miou(two.stdout) == pytest.approx(miou(one.stdout), abs=1e-6)
    logged = [float(row["val/mIoU"]) for row in _rows(runs / "ddp") if row.get("val/mIoU")]
    assert any(abs(value - miou(one.stdout)) < 1e-6 for value in logged), logged  # what the DDP fit logged


def test_gradient_accumulation_keeps_the_validation_cadence_and_logs_each_step_once(teacher_run, tiny_shapes,
                                                                                    tmp_path):  # fmt: skip
    runs = tmp_path / "runs"
    result = run_cli(*_args(teacher_run, tiny_shapes, runs, "accumulated", 4, "--trainer.accumulate_grad_batches",
                            "2", "--trainer.limit_val_batches", "1"), cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _rows(runs / "accumulated")
    validated = [int(row["step"]) for row in rows if row.get("val/mIoU")]
    # after optimiser steps 2 and 4 (= every 4 micro-batches; logged at the last step's index, 1 and 3, as
    # without accumulation), not after every 2 micro-batches (0, 1, 2, 3)
    assert validated == [1, 3]
    assert len([row for row in rows if row.get("train/loss")]) == 4
    saved = yaml.safe_load((runs / "accumulated" / "config.yaml").read_text())["trainer"]
    assert saved["val_check_interval"] == 2  # as written: a resume from config.yaml keeps the cadence
    lr_steps = [row["step"] for row in rows if row.get("lr-AdamW")]
    assert lr_steps and len(lr_steps) == len(set(lr_steps))  # once per optimiser step
    assert {row.get("global_batch_size") for row in rows if row.get("global_batch_size")} == {"8.0"}


def test_ddp_with_a_teacher_cache_fills_it_once_and_every_rank_reads_it(teacher_run, tiny_shapes, tmp_path):
    runs, cache = tmp_path / "runs", tmp_path / "cache"
    extra = ["--trainer.devices", "2", "--trainer.strategy", "ddp", "--model.teacher_cache.views", "2",
             "--model.teacher_cache.folder", str(cache)]  # fmt: skip
    result = run_cli(*_args(teacher_run, tiny_shapes, runs, "cached", 4, *extra), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (folder,) = [p for p in cache.iterdir() if p.is_dir()]  # one cache, written by rank 0
    assert (folder / "cache.json").is_file() and len(list(folder.glob("*.npy"))) == 1
    stamp = (folder / "cache.json").stat().st_mtime_ns
    rows = _rows(runs / "cached")
    assert {row["teacher_cache/size_mib"] for row in rows if row.get("teacher_cache/size_mib")}
    # resumed (a longer poly schedule): the cache is found and read, not filled again
    resumed = run_cli("fit", "--config", str(runs / "cached" / "config.yaml"), "--ckpt_path", "last",
                      "--trainer.max_steps", "6", cwd=tmp_path)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (folder / "cache.json").stat().st_mtime_ns == stamp
    assert load_weights_only(runs / "cached" / "last.ckpt", "checkpoint")["global_step"] == 6


def _two_nodes(args: list[str], cwd: Path) -> list[subprocess.CompletedProcess]:
    """``args`` under two ``torchrun --nnodes 2`` launches on loopback, one process each (node ranks 0 and 1), as
    on two machines that share the run folder. Their output goes to files (a full pipe of one node must not stall
    the other in a collective); both are killed if they outlast the timeout."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("WANDB_SERVICE", None)
    outputs = [(cwd / f"node{rank}.out", cwd / f"node{rank}.err") for rank in (0, 1)]
    nodes = []
    for rank, (out, err) in enumerate(outputs):
        with open(out, "w") as stdout, open(err, "w") as stderr:
            nodes.append(subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
                                           "--nproc-per-node", "1", "--node-rank", str(rank), "--master-addr",
                                           "127.0.0.1", "--master-port", str(port), "-m", "cwd_lightning", *args,
                                           "--trainer.num_nodes", "2", "--trainer.devices", "1",
                                           "--trainer.strategy", "ddp"], cwd=cwd, env=env, stdout=stdout,
                                          stderr=stderr))  # fmt: skip
    try:
        for node in nodes:
            node.wait(timeout=600)
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    return [subprocess.CompletedProcess(node.args, node.returncode, out.read_text(), err.read_text())
            for node, (out, err) in zip(nodes, outputs, strict=True)]  # fmt: skip


def test_two_nodes_on_one_box_fit_write_one_run_record_and_resume(teacher_run, tiny_shapes, tmp_path):
    """Two torchrun nodes (gloo on loopback, one process each): one run folder, one W&B run, each step logged once,
    and a resume of both nodes continues it."""
    runs = tmp_path / "runs"
    nodes = _two_nodes(_args(teacher_run, tiny_shapes, runs, "nodes", 4), tmp_path)
    assert [node.returncode for node in nodes] == [0, 0], [node.stderr[-3000:] for node in nodes]
    run_dir = runs / "nodes"
    assert sorted(p.name for p in run_dir.glob("*.ckpt")) == ["best.ckpt", "last.ckpt", "last.prev.ckpt"]
    run_id = (run_dir / "wandb_id").read_text().strip()
    assert [p.name.rsplit("-", 1)[-1] for p in (run_dir / "wandb").glob("offline-run-*")] == [run_id]
    assert sum(node.stdout.count("run folder:") for node in nodes) == 1  # the end-of-fit summary, once
    steps = [row["step"] for row in _rows(run_dir) if row.get("train/loss")]
    assert len(steps) == 4 and len(set(steps)) == 4
    assert {row.get("global_batch_size") for row in _rows(run_dir) if row.get("global_batch_size")} == {"8.0"}

    resumed = _two_nodes(["fit", "--config", str(run_dir / "config.yaml"), "--ckpt_path", "last",
                          "--trainer.max_steps", "6"], tmp_path)  # fmt: skip
    assert [node.returncode for node in resumed] == [0, 0], [node.stderr[-3000:] for node in resumed]
    checkpoint = load_weights_only(run_dir / "last.ckpt", "checkpoint")
    assert checkpoint["global_step"] == 6 and checkpoint["run_id"] == run_id
    runs = [p.name.rsplit("-", 1)[-1] for p in (run_dir / "wandb").glob("offline-run-*")]
    assert runs and set(runs) == {run_id}  # the resume continues the same W&B run
    steps = [row["step"] for row in _rows(run_dir) if row.get("train/loss")]
    assert len(steps) == 6 and len(set(steps)) == 6
