"""What a fit adds to the trainer of its experiment: the run folder's checkpoints and record, atomic
checkpoint writes, the loggers, and the validation cadence counted in optimiser steps."""

from __future__ import annotations

from typing import Any

from cwd_lightning.callbacks.run_statistics import RunStatistics
from cwd_lightning.runs.checkpoints import AtomicCheckpointIO, LastCheckpoint, RunFolderCheckpoint
from cwd_lightning.runs.folder import RunFolder
from cwd_lightning.runs.loggers import StepLearningRateMonitor, run_loggers
from cwd_lightning.runs.record import RunRecord


def fit_trainer_arguments(folder: RunFolder, trainer_config: Any, module: Any, group: str | None,
                          resuming: bool) -> dict[str, Any]:  # fmt: skip
    """Trainer keyword arguments for a fit into ``folder``, on top of the experiment's ``trainer`` section
    (its own callbacks and plugins are kept). ``module`` is the DistillationModule: its task's metric picks
    ``best.ckpt`` and its terms name the W&B job."""
    callbacks = [
        RunFolderCheckpoint(dirpath=folder.path, filename="best", monitor=module.task.monitor,
                            mode=module.task.monitor_mode, save_top_k=1, enable_version_counter=False),
        LastCheckpoint(folder.path),
        RunRecord(folder.run_id(resuming)),
        RunStatistics(),
    ]  # fmt: skip
    arguments: dict[str, Any] = {"plugins": [*(trainer_config.get("plugins") or []), AtomicCheckpointIO()]}
    arguments.update(validation_in_optimizer_steps(trainer_config))
    if trainer_config.get("logger") in (None, True):
        methods = sorted({type(term.loss).__name__ for term in module.terms})
        arguments["logger"] = run_loggers(folder.path, folder.run_id(resuming), group, methods)
        callbacks.append(StepLearningRateMonitor(logging_interval="step"))
    arguments["callbacks"] = [*(trainer_config.get("callbacks") or []), *callbacks]
    return arguments


def validation_in_optimizer_steps(trainer: Any) -> dict[str, int]:
    """``val_check_interval: N`` (with ``check_val_every_n_epoch: null``) means every N optimiser steps, as
    ``max_steps`` and the schedule count them; Lightning counts batches, so with gradient accumulation it
    would validate ``accumulate_grad_batches`` times as often. The saved config keeps N (a resume reads it)."""
    accumulate = int(trainer.get("accumulate_grad_batches") or 1)
    interval = trainer.get("val_check_interval")
    if accumulate > 1 and isinstance(interval, int) and trainer.get("check_val_every_n_epoch") is None:
        return {"val_check_interval": interval * accumulate}
    return {}
