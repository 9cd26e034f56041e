"""``python -m cwd_lightning fit --config experiments/<EXP>.yaml``: LightningCLI whose hooks delegate to the
run record (``runs/``), the checks before anything is written and the one-line errors.

Each experiment owns one deterministic folder ``runs/<EXP>/``: ``last.ckpt``, ``best.ckpt`` (by the task's
monitored metric), the resolved ``config.yaml``, ``metrics.csv`` and the W&B run, whose id is kept in the
folder so that a resume continues the same W&B run.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from typing import Any

import lightning as L
from jsonargparse import Namespace
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from cwd_lightning.cli.overrides import parse_with_term_overrides
from cwd_lightning.cli.parser import SuggestingParser, innermost_error
from cwd_lightning.distill.module import DistillationModule
from cwd_lightning.models.pretrained import built_without_pretrained
from cwd_lightning.runs import checks
from cwd_lightning.runs.errors import RunError
from cwd_lightning.runs.folder import RunFolder, launching_rank
from cwd_lightning.runs.summary import report_fit
from cwd_lightning.runs.trainer import fit_trainer_arguments
from cwd_lightning.tasks import check_class_counts


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
            # model.optimizer is the one route: a top-level --optimizer/--lr_scheduler is refused by the
            # parser instead of silently replacing the module's optimiser and schedule
            auto_configure_optimizers=False,
            parser_kwargs={"prog": "python -m cwd_lightning"},  # not "__main__.py" in usage and errors
            args=args,
            run=run,
        )

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_argument("--experiment", type=str | None, default=None,
                            help="run name; defaults to the stem of the --config file")  # fmt: skip
        parser.add_argument("--runs_root", type=str, default="runs", help="folder that holds runs/<experiment>/")
        parser.add_argument("--group", type=str | None, default=None,
                            help="W&B group of the runs that compare with each other")  # fmt: skip

    def parse_arguments(self, parser: Any, args: Any) -> None:
        """As LightningCLI, plus the per-term overrides of ``cli/overrides.py``."""
        if isinstance(args, dict | Namespace):
            return super().parse_arguments(parser, args)
        self.config = parse_with_term_overrides(parser, list(sys.argv[1:] if args is None else args))

    def _command(self) -> Any:
        return self.config[self.subcommand] if self.subcommand else self.config  # run=False: no subcommand

    def before_instantiate_classes(self) -> None:
        config = self._command()
        self.run_folder = RunFolder.of(config)
        config.trainer.default_root_dir = str(self.run_folder.path)
        if self.subcommand == "fit":
            config.ckpt_path = self.run_folder.fit_checkpoint(config.get("ckpt_path"))
        elif self.subcommand in ("validate", "test", "predict"):
            config.ckpt_path = self.run_folder.read_checkpoint(config.get("ckpt_path"))

    def instantiate_classes(self) -> None:
        """As LightningCLI, but a network whose weights a checkpoint will replace is built without its
        pretrained weights (no download just to overwrite them, so such runs rebuild offline): the teacher
        when ``teacher_checkpoint`` is set (each of ``teachers`` with its ``teacher_checkpoints`` entry), the
        student when a checkpoint is restored (resume, validate)."""
        config = self._command()
        model, others = config["model"], config["model"].get("teacher_checkpoints") or {}
        replaced = [model.get("teacher") if model.get("teacher_checkpoint") else None,
                    model.get("student") if config.get("ckpt_path") else None,
                    *[spec for name, spec in (model.get("teachers") or {}).items() if others.get(name)]]  # fmt: skip
        try:
            with built_without_pretrained(replaced):
                super().instantiate_classes()
        except (ValueError, FileNotFoundError) as error:  # a bad setting or a missing file: one line, no traceback
            if os.environ.get("CWD_LIGHTNING_TRACEBACK"):
                raise
            raise RunError(f"{innermost_error(str(error))} (CWD_LIGHTNING_TRACEBACK=1 shows where)") from None

    def after_instantiate_classes(self) -> None:
        super().after_instantiate_classes()
        try:  # else a mask value the task does not know is reported as a bad mask, or classes go unused
            check_class_counts(self.model.task, data=getattr(self, "datamodule", None))
        except ValueError as error:
            raise RunError(str(error)) from None

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        if self.subcommand == "fit":
            trainer_config = self.config_init[self.subcommand]["trainer"]
            resuming = bool(self._command().get("ckpt_path"))
            kwargs.update(fit_trainer_arguments(self.run_folder, trainer_config, self.model,
                                                self._command().get("group"), resuming))  # fmt: skip
        else:  # validate/test/predict read a run; they write nothing into its folder
            kwargs.setdefault("logger", False)
            self.save_config_callback = None
        return super().instantiate_trainer(**kwargs)

    def before_fit(self) -> None:
        """Every check of a resume and of the data runs here, before the run record (config, metrics, W&B)
        is touched; only then does a fresh run's folder start (its run id)."""
        ckpt_path = self._command().get("ckpt_path")
        if ckpt_path and launching_rank():  # the other ranks start after these checks passed
            checks.check_resume(self.run_folder, ckpt_path, self.model.teacher_fingerprints, self.trainer)
        checks.check_data(getattr(self, "datamodule", None), "fit", self.run_folder)
        self.run_folder.start()

    def before_validate(self) -> None:
        checks.check_readable(self._command().get("ckpt_path"))
        checks.check_data(getattr(self, "datamodule", None), "validate", self.run_folder)

    def after_fit(self) -> None:
        report_fit(self.trainer, self.run_folder.path)


def main(args: list[str] | None = None) -> None:
    os.environ.setdefault("WANDB_MODE", "offline")  # no account or network needed; online is opt-in
    os.environ.setdefault("WANDB_SILENT", "true")
    # the frozen teacher is in eval mode on purpose; Lightning warns about any module in eval mode at fit start
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode", category=UserWarning)
    try:
        DistillCLI(args=args)
    except RunError as error:
        print(error.code, file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except FloatingPointError as error:  # the non-finite checks stopped the run: their message, one line
        if os.environ.get("CWD_LIGHTNING_TRACEBACK"):
            raise
        print(f"error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
