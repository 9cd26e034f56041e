"""The run's identity and what a resume needs to continue bit for bit: the run id (also its W&B id) in a file
of the folder and in every checkpoint, and the global RNG states."""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

#: the run's id (also its W&B run id), written when a fresh fit starts
RUN_ID_FILE = "wandb_id"


def rng_states() -> dict[str, Any]:
    """The global RNGs (torch CPU and CUDA, numpy, python) in types a ``weights_only`` load accepts."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    version, state, gauss = random.getstate()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached],
        "python": [version, list(state), gauss],
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    kind, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    version, state, gauss = states["python"]
    random.setstate((version, tuple(state), gauss))
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


class RunRecord(Callback):
    """Puts the run's id and the RNG states into every checkpoint; after a resume, puts the RNG states
    back just before the first step, so dropout and anything else drawn from the global RNGs continue
    as in the uninterrupted run (the data order and augmentations are seeded on their own:
    ``data/sampling.py``)."""

    def __init__(self, run_id: str | None) -> None:
        self.run_id = run_id
        self._pending: dict[str, Any] | None = None

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self.run_id is not None:
            checkpoint["run_id"] = self.run_id
        checkpoint["rng_states"] = rng_states()

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self._pending = checkpoint.get("rng_states")

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._pending is not None:
            set_rng_states(self._pending)
            self._pending = None
