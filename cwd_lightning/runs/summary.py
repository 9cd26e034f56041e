"""What a fit prints when it ends: where its folder, checkpoints, metrics and W&B record are."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, WandbLogger


def report_fit(trainer: L.Trainer, run_dir: Path) -> None:
    """Print the run's files (rank 0 only: the other ranks' loggers are placeholders) and flush the offline
    W&B record and its summary now, not at exit."""
    if not trainer.is_global_zero:
        return
    checkpoint = trainer.checkpoint_callback  # the first ModelCheckpoint: best by the task metric
    lines = [f"run folder:      {run_dir}"]
    if isinstance(checkpoint, ModelCheckpoint):
        score = checkpoint.best_model_score
        best = f" ({checkpoint.monitor} = {float(score):.4f})" if score is not None else ""
        where = checkpoint.best_model_path or f"none yet (no validation of {checkpoint.monitor} ran)"
        lines += [f"best checkpoint: {where}{best}", f"last checkpoint: {(run_dir / 'last.ckpt').resolve()}"]
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            wandb_dir = logger.experiment.dir.removesuffix("/files")
            lines.append(f"W&B run files:   {wandb_dir}")
            lines.append(f"                 (upload later with: wandb sync {wandb_dir})")
        if isinstance(logger, CSVLogger):
            lines.append(f"metrics table:   {Path(logger.log_dir) / 'metrics.csv'}")
    print("\n".join(lines), flush=True)
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()
