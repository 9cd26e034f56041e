"""DistillationModule: a frozen teacher, a trainable student and YAML-declared distillation terms."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn

from cwd_lightning.distill import teacher as teacher_utils
from cwd_lightning.distill.connectors import build_connector, match_size
from cwd_lightning.distill.recorder import ForwardRecorder
from cwd_lightning.distill.terms import DistillTerm, select, split_path
from cwd_lightning.tasks.base import Task

# the frozen teacher is in eval mode on purpose; Lightning warns about any module in eval mode at fit start
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode", category=UserWarning)


@contextmanager
def evaluating(*modules: nn.Module) -> Iterator[None]:
    """Eval mode inside the block (no BN statistics moved, no dropout), previous modes restored after."""
    modes = [module.training for module in modules]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for module, mode in zip(modules, modes, strict=True):
            module.train(mode)


class DistillationModule(L.LightningModule):
    """Total loss = task loss + Σ weight · term. Without teacher and terms it trains a plain model
    (a teacher or a baseline student) through the same code path.

    The teacher is loaded from ``teacher_checkpoint``, frozen, kept in eval mode and run under
    ``no_grad``; its weights are fingerprinted, left out of this module's checkpoints and restored
    (and checked against the fingerprint) on resume.
    """

    def __init__(
        self,
        task: Task,
        student: nn.Module,
        teacher: nn.Module | None = None,
        teacher_checkpoint: str | None = None,
        terms: list[DistillTerm] | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_schedule: Literal["poly", "onecycle", "constant"] = "poly",
        poly_power: float = 0.9,
        warmup_steps: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["task", "student", "teacher", "terms", "optimizer"])
        self.task = task
        self.student = student
        self.terms = list(terms or [])
        self.optimizer_factory = optimizer
        self.lr_schedule = lr_schedule
        self.poly_power = poly_power
        self.warmup_steps = warmup_steps

        if self.terms and teacher is None:
            raise ValueError("model.terms are set but model.teacher is not: distillation needs a teacher")
        if teacher is not None and teacher_checkpoint is None:
            raise ValueError(
                "model.teacher is set but model.teacher_checkpoint is not: a teacher with random weights "
                "teaches nothing (give a teacher run's .ckpt or a state_dict file)"
            )
        self.teacher = teacher
        self.teacher_fingerprint: str | None = None
        if teacher is not None:
            teacher_utils.load_weights(teacher, teacher_checkpoint)
            teacher_utils.freeze(teacher)
            self.teacher_fingerprint = teacher_utils.fingerprint(teacher)
            self.hparams["teacher_fingerprint"] = self.teacher_fingerprint

        self.student_recorder = ForwardRecorder(
            student, [split_path(p)[0] for t in self.terms for p in t.student_paths], side="student"
        )
        self.teacher_recorder = (
            ForwardRecorder(teacher, [split_path(p)[0] for t in self.terms for p in t.teacher_paths], side="teacher")
            if teacher is not None
            else None
        )
        self.distill_losses = nn.ModuleDict({term.name: term.loss for term in self.terms})
        self.connectors = nn.ModuleDict()
        if len(self.distill_losses) != len(self.terms):
            raise ValueError("model.terms: every distillation term needs a unique name")
        if self.terms:
            self._probe_and_build_connectors()

    # ---------------------------------------------------------------- construction checks
    def _probe_and_build_connectors(self) -> None:
        """One small forward of both models: checks that every tapped tensor exists, builds connectors
        with the right channel counts, and fails now, not at step 1, on a shape mismatch."""
        example = self.task.example_input()
        with torch.no_grad(), evaluating(self.student), self.student_recorder, self.teacher_recorder:
            self.task.run(self.student, example)
            self.task.run(self.teacher, example)
        for term in self.terms:
            for label, student_path, teacher_path in term.pairs():
                if term.connector is not None:
                    student_tensor, teacher_tensor = self._tapped(student_path, teacher_path)
                    self.connectors[self._connector_key(term, label)] = build_connector(
                        term.connector, student_tensor.shape[1], teacher_tensor.shape[1]
                    )
                with torch.no_grad(), evaluating(self.connectors):  # no BN statistics moved by the probe
                    student_tensor, teacher_tensor = self._aligned(term, label, student_path, teacher_path)
                if student_tensor.shape[1:] != teacher_tensor.shape[1:]:
                    raise ValueError(
                        f"distillation term {term.name!r}: student {student_path!r} gives "
                        f"{tuple(student_tensor.shape[1:])} but teacher {teacher_path!r} gives "
                        f"{tuple(teacher_tensor.shape[1:])} (C×H×W). Set connector: conv|conv_bn|conv_bn_relu "
                        "for a channel mismatch and/or resize: student_to_teacher|teacher_to_student for H×W."
                    )
        self.student_recorder.clear()
        self.teacher_recorder.clear()

    @staticmethod
    def _connector_key(term: DistillTerm, label: str) -> str:
        return f"{term.name}_{label}" if label else term.name

    def _aligned(self, term: DistillTerm, label: str, student_path: str, teacher_path: str) -> tuple[Tensor, Tensor]:
        """The recorded pair, with the term's connector and resize applied: what its loss compares."""
        student_tensor, teacher_tensor = self._tapped(student_path, teacher_path)
        key = self._connector_key(term, label)
        if key in self.connectors:
            student_tensor = self.connectors[key](student_tensor)
        if term.resize is not None:
            student_tensor, teacher_tensor = match_size(student_tensor, teacher_tensor, term.resize)
        return student_tensor, teacher_tensor

    def _tapped(self, student_path: str, teacher_path: str) -> tuple[Tensor, Tensor]:
        student_module, student_key = split_path(student_path)
        teacher_module, teacher_key = split_path(teacher_path)
        return (
            select(self.student_recorder.get(student_module), student_key, f"student {student_path!r}"),
            select(self.teacher_recorder.get(teacher_module), teacher_key, f"teacher {teacher_path!r}"),
        )

    # ---------------------------------------------------------------- teacher stays frozen
    def train(self, mode: bool = True) -> DistillationModule:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    # ---------------------------------------------------------------- steps
    def forward(self, inputs: Any) -> Any:
        return self.task.run(self.student, inputs)

    def _distillation_terms(self) -> tuple[Tensor, dict[str, Tensor]]:
        """Σ weight·term and each term's (unweighted) value, per pair when a term expands."""
        total = torch.zeros((), device=self.device)
        values: dict[str, Tensor] = {}
        for term in self.terms:
            pair_values = []
            for label, student_path, teacher_path in term.pairs():
                value = term.loss(*self._aligned(term, label, student_path, teacher_path))
                pair_values.append(value)
                if label:
                    values[f"{term.name}/{label}"] = value.detach()
            term_value = torch.stack(pair_values).sum()
            values[term.name] = term_value.detach()
            total = total + term.weight * term_value
        self.student_recorder.clear()
        self.teacher_recorder.clear()
        return total, values

    def _losses(self, batch: Any, student_step: Any) -> tuple[Tensor, Tensor, dict[str, Tensor], dict[str, Tensor]]:
        """Run the teacher (no_grad, recorded) and ``student_step`` (recorded): task loss, Σ weight·term,
        the task loss's named parts and each term's value."""
        if not self.terms:
            task_loss, parts = student_step(self.student, batch)
            return task_loss, torch.zeros((), device=self.device), parts, {}
        with torch.no_grad(), self.teacher_recorder:
            self.task.run(self.teacher, self.task.batch_inputs(batch))
        with self.student_recorder:
            task_loss, parts = student_step(self.student, batch)
        distill_total, values = self._distillation_terms()
        return task_loss, distill_total, parts, values

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        task_loss, distill_total, parts, values = self._losses(batch, self.task.training_loss)
        loss = task_loss + distill_total
        batch_size = self.task.batch_size(batch)
        logs = {"train/loss": loss.detach(), "train/loss_task": task_loss.detach()}
        if len(parts) > 1:
            logs.update({f"train/loss_task/{name}": value for name, value in parts.items()})
        if self.terms:
            logs.update({f"train/distill/{name}": value for name, value in values.items()})
            logs["train/distill_to_task"] = distill_total.detach() / task_loss.detach().clamp_min(1e-12)
        self.log_dict(logs, batch_size=batch_size)
        self.log("loss", loss.detach(), prog_bar=True, logger=False, batch_size=batch_size)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite loss at step {self.global_step}: { ({k: float(v) for k, v in logs.items()}) }"
            )
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        task_loss, _, _, values = self._losses(batch, self.task.validation_step)
        logs = {"val/loss_task": task_loss} if task_loss is not None else {}  # detectors: no eval loss
        logs.update({f"val/distill/{name}": value for name, value in values.items()})
        self.log_dict(logs, batch_size=self.task.batch_size(batch), sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        metrics = self.task.compute_metrics()
        self.log_dict(metrics, sync_dist=True)
        if self.task.monitor in metrics:
            self.log(self.task.monitor.split("/")[-1], metrics[self.task.monitor], prog_bar=True, logger=False)

    @torch.no_grad()
    def distillation_pairs(self, batch: Any) -> dict[str, tuple[Tensor, Tensor, float, list[str] | None]]:
        """For inspection (eval mode, no gradient): per term and pair, the aligned (student, teacher)
        tensors, the loss's τ (1 if it has none) and channel names when channels are the classes."""
        if not self.terms:
            return {}
        inputs = self.task.batch_inputs(batch)
        try:
            with evaluating(self.student, self.connectors):
                with self.teacher_recorder:
                    self.task.run(self.teacher, inputs)
                with self.student_recorder:
                    self.task.run(self.student, inputs)
                pairs = {}
                class_names = getattr(self.task, "class_names", None)
                for term in self.terms:
                    for label, student_path, teacher_path in term.pairs():
                        student, teacher = self._aligned(term, label, student_path, teacher_path)
                        names = class_names if class_names and len(class_names) == student.shape[1] else None
                        tau = float(getattr(term.loss, "tau", 1.0))
                        pairs[f"{term.name}/{label}" if label else term.name] = (student, teacher, tau, names)
                return pairs
        finally:
            self.student_recorder.clear()
            self.teacher_recorder.clear()

    # ---------------------------------------------------------------- optimisation
    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the optimiser updates: the student and the connectors, never the teacher."""
        return [p for p in [*self.student.parameters(), *self.connectors.parameters()] if p.requires_grad]

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.optimizer_factory(self.trainable_parameters())
        total = max(1, int(self.trainer.estimated_stepping_batches))
        if self.lr_schedule == "onecycle":
            max_lrs = [group["lr"] for group in optimizer.param_groups]
            scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lrs, total_steps=total)
        else:
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_factor(total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _lr_factor(self, total: int):
        warmup, power, schedule = self.warmup_steps, self.poly_power, self.lr_schedule

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            if schedule == "constant":
                return 1.0
            return max(0.0, 1.0 - step / total) ** power  # poly, as in the CWD / mmseg recipes

        return factor

    # ---------------------------------------------------------------- checkpoints without the teacher
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("teacher.")}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("hyper_parameters", {}).get("teacher_fingerprint")
        if saved != self.teacher_fingerprint:
            raise ValueError(
                "the teacher does not match the one this checkpoint was trained with: fingerprint "
                f"{self.teacher_fingerprint} now, {saved} in the checkpoint (check model.teacher_checkpoint)"
            )
        if self.teacher is not None:
            checkpoint["state_dict"].update({f"teacher.{k}": v for k, v in self.teacher.state_dict().items()})

    # ---------------------------------------------------------------- reporting
    def parameter_counts(self) -> dict[str, int]:
        def count(params) -> int:
            return sum(p.numel() for p in params)

        return {
            "params/student": count(self.student.parameters()),
            "params/teacher": count(self.teacher.parameters()) if self.teacher is not None else 0,
            "params/connectors": count(self.connectors.parameters()),
            "params/trainable": count(p for p in self.parameters() if p.requires_grad),
        }

    def on_fit_start(self) -> None:
        for logger in self.loggers:
            logger.log_hyperparams(self.parameter_counts())
