"""A run's loggers: W&B (offline unless asked, grouped by the config's ``group``, continued under the run's id on
resume) and a ``metrics.csv`` that a resume appends to; the learning rate once per optimiser step."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

WANDB_PROJECT = "cwd_lightning"


def run_loggers(run_dir: Path, run_id: str, group: str | None, methods: list[str]) -> list[Any]:
    """W&B and CSV loggers of the run in ``run_dir``. ``group`` puts the runs that compare with each other
    side by side (teacher, baseline and distilled students; a table's rows); ``methods`` are the classes of
    its distillation losses (none: a network trained alone)."""
    job = "distill" if methods else "train"
    wandb_logger = WandbLogger(
        project=os.environ.get("WANDB_PROJECT", WANDB_PROJECT),
        name=run_dir.name,
        id=run_id,
        resume="allow",
        save_dir=str(run_dir),
        offline=os.environ.get("WANDB_MODE", "offline") != "online",
        group=group,
        job_type=job,
        tags=[job, *methods],
    )
    return [wandb_logger, AppendingCSVLogger(str(run_dir))]


class _AppendingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        """Keep an existing metrics.csv: it holds the rows of the run being resumed."""

    def _record_new_keys(self) -> set[str]:
        if not self.metrics_keys and os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as handle:
                self.metrics_keys = list(next(csv.reader(handle), []))
        return super()._record_new_keys()


class AppendingCSVLogger(CSVLogger):
    """``metrics.csv`` in ``save_dir`` itself; rows from an earlier run of the same folder are kept and
    new columns extend the header."""

    def __init__(self, save_dir: str) -> None:
        super().__init__(save_dir=save_dir, name="", version="")

    def discard_from(self, step: int) -> int:
        """Drop the rows logged at ``step`` or later: a run resumed from the checkpoint of ``step`` logs
        them again (they were written after that checkpoint, before the run died). Returns how many."""
        path = os.path.join(self.log_dir, ExperimentWriter.NAME_METRICS_FILE)
        if not os.path.isfile(path):
            return 0
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            header, rows = reader.fieldnames or [], list(reader)
        kept = [row for row in rows if not row.get("step") or int(float(row["step"])) < step]
        if len(kept) != len(rows):
            temporary = path + ".tmp"
            with open(temporary, "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=header)
                writer.writeheader()
                writer.writerows(kept)
            os.replace(temporary, path)
        return len(rows) - len(kept)

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


class StepLearningRateMonitor(LearningRateMonitor):
    """The learning rate once per optimiser step: Lightning's monitor logs at every batch of a step whose
    logging is due, so with gradient accumulation the same step was logged once per micro-batch."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._last_step = -1

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.global_step != self._last_step:
            self._last_step = trainer.global_step
            super().on_train_batch_start(trainer, *args, **kwargs)
