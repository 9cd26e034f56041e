"""What a run folder holds and how it is written: checkpoints written whole or not at all, the run's id
in every checkpoint (so a folder, a checkpoint and a W&B run are known to belong together), the RNG
states a resume needs to continue bit for bit, ``best.ckpt`` and ``last.ckpt``."""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

#: the run's id (also its W&B run id), written when a fresh fit starts
RUN_ID_FILE = "wandb_id"
#: the checkpoint before ``last.ckpt``, kept (see ``LastCheckpoint._save_checkpoint``)
PREVIOUS_LAST = "last.prev.ckpt"


class AtomicCheckpointIO(TorchCheckpointIO):
    """A checkpoint is written to a temporary file beside its path, flushed to disk and renamed over
    the path: a crash or a full disk mid-write leaves the previous file intact, never a truncated one."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as out:
                torch.save(checkpoint, out)
                out.flush()
                os.fsync(out.fileno())
            os.chmod(temporary, 0o666 & ~_umask())  # as any file the run writes, not mkstemp's 0600
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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
    ``data/resumable.py``)."""

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


class RunFolderCheckpoint(ModelCheckpoint):
    """A ``ModelCheckpoint`` whose state survives a moved run folder. Lightning drops the best score when
    the saved ``dirpath`` differs from the current one, so after a move the next validation, however
    worse, replaced ``best.ckpt``; here the saved paths are re-read inside the current folder instead."""

    #: the name in the checkpoint's callback state key, as before this class existed, so older runs resume
    #: with their best score and the sweeps find the best checkpoint's state under "ModelCheckpoint"
    state_name = "ModelCheckpoint"

    @property
    def state_key(self) -> str:
        return super().state_key.replace(type(self).__qualname__, self.state_name, 1)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("dirpath")
        if saved and self.dirpath and Path(saved) != Path(self.dirpath):

            def moved(path: str) -> str:
                return str(Path(self.dirpath) / Path(path).name) if path else path

            state_dict = {
                **state_dict,
                "dirpath": self.dirpath,
                "best_model_path": moved(state_dict.get("best_model_path", "")),
                "kth_best_model_path": moved(state_dict.get("kth_best_model_path", "")),
                "last_model_path": moved(state_dict.get("last_model_path", "")),
                "best_k_models": {moved(k): v for k, v in state_dict.get("best_k_models", {}).items()},
            }
        super().load_state_dict(state_dict)


class LastCheckpoint(RunFolderCheckpoint):
    """``last.ckpt`` after every validation and at the end of training, whether or not the monitored
    metric improved (Lightning's ``save_last`` only refreshes it when a best checkpoint is written)."""

    state_name = "LastCheckpoint"

    def __init__(self, dirpath: Path) -> None:
        super().__init__(dirpath=dirpath, filename="last", monitor=None, save_top_k=1, enable_version_counter=False)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._last_global_step_saved != trainer.global_step:
            self._save_checkpoint(trainer, self.format_checkpoint_name({}))
            self._last_global_step_saved = trainer.global_step

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        """The previous ``last.ckpt`` becomes ``last.prev.ckpt`` first: a crash while writing the new one
        leaves a checkpoint to resume from (``--ckpt_path runs/<EXP>/last.prev.ckpt``)."""
        path = Path(filepath)
        if trainer.is_global_zero and path.is_file():
            keep_copy(path, path.with_name(PREVIOUS_LAST))
        super()._save_checkpoint(trainer, filepath)


def keep_copy(path: Path, copy: Path) -> None:
    """``copy`` becomes a hard link to ``path`` (a full copy where links are not possible), replacing it
    in one rename: ``path`` itself is never missing, and is then overwritten atomically."""
    temporary = copy.with_name(copy.name + ".tmp")
    temporary.unlink(missing_ok=True)
    try:
        os.link(path, temporary)
    except OSError:
        shutil.copy2(path, temporary)
    os.replace(temporary, copy)


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
