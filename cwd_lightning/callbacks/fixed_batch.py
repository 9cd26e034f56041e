"""Base for monitors that look at one fixed validation batch now and then and log to W&B."""

from __future__ import annotations

import json
import time
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import move_data_to_device


class FixedBatchCallback(L.Callback):
    """Keeps the first ``num_samples`` samples of the first validation batch and calls ``log_batch``
    after every ``every_n_epochs``-th validation and once at the end of training. Outside the
    training step; a no-op without a ``WandbLogger``. Its own time is measured (``seconds_spent``)
    and reported against the fit time at the end (printed and written to ``<run>/<name>.json``)."""

    def __init__(self, every_n_epochs: int = 1, num_samples: int = 8) -> None:
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be ≥ 1, got {every_n_epochs}")
        self.every_n_epochs = every_n_epochs
        self.num_samples = num_samples
        self.batch: Any = None
        self.validations = 0
        self.seconds_spent = 0.0
        self.calls = 0
        self._fit_started = 0.0
        self._last_step_logged = -1

    @staticmethod
    def wandb_logger(trainer: L.Trainer) -> WandbLogger | None:
        return next((logger for logger in trainer.loggers if isinstance(logger, WandbLogger)), None)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_started = time.perf_counter()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self.batch is None and not trainer.sanity_checking and batch_idx == 0:
            self.batch = move_data_to_device(pl_module.task.first_samples(batch, self.num_samples), "cpu")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        self.validations += 1
        if self.validations % self.every_n_epochs == 0:
            self._run(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._run(trainer, pl_module)
        if self.calls and trainer.is_global_zero:
            fit_seconds = time.perf_counter() - self._fit_started
            report = {
                "callback": type(self).__name__,
                "calls": self.calls,
                "seconds": round(self.seconds_spent, 3),
                "fit_seconds": round(fit_seconds, 1),
                "percent_of_fit": round(100 * self.seconds_spent / max(fit_seconds, 1e-9), 2),
            }
            print(f"{report['callback']}: {report['seconds']} s in {report['calls']} calls, "
                  f"{report['percent_of_fit']}% of the fit time ({report['fit_seconds']} s)")  # fmt: skip
            if trainer.default_root_dir:
                path = f"{trainer.default_root_dir}/{type(self).__name__}.json"
                with open(path, "w") as handle:
                    json.dump(report, handle, indent=1)

    def _run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        logger = self.wandb_logger(trainer)
        if logger is None or self.batch is None or self._last_step_logged == trainer.global_step:
            return
        started = time.perf_counter()
        batch = move_data_to_device(self.batch, pl_module.device)
        with torch.no_grad():
            self.log_batch(trainer, pl_module, logger, batch)
        self.seconds_spent += time.perf_counter() - started
        self.calls += 1
        self._last_step_logged = trainer.global_step

    def log_batch(self, trainer: L.Trainer, module: L.LightningModule, logger: WandbLogger, batch: Any) -> None:
        raise NotImplementedError

    @staticmethod
    def display_image(trainer: L.Trainer, image: torch.Tensor) -> np.ndarray:
        """A C×H×W input back to H×W×3 uint8, undoing the datamodule's mean/std if it normalises
        (detection inputs are plain [0, 1] images: the detectors normalise inside)."""
        hparams = getattr(trainer.datamodule, "hparams", {}) or {}
        mean = torch.tensor(hparams.get("mean") or (0.0, 0.0, 0.0)).view(3, 1, 1)
        std = torch.tensor(hparams.get("std") or (1.0, 1.0, 1.0)).view(3, 1, 1)
        pixels = image.detach().float().cpu() * std + mean
        return (pixels.clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
