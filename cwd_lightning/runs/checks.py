"""Every check a command makes before it writes anything into the run folder: a refused command leaves the
folder as it was, so the right command still works afterwards."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cwd_lightning.distill.teacher import check_fingerprint
from cwd_lightning.runs.errors import RunError
from cwd_lightning.runs.folder import RunFolder
from cwd_lightning.runs.loggers import AppendingCSVLogger
from cwd_lightning.runs.record import RUN_ID_FILE
from cwd_lightning.safe_load import load_weights_only


def check_resume(folder: RunFolder, ckpt_path: str, teacher_fingerprints: dict[str, str], trainer: Any) -> None:
    """Refuse a damaged or foreign checkpoint, other teachers, a checkpoint of another run than the folder's,
    a finished run and a one-cycle schedule of another length; then drop the metrics rows logged after the
    checkpoint (the resumed run logs them again)."""
    others = folder.checkpoints(but=ckpt_path)
    way_out = f"; other checkpoints of this run: {', '.join(others)} (--ckpt_path <one>)" if others else ""
    try:
        checkpoint = load_weights_only(ckpt_path, "checkpoint to resume from")
        check_fingerprint(checkpoint, teacher_fingerprints)
    except ValueError as error:
        raise RunError(f"{error}{way_out}. Nothing in {folder.path} was changed.") from None
    step, max_steps = int(checkpoint.get("global_step", 0)), trainer.max_steps
    if 0 < max_steps <= step:  # Lightning would restore it, do nothing, and still rewrite the record
        raise RunError(
            f"{ckpt_path} is at step {step}: the run already finished (trainer.max_steps = {max_steps}); "
            f"nothing was changed in {folder.path}. To train longer, start a new run with a longer "
            "schedule (--experiment <new name>); a larger --trainer.max_steps here would continue past the "
            "end of its learning-rate schedule."
        )
    check_same_run(folder, ckpt_path, checkpoint.get("run_id"))
    schedules = checkpoint.get("lr_schedulers") or [{}]
    total = schedules[0].get("total_steps")  # OneCycleLR's fixed length; other schedules have none
    if total is not None and max_steps > 0 and total != max_steps:
        raise RunError(
            f"{ckpt_path} was trained with a one-cycle schedule of {total} steps but trainer.max_steps is "
            f"{max_steps}: the schedule cannot change length mid-run (keep --trainer.max_steps {total}, or "
            "start a new run). Nothing was changed."
        )
    for logger in trainer.loggers:  # rows logged after this checkpoint are logged again
        if isinstance(logger, AppendingCSVLogger) and trainer.is_global_zero:
            logger.discard_from(step)


def check_same_run(folder: RunFolder, ckpt_path: str, checkpoint_run: str | None) -> None:
    """A run folder holds one run: resuming a checkpoint of another run into it would mix their
    checkpoints, metrics and W&B records."""
    id_file = folder.path / RUN_ID_FILE
    folder_run = id_file.read_text().strip() if id_file.is_file() else None
    if folder_run is not None and checkpoint_run is not None and folder_run != checkpoint_run:
        raise RunError(
            f"{ckpt_path} belongs to run {checkpoint_run} but {folder.path} holds run {folder_run} "
            f"({id_file}): resume it in its own folder (--experiment <its name>), or copy the checkpoint "
            "into an empty folder to continue it there. Nothing was changed."
        )
    inside = Path(ckpt_path).resolve().parent == folder.path.resolve()
    held = [p.name for p in folder.path.iterdir()] if folder.path.is_dir() else []
    if folder_run is None and held and not inside:
        raise RunError(
            f"{folder.path} holds files of an unknown run ({', '.join(sorted(held)[:4])}, no {RUN_ID_FILE}): "
            f"resuming {ckpt_path} into it would mix two runs; use an empty folder (--experiment <new name>). "
            "Nothing was changed."
        )


def check_readable(ckpt_path: str | None) -> None:
    """Our message for a damaged or pickled checkpoint, not PyTorch's advice to load it unsafely."""
    if ckpt_path:
        try:
            load_weights_only(ckpt_path, "checkpoint to validate")
        except ValueError as error:
            raise RunError(str(error)) from None


def check_data(datamodule: Any, stage: str, folder: RunFolder) -> None:
    """Prepare and read the data now, before any logger or callback writes into the run folder: a missing
    file, a broken image or an empty split ends the command with one line, and a fresh run's folder stays
    empty (so the same command works once the data is fixed). Lightning's own call of ``setup`` later finds
    the datasets built."""
    if datamodule is None:
        return
    try:
        datamodule.prepare_data()
        datamodule.setup(stage)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        if os.environ.get("CWD_LIGHTNING_TRACEBACK"):
            raise
        raise RunError(f"{error} (nothing was written to {folder.path})") from None
