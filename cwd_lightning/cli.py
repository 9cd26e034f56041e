"""Entry point: ``python -m cwd_lightning fit --config experiments/<EXP>.yaml``.

Each experiment owns one deterministic folder ``runs/<EXP>/``: ``last.ckpt``, ``best.ckpt`` (by the
task's monitored metric), the resolved ``config.yaml``, ``metrics.csv`` and the W&B run, whose id is
kept in ``wandb_id`` so that a resume continues the same W&B run.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import sys
import uuid
from pathlib import Path
from typing import Any

import lightning as L
import yaml
from jsonargparse import Namespace, get_loader, set_loader
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from cwd_lightning.config_errors import SuggestingParser, innermost_error
from cwd_lightning.csv_log import AppendingCSVLogger
from cwd_lightning.distill import teacher as teacher_utils
from cwd_lightning.distill.module import DistillationModule
from cwd_lightning.models.pretrained import PRETRAINED_ARGUMENTS
from cwd_lightning.run_folder import (
    RUN_ID_FILE,
    AtomicCheckpointIO,
    LastCheckpoint,
    RunFolderCheckpoint,
    RunRecord,
    StepLearningRateMonitor,
)
from cwd_lightning.safe_load import load_weights_only

WANDB_PROJECT = "cwd_lightning"


def experiment_group(experiment: str) -> str:
    """``shapes_cwd`` → ``shapes``: the runs that compare with each other share a W&B group."""
    return re.sub(r"_(teacher|student|cwd|distill)\w*$", "", experiment) or experiment


#: a tapped path that selects a key of the model's own output: "[out]" (see distill/terms.py)
_OUTPUT_SELECTOR = re.compile(r"\s*\[[A-Za-z_][\w-]*\]\s*")


def _load_keeping_selectors(text: str) -> Any:
    """jsonargparse's YAML loader, except that a value that is exactly ``[name]`` stays a string.

    jsonargparse re-reads string values as YAML before trying a union such as ``str | list[str]`` (a term's
    paths), so ``teacher: "[out]"``, quoted or not, became the list ``["out"]``: a module path ``out``. A
    one-element list of names on the command line is written ``[name,]``."""
    if isinstance(text, str) and _OUTPUT_SELECTOR.fullmatch(text):
        return text.strip()
    return _YAML_LOADER(text)


_YAML_LOADER = get_loader("yaml")
set_loader("yaml_paths", _load_keeping_selectors)


class RunError(SystemExit):
    """A clear, user-facing refusal rather than a traceback (``main`` exits with code 2, as the parser)."""

    def __init__(self, message: str) -> None:
        super().__init__(f"error: {message}")


class SaveAndLogConfig(SaveConfigCallback):
    """Writes the resolved config into the run folder and logs it to every logger (W&B config)."""

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        config = json.loads(self.parser.dump(self.config, skip_none=False, format="json"))
        for logger in trainer.loggers:
            logger.log_hyperparams({"config": config})


class DistillCLI(LightningCLI):
    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
        super().__init__(
            DistillationModule,
            L.LightningDataModule,
            subclass_mode_data=True,
            save_config_callback=SaveAndLogConfig,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={"log_every_n_steps": 10},
            seed_everything_default=0,
            parser_class=SuggestingParser,  # one-line errors naming the closest valid key; no abbreviations
            parser_kwargs={"parser_mode": "yaml_paths"},  # YAML, with "[out]" kept a path
            # model.optimizer is the one route: a top-level --optimizer/--lr_scheduler is refused by the
            # parser instead of silently replacing the module's optimiser and schedule
            auto_configure_optimizers=False,
            args=args,
            run=run,
        )

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--experiment", type=str | None, default=None,
                            help="run name; defaults to the stem of the --config file")  # fmt: skip
        parser.add_argument("--runs_root", type=str, default="runs", help="folder that holds runs/<experiment>/")

    def parse_arguments(self, parser: Any, args: Any) -> None:
        """As LightningCLI, plus per-term overrides addressed by term name or index, which jsonargparse
        cannot express for a list (it would edit the last term): ``--model.terms.<name>.<field> v``,
        ``--model.terms.<index>.<field> v`` or ``--model.terms[<index>].<field> v``, e.g.
        ``--model.terms.cwd_logits.loss.init_args.tau 2`` or ``--model.terms[0].weight 5``."""
        if isinstance(args, dict | Namespace):
            return super().parse_arguments(parser, args)
        remaining, overrides = split_term_overrides(list(sys.argv[1:] if args is None else args))
        # --print_config would print before the overrides apply: print after them instead
        print_config = [a for a in remaining if a.split("=", 1)[0] == "--print_config"] if overrides else []
        self.config = parser.parse_args([a for a in remaining if a not in print_config])
        if overrides:
            subcommand = self.config.get("subcommand")
            config = self.config[subcommand] if subcommand else self.config
            apply_term_overrides(config["model"]["terms"], overrides)
            if print_config:
                target = self._subcommand_parsers[subcommand] if subcommand else parser
                print(target.dump(config, skip_none=False), end="")
                raise SystemExit(0)

    def _parse_ckpt_path(self) -> None:
        """Lightning merges a checkpoint's saved hyperparameters into the config when ``ckpt_path`` is a
        file; with ours (``teacher_fingerprint`` is not an ``__init__`` argument) that failed as "'fit' does
        not accept option 'model.teacher_fingerprint'", and it would let a checkpoint silently override the
        experiment's YAML. The config decides here; the checkpoint restores the state, and the teacher's
        fingerprint is checked against it when it loads."""

    # ---------------------------------------------------------------- run folder
    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config  # run=False: no subcommand
        if not config.experiment:
            config_files = config.get("config") or []
            if not config_files:
                raise RunError("give --config experiments/<EXP>.yaml or --experiment <name>")
            config.experiment = Path(str(config_files[-1])).stem
        follow_run_folder(config)
        self.run_dir = Path(config.runs_root) / config.experiment
        config.trainer.default_root_dir = str(self.run_dir)
        if self.subcommand == "fit":
            config.ckpt_path = self._fit_checkpoint(config.get("ckpt_path"))
        elif self.subcommand in ("validate", "test", "predict"):
            ckpt = config.get("ckpt_path")
            if ckpt in ("best", "last"):
                ckpt = str(self.run_dir / f"{ckpt}.ckpt")
            if ckpt is not None and not Path(ckpt).is_file():
                raise RunError(f"checkpoint {ckpt} not found (train the experiment first: make train EXP=...)")
            config.ckpt_path = ckpt

    def instantiate_classes(self) -> None:
        """As LightningCLI, but a network whose weights a checkpoint will replace is built without its
        pretrained weights (no download just to overwrite them, so such runs rebuild offline): the teacher
        when ``teacher_checkpoint`` is set, the student when a checkpoint is restored (resume, validate).
        The saved config keeps the values as written."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        model = config["model"]
        sides = ["teacher"] if model.get("teacher_checkpoint") else []
        if config.get("ckpt_path"):
            sides.append("student")
        changed = [
            (model[side]["init_args"], key, model[side]["init_args"][key])
            for side in sides
            if model.get(side) is not None and model[side].get("init_args") is not None
            for key in PRETRAINED_ARGUMENTS
            if model[side]["init_args"].get(key) is not None
        ]
        for init_args, key, _ in changed:
            init_args[key] = None
        try:
            super().instantiate_classes()
        except (ValueError, FileNotFoundError) as error:  # a bad setting or a missing file: one line, no traceback
            if os.environ.get("CWD_LIGHTNING_TRACEBACK"):
                raise
            raise RunError(f"{innermost_error(str(error))} (CWD_LIGHTNING_TRACEBACK=1 shows where)") from None
        finally:
            for init_args, key, value in changed:
                init_args[key] = value

    def after_instantiate_classes(self) -> None:
        super().after_instantiate_classes()
        data = getattr(self, "datamodule", None)
        classes = getattr(data, "num_classes", None)
        if classes is None and getattr(data, "class_names", None) is not None:
            classes = len(data.class_names)
        task_classes = getattr(self.model.task, "num_classes", None)
        if classes is not None and task_classes is not None and classes != task_classes:
            # else a mask value the task does not know is reported as a bad mask, or classes go unused
            raise RunError(f"data has {classes} classes (data.init_args.num_classes / class_names) but the "
                           f"task has {task_classes} (model.task.init_args.num_classes): make them agree")  # fmt: skip

    def _checkpoints(self, but: str | None) -> list[str]:
        """The run's checkpoints other than ``but``: where a refused or impossible resume can go instead."""
        return sorted(str(p) for p in self.run_dir.glob("*.ckpt") if str(p) != but)

    def _fit_checkpoint(self, ckpt_path: str | None) -> str | None:
        last = self.run_dir / "last.ckpt"
        if ckpt_path is None and not launching_rank():
            return None  # the launching rank checked the folder and has written into it by now
        if ckpt_path is None:
            if last.exists():
                raise RunError(
                    f"{self.run_dir} already holds a run ({last} exists) and nothing saved is overwritten. "
                    f"Continue it with `make resume EXP={self.run_dir.name}`, "
                    "or move that folder away to start again."
                )
            held = sorted(p.name for p in self.run_dir.iterdir()) if self.run_dir.is_dir() else []
            if held:  # e.g. best.ckpt without last.ckpt, or another run's metrics.csv: a fit would mix them
                listed = ", ".join(held[:6]) + (f" (+{len(held) - 6} more)" if len(held) > 6 else "")
                raise RunError(
                    f"{self.run_dir} is not empty ({listed}) and nothing saved is overwritten or mixed into "
                    "a new run: move that folder away, or name another run folder with --experiment <name>"
                )
            return None
        path = last if ckpt_path == "last" else Path(ckpt_path)
        if not path.is_file():
            others = self._checkpoints(but=None)
            hint = f"; this run has {', '.join(others)} (--ckpt_path <one>)" if others else ""
            died = (
                ""
                if others
                else (
                    f" (a run that stopped before its first checkpoint has nothing to resume: move {self.run_dir} "
                    "away and start it again)"
                )
            )
            raise RunError(f"nothing to resume: checkpoint {path} does not exist{hint}{died}")
        return str(path)

    # ---------------------------------------------------------------- loggers and checkpoints
    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        trainer_config = (self.config_init[self.subcommand] if self.subcommand else self.config_init)["trainer"]
        if self.subcommand == "fit":
            callbacks = [
                RunFolderCheckpoint(
                    dirpath=self.run_dir,
                    filename="best",
                    monitor=self.model.task.monitor,
                    mode=self.model.task.monitor_mode,
                    save_top_k=1,
                    enable_version_counter=False,
                ),
                LastCheckpoint(self.run_dir),
                RunRecord(self._run_id()),
            ]
            kwargs["plugins"] = [*(trainer_config.get("plugins") or []), AtomicCheckpointIO()]
            kwargs.update(validation_in_optimizer_steps(trainer_config))
            if trainer_config.get("logger") in (None, True):
                kwargs["logger"] = self._loggers()
                callbacks.append(StepLearningRateMonitor(logging_interval="step"))
            kwargs["callbacks"] = [*(trainer_config.get("callbacks") or []), *callbacks]
        else:  # validate/test/predict read a run; they write nothing into its folder
            kwargs.setdefault("logger", False)
            self.save_config_callback = None
        return super().instantiate_trainer(**kwargs)

    def _run_id(self) -> str:
        """The folder's run id when resuming, else a new one (written by ``before_fit`` once every check
        has passed). It is the W&B run id too, so a resume continues the same W&B run."""
        if getattr(self, "run_id", None) is None:
            id_file = self.run_dir / RUN_ID_FILE
            if self.config[self.subcommand].ckpt_path and id_file.is_file():
                self.run_id = id_file.read_text().strip()
            else:
                self.run_id = self._new_run_id = uuid.uuid4().hex[:12]
        return self.run_id

    def _loggers(self) -> list[Any]:
        run_id = self._run_id()
        experiment = self.run_dir.name
        role = "distill" if self.model.terms else ("teacher" if "teacher" in experiment else "student")
        methods = sorted({type(term.loss).__name__ for term in self.model.terms})
        wandb_logger = WandbLogger(
            project=os.environ.get("WANDB_PROJECT", WANDB_PROJECT),
            name=experiment,
            id=run_id,
            resume="allow",
            save_dir=str(self.run_dir),
            offline=os.environ.get("WANDB_MODE", "offline") != "online",
            group=experiment_group(experiment),  # teacher, baseline and distilled runs side by side
            job_type=role,
            tags=[role, *methods] if methods else [role, "baseline" if role == "student" else role],
        )
        return [wandb_logger, AppendingCSVLogger(str(self.run_dir))]

    def before_fit(self) -> None:
        """Every check of a resume runs here, before the run record (config, hparams, metrics, W&B) is
        touched: a refused resume leaves the folder as it was, so the right resume still works. Only then
        does a fresh run's folder start (its W&B id)."""
        ckpt_path = self.config[self.subcommand].get("ckpt_path")
        if ckpt_path and launching_rank():  # the other ranks start after these checks passed
            self._check_resume(ckpt_path)
        self._check_data()
        if getattr(self, "_new_run_id", None) and launching_rank():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / RUN_ID_FILE).write_text(self._new_run_id + "\n")

    def before_validate(self) -> None:
        ckpt_path = self.config[self.subcommand].get("ckpt_path")
        if ckpt_path:  # our message for a damaged or pickled file, not PyTorch's advice to load it unsafely
            try:
                load_weights_only(ckpt_path, "checkpoint to validate")
            except ValueError as error:
                raise RunError(str(error)) from None
        self._check_data()

    def _check_data(self) -> None:
        """Prepare and read the data now, before any logger or callback writes into the run folder: a
        missing file, a broken image or an empty split ends the command with one line, and a fresh run's
        folder stays empty (so the same command works once the data is fixed). Lightning's own call of
        ``setup`` later finds the datasets built."""
        data = getattr(self, "datamodule", None)
        if data is None:
            return
        stage = "fit" if self.subcommand == "fit" else "validate"
        try:
            data.prepare_data()
            data.setup(stage)
        except (ValueError, FileNotFoundError, FileExistsError) as error:
            if os.environ.get("CWD_LIGHTNING_TRACEBACK"):
                raise
            raise RunError(f"{error} (nothing was written to {self.run_dir})") from None

    def _check_resume(self, ckpt_path: str) -> None:
        """Refuse, before anything is written: a damaged or foreign checkpoint, another teacher, a checkpoint
        of another run than the folder's, a finished run, a one-cycle schedule of another length."""
        others = self._checkpoints(but=ckpt_path)
        way_out = f"; other checkpoints of this run: {', '.join(others)} (--ckpt_path <one>)" if others else ""
        try:
            checkpoint = load_weights_only(ckpt_path, "checkpoint to resume from")
            teacher_utils.check_fingerprint(checkpoint, self.model.teacher_fingerprint)
        except ValueError as error:
            raise RunError(f"{error}{way_out}. Nothing in {self.run_dir} was changed.") from None
        step, max_steps = int(checkpoint.get("global_step", 0)), self.trainer.max_steps
        if 0 < max_steps <= step:  # Lightning would restore it, do nothing, and still rewrite the record
            raise RunError(
                f"{ckpt_path} is at step {step}: the run already finished (trainer.max_steps = {max_steps}); "
                f"nothing was changed in {self.run_dir}. To train longer, start a new run with a longer "
                "schedule (--experiment <new name>); a larger --trainer.max_steps here would continue past the "
                "end of its learning-rate schedule."
            )
        self._check_same_run(ckpt_path, checkpoint.get("run_id"))
        schedules = checkpoint.get("lr_schedulers") or [{}]
        total = schedules[0].get("total_steps")  # OneCycleLR's fixed length; other schedules have none
        if total is not None and max_steps > 0 and total != max_steps:
            raise RunError(
                f"{ckpt_path} was trained with a one-cycle schedule of {total} steps but trainer.max_steps is "
                f"{max_steps}: the schedule cannot change length mid-run (keep --trainer.max_steps {total}, or "
                "start a new run). Nothing was changed."
            )
        for logger in self.trainer.loggers:  # rows logged after this checkpoint are logged again
            if isinstance(logger, AppendingCSVLogger) and self.trainer.is_global_zero:
                logger.discard_from(step)

    def _check_same_run(self, ckpt_path: str, checkpoint_run: str | None) -> None:
        """A run folder holds one run: resuming a checkpoint of another run into it would mix their
        checkpoints, metrics and W&B records."""
        id_file = self.run_dir / RUN_ID_FILE
        folder_run = id_file.read_text().strip() if id_file.is_file() else None
        if folder_run is not None and checkpoint_run is not None and folder_run != checkpoint_run:
            raise RunError(
                f"{ckpt_path} belongs to run {checkpoint_run} but {self.run_dir} holds run {folder_run} "
                f"({id_file}): resume it in its own folder (--experiment <its name>), or copy the checkpoint "
                "into an empty folder to continue it there. Nothing was changed."
            )
        inside = Path(ckpt_path).resolve().parent == self.run_dir.resolve()
        held = [p.name for p in self.run_dir.iterdir()] if self.run_dir.is_dir() else []
        if folder_run is None and held and not inside:
            raise RunError(
                f"{self.run_dir} holds files of an unknown run ({', '.join(sorted(held)[:4])}, no {RUN_ID_FILE}): "
                f"resuming {ckpt_path} into it would mix two runs; use an empty folder (--experiment <new name>). "
                "Nothing was changed."
            )

    def _run_subcommand(self, subcommand: str) -> None:
        """A run stopped by the non-finite checks ends with their message in one line, not a traceback."""
        try:
            super()._run_subcommand(subcommand)
        except FloatingPointError as error:
            if os.environ.get("CWD_LIGHTNING_TRACEBACK"):
                raise
            raise RunError(f"{error} (run folder {self.run_dir})") from None

    def after_fit(self) -> None:
        if not self.trainer.is_global_zero:  # the other ranks' loggers are placeholders; rank 0 reports
            return
        checkpoint = self.trainer.checkpoint_callback  # the first ModelCheckpoint: best by the task metric
        lines = [f"run folder:      {self.run_dir}"]
        if isinstance(checkpoint, ModelCheckpoint):
            score = checkpoint.best_model_score
            best = f" ({checkpoint.monitor} = {float(score):.4f})" if score is not None else ""
            lines += [
                f"best checkpoint: {checkpoint.best_model_path}{best}",
                f"last checkpoint: {(self.run_dir / 'last.ckpt').resolve()}",
            ]
        for logger in self.trainer.loggers:
            if isinstance(logger, WandbLogger):
                wandb_dir = logger.experiment.dir.removesuffix("/files")
                lines.append(f"W&B run files:   {wandb_dir}")
                lines.append(f"                 (upload later with: wandb sync {wandb_dir})")
            if isinstance(logger, CSVLogger):
                lines.append(f"metrics table:   {Path(logger.log_dir) / 'metrics.csv'}")
        print("\n".join(lines), flush=True)
        for logger in self.trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.finish()  # flush the offline record and its summary now, not at exit


def follow_run_folder(config: Namespace) -> None:
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


def launching_rank() -> bool:
    """True in the process the user started (or rank 0 of torchrun/SLURM): it alone checks and starts the
    run folder. Lightning's DDP launcher re-runs the command for the other local ranks with their rank in
    the environment, after the launching process has passed its checks and written the run id."""
    return rank_zero_only.rank == 0


def validation_in_optimizer_steps(trainer: Any) -> dict[str, int]:
    """``val_check_interval: N`` (with ``check_val_every_n_epoch: null``) means every N optimiser steps, as
    ``max_steps`` and the schedule count them; Lightning counts batches, so with gradient accumulation it
    would validate ``accumulate_grad_batches`` times as often. The saved config keeps N (a resume reads it)."""
    accumulate = int(trainer.get("accumulate_grad_batches") or 1)
    interval = trainer.get("val_check_interval")
    if accumulate > 1 and isinstance(interval, int) and trainer.get("check_val_every_n_epoch") is None:
        return {"val_check_interval": interval * accumulate}
    return {}


_TERM_OVERRIDE = re.compile(
    r"^--model\.terms(?:\.(?P<name>\w+)|\[(?P<index>\d+)\])\.(?P<key>[\w.]+?)(?:=(?P<value>.*))?$"
)


def split_term_overrides(args: list[str]) -> tuple[list[str], list[tuple[str, str, str]]]:
    """Take ``--model.terms.<name|index>.<key> value`` arguments out of ``args``: (rest, [(term, key, value)])."""
    remaining: list[str] = []
    overrides: list[tuple[str, str, str]] = []
    arguments = iter(args)
    for argument in arguments:
        match = _TERM_OVERRIDE.match(argument)
        if match is None:
            remaining.append(argument)
            continue
        value = match["value"]
        if value is None:
            value = next(arguments, None)
            if value is None:
                raise RunError(f"{argument} needs a value")
        overrides.append((match["name"] or match["index"], match["key"], value))
    return remaining, overrides


def apply_term_overrides(terms: list[Any] | None, overrides: list[tuple[str, str, str]]) -> None:
    """Set each override on the term it names (a YAML value, checked when the term is built); the key must
    be one the term's resolved config has, so a typo fails instead of being ignored."""
    terms = list(terms or [])
    names = [str(term["name"]) for term in terms]
    for selector, key, text in overrides:
        if selector in names:
            term = terms[names.index(selector)]
        elif selector.isdigit() and int(selector) < len(terms):
            term = terms[int(selector)]
        else:
            raise RunError(
                f"--model.terms.{selector}.{key}: no term named or numbered {selector!r} "
                f"(terms: {', '.join(f'{i}={n}' for i, n in enumerate(names)) or 'none'})"
            )
        if key not in term:
            fields = sorted(term.keys())
            close = difflib.get_close_matches(key, fields, n=2, cutoff=0.6)
            hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
            raise RunError(
                f"--model.terms.{selector}.{key}: term {term['name']!r} has no {key!r} ({hint}it has {fields})"
            )
        value, current = _load_keeping_selectors(text), term[key]
        numbers = (int, float)
        if isinstance(current, numbers) and not isinstance(current, bool) and not isinstance(value, numbers):
            raise RunError(f"--model.terms.{selector}.{key}: {text!r} is not a number (it is {current} now)")
        term[key] = value


def main(args: list[str] | None = None) -> None:
    os.environ.setdefault("WANDB_MODE", "offline")  # no account or network needed; online is opt-in
    os.environ.setdefault("WANDB_SILENT", "true")
    try:
        DistillCLI(args=args)
    except RunError as error:
        print(error.code, file=sys.stderr, flush=True)
        raise SystemExit(2) from None
