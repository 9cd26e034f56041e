"""DistillationModule: a frozen teacher, a trainable student and YAML-declared distillation terms."""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn

from cwd_lightning.distill.distiller import Distiller, StepContext
from cwd_lightning.distill.guards import NonFiniteGuard
from cwd_lightning.distill.schedules import Schedule, build_schedule
from cwd_lightning.distill.speed import SpeedSwitches
from cwd_lightning.distill.teacher import (
    LiveTeacher,
    TeacherOutputs,
    combined_fingerprint,
    prepare_teachers,
    restore_into_checkpoint,
    strip_from_checkpoint,
)
from cwd_lightning.distill.teacher_cache import TeacherCacheOptions, cached_teacher_outputs, serve_cache_views
from cwd_lightning.distill.terms import DistillTerm
from cwd_lightning.tasks import Task, check_class_counts


class DistillationModule(L.LightningModule):
    """Total loss = task loss + Σ weight · term. Without teacher and terms it trains a plain model
    (a teacher or a baseline student) through the same code path.

    The teacher is loaded from ``teacher_checkpoint``, frozen, kept in eval mode and run under ``no_grad``; its
    weights are fingerprinted, left out of this module's checkpoints and restored (and checked against the
    fingerprint) on resume. More teachers go in ``teachers`` (by name; weights in ``teacher_checkpoints``),
    handled alike; a term reads one of them (``from_teacher``). With ``teacher_cache`` the training steps read
    the teachers' tensors from caches filled once. The optimiser is ``optimizer`` (the only route to configure
    it) over the student, the connectors and the losses' own modules; a loss that trains a module of its own
    with a second optimiser (an adversarial discriminator) switches the module to Lightning's manual
    optimisation, one update of each optimiser per batch. A non-finite loss, gradient or weight stops the run
    (``on_non_finite: skip`` skips such steps): ``distill/guards.py``.
    """

    def __init__(
        self,
        task: Task,
        student: nn.Module,
        teacher: nn.Module | None = None,
        teacher_checkpoint: str | None = None,
        terms: list[DistillTerm] | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_schedule: Schedule = "poly",
        poly_power: float = 0.9,
        warmup_steps: int = 0,
        on_non_finite: Literal["error", "skip"] = "error",
        channels_last: bool = False,
        compile_student: str | None = None,
        teacher_cache: TeacherCacheOptions | None = None,
        teachers: dict[str, nn.Module] | None = None,
        teacher_checkpoints: dict[str, str] | None = None,
    ) -> None:
        super().__init__()
        self.task, self.student, self.teacher = task, student, teacher
        if "teacher" in (teachers or {}):
            raise ValueError("model.teachers: the name 'teacher' is model.teacher's; name the others otherwise")
        self.teachers = nn.ModuleDict(teachers or {})  # the teachers beside model.teacher, by name
        self.terms = list(terms or [])
        self.optimizer_factory = optimizer
        self.lr_schedule, self.poly_power, self.warmup_steps = lr_schedule, poly_power, warmup_steps
        self.guard = NonFiniteGuard(on_non_finite)
        self.speed = SpeedSwitches(channels_last, compile_student)
        if self.terms and not self.all_teachers():
            raise ValueError("model.terms are set but model.teacher is not: distillation needs a teacher")
        if teacher_cache is not None and not self.terms:
            raise ValueError("model.teacher_cache caches the teacher's tensors of the terms: set model.terms too")
        self.teacher_cache = teacher_cache
        check_class_counts(task, student)
        checkpoints = {
            **({"teacher": teacher_checkpoint} if teacher is not None else {}),
            **(teacher_checkpoints or {}),
        }
        self.teacher_fingerprints = prepare_teachers(self.all_teachers(), checkpoints)
        self.teacher_fingerprint = combined_fingerprint(self.teacher_fingerprints)

        self.distiller: Distiller | None = None
        self.live_teachers: dict[str, LiveTeacher] = {}
        if self.terms:
            models = self.all_teachers()
            self.distiller = Distiller(self.terms, student, models).build(task, student, models)
            recorders = self.distiller.teacher_recorders
            self.live_teachers = {
                name: LiveTeacher(models[name], task, recorder) for name, recorder in recorders.items()
            }
        # where a step's teacher tensors come from: live, or (training steps, once it is open) the cache
        self.live_outputs = TeacherOutputs(list(self.live_teachers.values()))
        self.training_outputs = self.live_outputs
        self.automatic_optimization = self.distiller is None or not self.distiller.auxiliary_pairs()

    # ---------------------------------------------------------------- teachers stay frozen
    def all_teachers(self) -> dict[str, nn.Module]:
        """The run's teachers by name: ``teacher`` (``model.teacher``) and those of ``model.teachers``."""
        return {**({"teacher": self.teacher} if self.teacher is not None else {}), **self.teachers}

    def train(self, mode: bool = True) -> DistillationModule:
        super().train(mode)
        for teacher in self.all_teachers().values():
            teacher.eval()
        return self

    # ---------------------------------------------------------------- steps
    def forward(self, inputs: Any) -> Any:
        return self.task.run(self.student, inputs)

    def compute_losses(self, batch: Any, student_step: Any, teachers: Any = None, auxiliary: bool = False):
        """Record the teachers' tensors (``teachers``: a ``TeacherOutputs``, the live teachers by default) and
        run ``student_step`` recorded: the task loss and its named parts, Σ weight·term, each term's value and
        the auxiliary losses (when asked)."""
        batch = self.speed.inputs(batch)
        if self.distiller is None:
            task_loss, parts = student_step(self.student, batch)
            return task_loss, parts, torch.zeros((), device=self.device), {}, {}
        batch = (teachers or self.live_outputs).record(batch)
        with self.distiller.recording(teacher=False):
            task_loss, parts = student_step(self.student, batch)
        context = StepContext(self.task.dense_labels(batch), self.task.ignore_index, self.global_step)
        distill_total, values, auxiliary_losses = self.distiller.compute(context, auxiliary=auxiliary)
        return task_loss, parts, distill_total, values, auxiliary_losses

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        # a skipped step must leave no trace: its forward already moved the BatchNorm statistics
        statistics = self._statistics() if self.guard.skips else []
        saved = [buffer.clone() for buffer in statistics]
        task_loss, parts, distill_total, values, auxiliary = self.compute_losses(
            batch, self.task.training_loss, self.training_outputs, auxiliary=not self.automatic_optimization
        )
        loss = task_loss + distill_total
        batch_size = self.task.batch_size(batch)
        logs = {"train/loss": loss.detach(), "train/loss_task": task_loss.detach()}
        if len(parts) > 1:
            logs.update({f"train/loss_task/{name}": value for name, value in parts.items()})
        if self.distiller is not None:
            logs.update({f"train/distill/{name}": value for name, value in values.items()})
            logs["train/distill_to_task"] = distill_total.detach() / task_loss.detach().clamp_min(1e-12)
        logs.update({f"train/auxiliary/{name}": value.detach() for name, value in auxiliary.items()})
        self.log_dict(logs, batch_size=batch_size)
        self.log("loss", loss.detach(), prog_bar=True, logger=False, batch_size=batch_size)
        if not self.guard.step_is_finite(logs, (loss, *auxiliary.values()), self.global_step, self.trainer.world_size):
            self.log("train/skipped_steps", float(self.guard.skipped_steps))
            for buffer, value in zip(statistics, saved, strict=True):
                buffer.copy_(value)
            return None  # skipped (on_non_finite: skip): no backward, no update, statistics as before
        if self.automatic_optimization:
            return loss
        self._manual_update(loss, auxiliary)
        return None

    def _statistics(self) -> list[Tensor]:
        """The buffers a training forward changes (BatchNorm running statistics and counters)."""
        modules = [self.student, *([self.distiller] if self.distiller is not None else [])]
        return [buffer for module in modules for buffer in module.buffers()]

    def _manual_update(self, loss: Tensor, auxiliary: dict[str, Tensor]) -> None:
        """One student update, then one update of each loss's own optimiser on its auxiliary loss. The
        auxiliary steps go through the strategy (precision, scaler) but are not counted as training
        steps, so ``max_steps`` and the schedule count student updates, as in automatic optimisation."""
        main, *others = self.optimizers()
        main.zero_grad()
        self.manual_backward(loss)
        main.step()
        self.lr_schedulers().step()
        for pair, optimizer in zip(self.distiller.auxiliary_pairs(), others, strict=True):
            optimizer.zero_grad()  # the student's backward also reached these parameters
            self.manual_backward(auxiliary[pair.key])
            self.trainer.strategy.optimizer_step(optimizer.optimizer, closure=lambda: None, model=self)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        task_loss, _, _, values, _ = self.compute_losses(batch, self.task.validation_step)
        logs = {"val/loss_task": task_loss} if task_loss is not None else {}  # detectors: no eval loss
        logs.update({f"val/distill/{name}": value for name, value in values.items()})
        self.log_dict(logs, batch_size=self.task.batch_size(batch), sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        metrics = self.task.compute_metrics()
        self.log_dict(metrics, sync_dist=True)
        if self.task.monitor in metrics:
            self.log(self.task.monitor.split("/")[-1], metrics[self.task.monitor], prog_bar=True, logger=False)

    # ---------------------------------------------------------------- non-finite checks
    def trained_tensors(self) -> list[tuple[str, Tensor]]:
        """The trained weights and buffers (BatchNorm statistics): student, connectors, losses' own modules."""
        modules = [("student", self.student), *([("distiller", self.distiller)] if self.distiller else [])]
        return [(f"{prefix}.{name}", tensor) for prefix, module in modules
                for name, tensor in [*module.named_parameters(), *module.named_buffers()]]  # fmt: skip

    def non_finite_state(self) -> list[str]:
        return self.guard.non_finite(self.trained_tensors())

    def on_validation_start(self) -> None:
        if self.trainer.state.fn == "fit":  # a diverged student is never validated, so never 'best'
            self.guard.check_state(self.trained_tensors(), self.global_step, "before validation")

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Not under DDP (``distill/guards.py``) nor under a 16-bit grad scaler, which skips such steps."""
        if self.trainer.world_size > 1 or getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            return
        names = {id(p): n for n, p in self.named_parameters()}
        named = [(names.get(id(p), "?"), p.grad) for group in optimizer.param_groups for p in group["params"]]
        self.guard.check_gradients(named, self.global_step)

    # ---------------------------------------------------------------- optimisation
    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the student's optimiser updates: the student, the connectors and the losses' own modules;
        never the teacher, never what a loss trains with its own optimiser."""
        extra = self.distiller.trainable_parameters() if self.distiller is not None else []
        return [p for p in self.student.parameters() if p.requires_grad] + extra

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.trainable_parameters())
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = build_schedule(optimizer, self.lr_schedule, total, self.warmup_steps, self.poly_power)
        main = {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
        if self.automatic_optimization:
            return main
        return [main, *({"optimizer": auxiliary} for auxiliary in self.distiller.auxiliary_optimizers())]

    # ---------------------------------------------------------------- checkpoints without the teacher
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.guard.check_state(self.trained_tensors(), self.global_step, "before writing a checkpoint")
        strip_from_checkpoint(checkpoint, self.teacher_fingerprints)
        checkpoint.update(self.guard.state_dict())

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.guard.load_state_dict(checkpoint)
        restore_into_checkpoint(checkpoint, self.all_teachers(), self.teacher_fingerprints)

    # ---------------------------------------------------------------- speed switches, teacher cache
    def configure_model(self) -> None:
        """Lightning calls this once the module is on its device, before fit and validate."""
        self.speed.apply(self.student, list(self.all_teachers().values()))

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.teacher_cache is not None:
            serve_cache_views(self.teacher_cache, self.trainer.datamodule)

    def on_fit_start(self) -> None:
        self.guard.check_distributed(self.trainer.world_size)
        if self.teacher_cache is not None:  # the training steps read each teacher's cache from now on
            fingerprints, device = self.teacher_fingerprints, self.device
            self.training_outputs = cached_teacher_outputs(self.teacher_cache, self.live_teachers, fingerprints,
                                                           self.trainer, device)  # fmt: skip
