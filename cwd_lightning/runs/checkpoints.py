"""A run's checkpoints: written whole or not at all, ``best.ckpt`` (by the task's metric) and ``last.ckpt``
(after every validation, the previous one kept as ``last.prev.ckpt``), whose state survives a moved folder."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

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


class RunFolderCheckpoint(ModelCheckpoint):
    """A ``ModelCheckpoint`` whose state survives a moved run folder. Lightning drops the best score when
    the saved ``dirpath`` differs from the current one, so after a move the next validation, however
    worse, replaced ``best.ckpt``; here the saved paths are re-read inside the current folder instead."""

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
