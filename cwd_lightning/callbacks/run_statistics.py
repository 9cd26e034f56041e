"""What a fit logs once at its start: parameter counts, the global batch size, the samples left out."""

from __future__ import annotations

import lightning as L

from cwd_lightning.distill.inspection import parameter_counts


class RunStatistics(L.Callback):
    """Logs to every logger at the start of a fit: the parameters of the student, the teacher, the distiller
    (connectors and the losses' own modules) and what is trained (``params/*``, config); the global batch of
    one optimiser step, devices × nodes × batch × accumulation (``global_batch_size``, config and step 0);
    and the samples of each split that ``on_bad_sample: skip`` left out (``data/skipped_samples/<split>``).
    A resumed run has its step-0 rows already and logs only the parameter counts."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        skipped = getattr(trainer.datamodule, "skipped_samples", None) or {}
        batch = getattr(trainer.datamodule, "batch_size", None)
        if trainer.ckpt_path is not None:
            skipped, batch = {}, None
        for logger in trainer.loggers:
            logger.log_hyperparams(parameter_counts(pl_module))
            if isinstance(batch, int):
                scale = {"global_batch_size": float(batch * trainer.world_size * trainer.accumulate_grad_batches)}
                logger.log_hyperparams(scale)
                logger.log_metrics(scale, step=0)
            if skipped:
                logger.log_metrics({f"data/skipped_samples/{split}": n for split, n in skipped.items()}, step=0)
