"""Read finished runs from ``runs/<EXP>/`` (no network): metrics, config, models, a validation batch."""

from __future__ import annotations

import csv
import importlib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from cwd_lightning.models.pretrained import without_pretrained
from cwd_lightning.models.weights import read_weights
from cwd_lightning.runs.identity import identity_digest
from cwd_lightning.safe_load import load_weights_only
from cwd_lightning.tasks import monitored_metric


@dataclass
class Run:
    """One run folder: its resolved config and its metrics.csv rows."""

    path: Path
    config: dict[str, Any]
    rows: list[dict[str, str]] = field(repr=False)
    #: whether another run found with it names this run's checkpoint as its teacher (``find_runs``)
    teaches: bool = False

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def group(self) -> str:
        """The runs it compares with: its config's ``group`` (the W&B group), else its own name."""
        return self.config.get("group") or self.name

    @property
    def role(self) -> str:
        """``distilled`` (it has terms), ``teacher`` (another run distils from it) or ``student``."""
        if self.config["model"].get("terms"):
            return "distilled"
        return "teacher" if self.teaches else "student"

    @property
    def metric(self) -> str:
        """The validation metric that picks the run's best checkpoint (its task's)."""
        return monitored_metric(self.config["model"]["task"])

    @property
    def finished(self) -> bool:
        """Trained to its ``max_steps`` or stopped by its ``EarlyStopping``: a run still going, or one set aside
        by a sweep, is not."""
        steps = [int(row["step"]) for row in self.rows if row.get("step")]
        max_steps = (self.config.get("trainer") or {}).get("max_steps")
        reached = bool(steps) and (max_steps in (None, -1) or max(steps) + 1 >= max_steps)
        return (reached or self.stopped_early) and ".interrupted" not in self.name

    @cached_property
    def stopped_early(self) -> bool:
        """Its ``EarlyStopping`` callback ended it: the callback's state in ``last.ckpt`` (saved after the
        callback decided) counts as many validations without improvement as its patience allows. Cached: it
        reads the whole checkpoint, and ``finished`` asks first."""
        callbacks = (self.config.get("trainer") or {}).get("callbacks") or []
        if not any(str(spec.get("class_path", "")).endswith(".EarlyStopping") for spec in callbacks
                   if isinstance(spec, dict)) or not (self.path / "last.ckpt").is_file():  # fmt: skip
            return False
        states = load_weights_only(self.path / "last.ckpt", "run checkpoint").get("callbacks") or {}
        return any(key.startswith("EarlyStopping") and state["wait_count"] >= state["patience"]
                   for key, state in states.items())  # fmt: skip

    def series(self, key: str) -> tuple[list[int], list[float]]:
        points = [(int(row["step"]), float(row[key])) for row in self.rows if row.get(key)]
        return [s for s, _ in points], [v for _, v in points]

    def best(self, key: str | None = None) -> float | None:
        values = self.series(key or self.metric)[1]
        return max(values) if values else None

    def final(self, key: str | None = None) -> float | None:
        values = self.series(key or self.metric)[1]
        return values[-1] if values else None

    def last_values(self, prefix: str) -> dict[str, float]:
        """The last logged value of every column starting with ``prefix`` (e.g. per-class IoU)."""
        found: dict[str, float] = {}
        for row in self.rows:
            for key, value in row.items():
                if key.startswith(prefix) and value:
                    found[key[len(prefix) :]] = float(value)
        return found

    def network(self, side: str = "student") -> str:
        spec = self.config["model"].get(side) or {}
        args = spec.get("init_args", {})
        arch = args.get("arch", spec.get("class_path", "?").rsplit(".", 1)[-1])
        encoder = args.get("encoder_name") or args.get("backbone")
        return f"{arch}-{encoder}" if encoder else arch

    def checkpoint(self, name: str = "best") -> Path:
        """``best``/``last`` of this run, or any other .ckpt path given as is."""
        return self.path / f"{name}.ckpt" if name in ("best", "last") else Path(name)


def load_run(path: str | Path) -> Run:
    path = Path(path)
    config_path, metrics_path = path / "config.yaml", path / "metrics.csv"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: {path} is not a run folder")
    rows: list[dict[str, str]] = []
    if metrics_path.is_file():
        with open(metrics_path, newline="") as handle:
            rows = list(csv.DictReader(handle))
    return Run(path, yaml.safe_load(config_path.read_text()), rows)


def find_runs(root: str | Path = "runs", recursive: bool = False) -> list[Run]:
    """The run folders directly under ``root`` (or at any depth, e.g. the sweeps' ``runs/tables/...``); a run
    whose checkpoint another of them names as ``teacher_checkpoint`` is marked as a teacher."""
    pattern = "**/config.yaml" if recursive else "*/config.yaml"
    runs = [load_run(p.parent) for p in sorted(Path(root).glob(pattern))]
    teachers = {Path(str(run.config["model"].get("teacher_checkpoint"))).resolve().parent for run in runs
                if run.config["model"].get("teacher_checkpoint")}  # fmt: skip
    for run in runs:
        run.teaches = run.path.resolve() in teachers
    return runs


def repeats_key(run: Run) -> str:
    """Runs with the same key differ only by seed, name or folder (``runs/identity.py``)."""
    return identity_digest(run.config)


def build(spec: dict[str, Any]) -> nn.Module:
    """Instantiate ``{class_path, init_args}`` as LightningCLI writes it."""
    module_name, _, attribute = spec["class_path"].rpartition(".")
    return getattr(importlib.import_module(module_name), attribute)(**spec.get("init_args", {}))


def load_student(run: Run, checkpoint: str = "best") -> nn.Module:
    """The run's trained network (for a teacher run: the teacher), eval mode, on the CPU; built without
    pretrained weights (the checkpoint replaces them), so it loads offline."""
    model = build(without_pretrained(run.config["model"]["student"]))
    model.load_state_dict(read_weights(run.checkpoint(checkpoint), "run checkpoint"))
    return model.eval()


def validation_batch(run: Run, count: int = 8, root: str | None = None) -> Any:
    """The first ``count`` validation samples of the run's data, transformed as in validation."""
    spec = {**run.config["data"], "init_args": {**run.config["data"]["init_args"], "num_workers": 0}}
    if root is not None:
        spec["init_args"]["root"] = root
    datamodule = build(spec)
    datamodule.prepare_data()
    datamodule.setup("validate")
    samples = [datamodule.val_set[index] for index in range(min(count, len(datamodule.val_set)))]
    return tuple(torch.stack(field) for field in zip(*samples, strict=True))
