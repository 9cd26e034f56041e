"""DistillationModule: a frozen teacher, a trainable student and YAML-declared distillation terms."""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn

from cwd_lightning.distill.budget import TimeBudget, TimeBudgetSteps, TrainingClock
from cwd_lightning.distill.cached_run import CachedTeacherRun, TeacherCacheOptions
from cwd_lightning.distill.distiller import Distiller
from cwd_lightning.distill.guards import NonFiniteChecks, NonFiniteGuard
from cwd_lightning.distill.pairs import StepContext, StepLosses
from cwd_lightning.distill.preparation import prepare_losses
from cwd_lightning.distill.schedules import VIRTUAL_STEPS, Schedule, build_schedule
from cwd_lightning.distill.speed import SpeedSwitches, TeacherPrecision, TeacherSpeed
from cwd_lightning.distill.teacher import (
    FrozenTeachers,
    LiveTeacher,
    TeacherOutputs,
    combined_fingerprint,
    prepare_teachers,
    restore_into_checkpoint,
    strip_from_checkpoint,
    teacher_files,
)
from cwd_lightning.distill.terms import DistillTerm
from cwd_lightning.distill.weights import TermWeights, calibrate, share_layer_parameters
from cwd_lightning.tasks import Task, check_class_counts


class DistillationModule(FrozenTeachers, NonFiniteChecks, TimeBudgetSteps, CachedTeacherRun, L.LightningModule):
    """Total loss = task loss + Σ weight · term. Without teacher and terms it trains a plain model
    (a teacher or a baseline student) through the same code path.

    Teachers (``teacher`` and the named ``teachers``, weights in ``teacher_checkpoint(s)``) are frozen, in eval
    mode, under ``no_grad``, fingerprinted, left out of the checkpoints and restored on resume (``teacher.py``);
    ``teacher_cache`` serves their tensors from caches (``cached_run.py``); ``teacher_precision`` and
    ``teacher_channels_last`` run them otherwise than the student (``speed.py``). ``optimizer`` trains the
    student, the connectors and the losses' own modules; a loss with an optimiser of its own switches to manual
    optimisation, one update of each per batch; a loss's preparation runs once before the first step
    (``preparation.py``). Non-finite values stop the run or, with ``on_non_finite: skip``, the step
    (``guards.py``). Term weights may follow a schedule or a calibration (``weights.py``); ``time_budget`` trains
    for seconds instead of steps (``budget.py``).
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
        time_budget: TimeBudget | None = None,
        teacher_precision: TeacherPrecision = "auto",
        teacher_channels_last: bool | None = None,
    ) -> None:
        super().__init__()
        self.task, self.student, self.teacher = task, student, teacher
        checkpoints = teacher_files(teacher, teacher_checkpoint, teachers, teacher_checkpoints, terms)
        self.teachers = nn.ModuleDict(teachers or {})  # the teachers beside model.teacher, by name
        self.terms = list(terms or [])
        self.optimizer_factory = optimizer
        self.lr_schedule, self.poly_power, self.warmup_steps = lr_schedule, poly_power, warmup_steps
        self.guard = NonFiniteGuard(on_non_finite)
        self.speed = SpeedSwitches(
            channels_last, compile_student, TeacherSpeed(teacher_precision, teacher_channels_last)
        )
        if teacher_cache is not None and not self.terms:
            raise ValueError("model.teacher_cache caches the teacher's tensors of the terms: set model.terms too")
        self.teacher_cache = teacher_cache
        self.clock = TrainingClock(time_budget, warmup_steps) if time_budget is not None else None
        self.term_weights = TermWeights(self.terms)
        self.total_steps = 1  # of the schedule; set with the optimiser
        check_class_counts(task, student)
        self.teacher_fingerprints = prepare_teachers(self.all_teachers(), checkpoints)
        self.teacher_fingerprint = combined_fingerprint(self.teacher_fingerprints)

        self.distiller: Distiller | None = None
        self.live_teachers: dict[str, LiveTeacher] = {}
        if self.terms:
            models = self.all_teachers()
            self.distiller = Distiller(self.terms, student, models).build(task, student, models)
            self.live_teachers = {name: LiveTeacher(models[name], task, recorder, self.speed.teacher)
                                  for name, recorder in self.distiller.teacher_recorders.items()}  # fmt: skip
        self.live_outputs = TeacherOutputs(list(self.live_teachers.values()))  # training steps: maybe the cache
        self.training_outputs = self.live_outputs
        self.automatic_optimization = self.distiller is None or not self.distiller.auxiliary_pairs()
        self.share_layers = share_layer_parameters(self.student, self.terms)

    # ---------------------------------------------------------------- steps
    def forward(self, inputs: Any) -> Any:
        return self.task.run(self.student, inputs)

    def step_losses(
        self,
        batch: Any,
        student_step: Any,
        teachers: Any = None,
        auxiliary: bool = False,
        weights: dict[str, float] | None = None,
        distill: bool = True,
    ) -> StepLosses:
        """Record the teachers' tensors (``teachers``: a ``TeacherOutputs``, the live teachers by default) and
        run ``student_step`` recorded; the terms are weighted by ``weights`` (their own weights by default).
        Without ``distill`` (or terms) the student runs alone."""
        batch = self.speed.inputs(batch)
        if self.distiller is None or not distill:
            task_loss, parts = student_step(self.student, batch)
            return StepLosses(task_loss, parts, torch.zeros((), device=self.device))
        batch = (teachers or self.live_outputs).record(batch)
        with self.distiller.recording(teacher=False):
            task_loss, parts = student_step(self.student, batch)
        boxes = self.task.input_boxes(batch) if self.distiller.wants_boxes else None
        context = StepContext(self.task.dense_labels(batch), self.task.ignore_index, self.global_step,
                              *(boxes or (None, None)))  # fmt: skip
        terms, values, auxiliary_losses = self.distiller.term_values(context, auxiliary=auxiliary)
        distill = self.distiller.weighted_total(terms, weights)
        return StepLosses(task_loss, parts, distill, terms, values, auxiliary_losses)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        # a skipped step must leave no trace: its forward already moved the BatchNorm statistics
        statistics = self._statistics() if self.guard.skips else []
        saved = [buffer.clone() for buffer in statistics]
        step = self.global_step
        progress = self.clock.progress if self.clock is not None else step / self.total_steps  # of budget or steps
        weights = self.term_weights.at(step, progress)
        losses = self.step_losses(batch, self.task.training_loss, self.training_outputs,
                                  auxiliary=not self.automatic_optimization, weights=weights)  # fmt: skip
        task_loss, distill_total, auxiliary = losses.task, losses.distill, losses.auxiliary
        loss = task_loss + distill_total
        batch_size = self.task.batch_size(batch)
        logs = {"train/loss": loss.detach(), "train/loss_task": task_loss.detach()}
        if len(losses.parts) > 1:
            logs.update({f"train/loss_task/{name}": value for name, value in losses.parts.items()})
        if self.distiller is not None:
            logs.update({f"train/distill/{name}": value for name, value in losses.values.items()})
            logs["train/distill_to_task"] = distill_total.detach() / task_loss.detach().clamp_min(1e-12)
            logs.update({f"train/weight/{name}": weights[name] for name in self.term_weights.varying})
        logs.update({f"train/auxiliary/{name}": value.detach() for name, value in auxiliary.items()})
        self.log_dict(logs, batch_size=batch_size)
        self.log("loss", loss.detach(), prog_bar=True, logger=False, batch_size=batch_size)
        if not self.guard.step_is_finite(logs, (loss, *auxiliary.values()), self.global_step, self.trainer.world_size):
            self.log("train/skipped_steps", float(self.guard.skipped_steps))
            for buffer, value in zip(statistics, saved, strict=True):
                buffer.copy_(value)
            return None  # skipped (on_non_finite: skip): no backward, no update, statistics as before
        calibrate(self, step, losses, weights)
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
        self.lr_scheduler_step(self.lr_schedulers(), None)
        for pair, optimizer in zip(self.distiller.auxiliary_pairs(), others, strict=True):
            optimizer.zero_grad()  # the student's backward also reached these parameters
            self.manual_backward(auxiliary[pair.key])
            self.trainer.strategy.optimizer_step(optimizer.optimizer, closure=lambda: None, model=self)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        losses = self.step_losses(batch, self.task.validation_step, distill=self.validates_with_teachers(batch_idx))
        logs = {"val/loss_task": losses.task} if losses.task is not None else {}  # detectors: no eval loss
        logs.update({f"val/distill/{name}": value for name, value in losses.values.items()})
        self.log_dict(logs, batch_size=self.task.batch_size(batch), sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        metrics = self.task.compute_metrics()
        self.log_dict(metrics, sync_dist=True)
        if self.task.monitor in metrics:
            self.log(self.task.monitor.split("/")[-1], metrics[self.task.monitor], prog_bar=True, logger=False)

    # ---------------------------------------------------------------- optimisation
    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the student's optimiser updates: the student, the connectors and the losses' own modules;
        never the teacher, never what a loss trains with its own optimiser."""
        extra = self.distiller.trainable_parameters() if self.distiller is not None else []
        return [p for p in self.student.parameters() if p.requires_grad] + extra

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.trainable_parameters())
        if self.clock is None:
            self.total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        else:  # the schedule runs over the budget: virtual steps, advanced with the time spent
            self.total_steps = VIRTUAL_STEPS
        scheduler = build_schedule(optimizer, self.lr_schedule, self.total_steps, self.warmup_steps, self.poly_power)
        main = {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
        if self.automatic_optimization:
            return main
        return [main, *({"optimizer": auxiliary} for auxiliary in self.distiller.auxiliary_optimizers())]

    # ---------------------------------------------------------------- checkpoints without the teacher
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.guard.check_state(self.trained_tensors(), self.global_step, "before writing a checkpoint")
        strip_from_checkpoint(checkpoint, self.teacher_fingerprints)
        checkpoint.update(self.guard.state_dict())
        checkpoint.update({key: state.state_dict() for key, state in self._run_states().items()})

    def _run_states(self) -> dict[str, Any]:  # what a resume needs beyond the weights, when used
        states = {"term_weights": self.term_weights if self.term_weights.varying else None, "time_budget": self.clock}
        return {key: state for key, state in states.items() if state is not None}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.guard.load_state_dict(checkpoint)
        for key, state in self._run_states().items():
            if key in checkpoint:
                state.load_state_dict(checkpoint[key])
        restore_into_checkpoint(checkpoint, self.all_teachers(), self.teacher_fingerprints)

    # ---------------------------------------------------------------- speed switches, teacher cache
    def configure_model(self) -> None:
        """Lightning calls this once the module is on its device, before fit and validate."""
        self.speed.apply(self.student, list(self.all_teachers().values()))

    def on_train_start(self) -> None:
        """The losses' preparations on the teacher, once before the first step (a resume has them already)."""
        if self.distiller is not None and self.distiller.preparing_pairs():
            prepare_losses(self)

    def on_fit_start(self) -> None:
        self.guard.check_distributed(self.trainer.world_size)
        self.check_budget_limits()
        self.open_teacher_caches()  # with model.teacher_cache, the training steps read the caches from now on
