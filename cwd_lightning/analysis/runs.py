"""Read finished runs from ``runs/<EXP>/`` (no network): metrics, config, models, a validation batch."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from cwd_lightning.distill.teacher import read_weights


@dataclass
class Run:
    """One run folder: its resolved config and its metrics.csv rows."""

    path: Path
    config: dict[str, Any]
    rows: list[dict[str, str]] = field(repr=False)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def role(self) -> str:
        if self.config["model"].get("terms"):
            return "distilled"
        return "teacher" if "teacher" in self.name else "student"

    @property
    def metric(self) -> str:
        """The task's headline validation metric logged by this run."""
        keys = set().union(*self.rows) if self.rows else set()
        return next((key for key in ("val/mIoU", "val/mAP") if key in keys), "val/loss_task")

    @property
    def finished(self) -> bool:
        """Trained to its ``max_steps``: a run still going, or one set aside by a sweep, is not."""
        steps = [int(row["step"]) for row in self.rows if row.get("step")]
        max_steps = (self.config.get("trainer") or {}).get("max_steps")
        reached = bool(steps) and (max_steps in (None, -1) or max(steps) + 1 >= max_steps)
        return reached and ".interrupted" not in self.name

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
    """The run folders directly under ``root`` (or at any depth, e.g. the sweeps' ``runs/tables/...``)."""
    pattern = "**/config.yaml" if recursive else "*/config.yaml"
    return [load_run(p.parent) for p in sorted(Path(root).glob(pattern))]


#: config keys that name or place a run, or pick its seed: runs that differ only in these are repeats
_NOT_THE_RECIPE = ("seed_everything", "experiment", "runs_root", "ckpt_path", "config")


def recipe_key(run: Run) -> str:
    """The run's config without its name, folder, seed and progress-bar settings, as canonical JSON."""
    config = {k: v for k, v in run.config.items() if k not in _NOT_THE_RECIPE}
    trainer = {
        k: v for k, v in (config.get("trainer") or {}).items() if k not in ("default_root_dir", "enable_progress_bar")
    }
    return json.dumps({**config, "trainer": trainer}, sort_keys=True, default=str)


def build(spec: dict[str, Any]) -> nn.Module:
    """Instantiate ``{class_path, init_args}`` as LightningCLI writes it."""
    import importlib

    module_name, _, attribute = spec["class_path"].rpartition(".")
    return getattr(importlib.import_module(module_name), attribute)(**spec.get("init_args", {}))


def load_student(run: Run, checkpoint: str = "best") -> nn.Module:
    """The run's trained network (for a teacher run: the teacher), eval mode, on the CPU; built without
    pretrained weights (the checkpoint replaces them), so it loads offline."""
    from cwd_lightning.models.pretrained import without_pretrained

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
