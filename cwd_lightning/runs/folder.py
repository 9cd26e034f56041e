"""The run folder ``<runs_root>/<experiment>/``: one folder is one run. Which folder a command uses, which
checkpoint it reads, and the run id a fresh fit starts with."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import yaml
from lightning.fabric.utilities.rank_zero import rank_zero_only

from cwd_lightning.runs.errors import RunError
from cwd_lightning.runs.record import RUN_ID_FILE


def launching_rank() -> bool:
    """True in the process the user started (or rank 0 of torchrun/SLURM): it alone checks and starts the
    run folder. Lightning's DDP launcher re-runs the command for the other local ranks with their rank in
    the environment, after the launching process has passed its checks and written the run id."""
    return rank_zero_only.rank == 0


class RunFolder:
    """The folder of one run: its checkpoints, config, metrics, W&B record and run id."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._run_id: str | None = None
        self.new_run_id: str | None = None  # set when a fresh fit starts a run; written by ``start``

    @classmethod
    def of(cls, config: Any) -> RunFolder:
        """The folder a parsed command names: ``--experiment`` (default: the stem of the last ``--config``)
        under ``--runs_root``; a run's own ``config.yaml`` names the folder that holds it (``follow``)."""
        if not config.experiment:
            config_files = config.get("config") or []
            if not config_files:
                raise RunError("give --config experiments/<EXP>.yaml or --experiment <name>")
            config.experiment = Path(str(config_files[-1])).stem
        follow(config)
        return cls(Path(config.runs_root) / config.experiment)

    def checkpoints(self, but: str | None = None) -> list[str]:
        """The run's checkpoints other than ``but``: where a refused or impossible resume can go instead."""
        return sorted(str(p) for p in self.path.glob("*.ckpt") if str(p) != but)

    def fit_checkpoint(self, ckpt_path: str | None) -> str | None:
        """The checkpoint a fit resumes from (``last`` or a path), or None for a fresh fit, which needs an
        empty folder: nothing saved is ever overwritten or mixed into a new run."""
        last = self.path / "last.ckpt"
        if ckpt_path is None and not launching_rank():
            return None  # the launching rank checked the folder and has written into it by now
        if ckpt_path is None:
            if last.exists():
                raise RunError(
                    f"{self.path} already holds a run ({last} exists) and nothing saved is overwritten. "
                    f"Continue it with `make resume EXP={self.path.name}`, or move that folder away to start again."
                )
            held = sorted(p.name for p in self.path.iterdir()) if self.path.is_dir() else []
            if held:  # e.g. best.ckpt without last.ckpt, or another run's metrics.csv: a fit would mix them
                listed = ", ".join(held[:6]) + (f" (+{len(held) - 6} more)" if len(held) > 6 else "")
                raise RunError(
                    f"{self.path} is not empty ({listed}) and nothing saved is overwritten or mixed into "
                    "a new run: move that folder away, or name another run folder with --experiment <name>"
                )
            return None
        path = last if ckpt_path == "last" else Path(ckpt_path)
        if not path.is_file():
            others = self.checkpoints()
            hint = f"; this run has {', '.join(others)} (--ckpt_path <one>)" if others else ""
            died = "" if others else (f" (a run that stopped before its first checkpoint has nothing to resume: "
                                      f"move {self.path} away and start it again)")  # fmt: skip
            raise RunError(f"nothing to resume: checkpoint {path} does not exist{hint}{died}")
        return str(path)

    def read_checkpoint(self, ckpt_path: str | None) -> str | None:
        """The checkpoint ``validate``/``test``/``predict`` read: ``best``, ``last`` or a path."""
        if ckpt_path in ("best", "last"):
            ckpt_path = str(self.path / f"{ckpt_path}.ckpt")
        if ckpt_path is not None and not Path(ckpt_path).is_file():
            raise RunError(f"checkpoint {ckpt_path} not found (train the experiment first: make train EXP=...)")
        return ckpt_path

    def run_id(self, resuming: bool) -> str:
        """The folder's run id when resuming, else a new one (written by ``start`` once every check has
        passed). It is the W&B run id too, so a resume continues the same W&B run."""
        if self._run_id is None:
            id_file = self.path / RUN_ID_FILE
            if resuming and id_file.is_file():
                self._run_id = id_file.read_text().strip()
            else:
                self._run_id = self.new_run_id = uuid.uuid4().hex[:12]
        return self._run_id

    def start(self) -> None:
        """A fresh fit's folder begins with its run id (by the launching rank, after every check)."""
        if self.new_run_id and launching_rank():
            self.path.mkdir(parents=True, exist_ok=True)
            (self.path / RUN_ID_FILE).write_text(self.new_run_id + "\n")


def follow(config: Any) -> None:
    """A run's own ``config.yaml`` (``make resume``, ``make eval``) names the folder it was written in by
    ``experiment`` and ``runs_root``; after the folder was moved or copied those name the old one, and a
    resume of the copy would write into the original. So, unless ``--experiment`` was given, the run
    folder is the one that holds the config."""
    config_files = [Path(str(path)) for path in config.get("config") or []]
    if not config_files or config_files[-1].name != "config.yaml":
        return
    folder = config_files[-1].parent
    if not (folder / RUN_ID_FILE).is_file():
        return
    try:
        written = yaml.safe_load(config_files[-1].read_text()) or {}
    except (OSError, yaml.YAMLError):
        return
    if config.experiment == written.get("experiment"):  # not overridden on the command line
        config.experiment, config.runs_root = folder.name, str(folder.parent)
