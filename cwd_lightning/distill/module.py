"""DistillationModule: a frozen teacher, a trainable student and YAML-declared distillation terms."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn

from cwd_lightning.distill.budget import TimeBudget, TrainingClock
from cwd_lightning.distill.distiller import Distiller, StepContext
from cwd_lightning.distill.guards import NonFiniteGuard
from cwd_lightning.distill.preparation import prepare_losses
from cwd_lightning.distill.schedules import VIRTUAL_STEPS, Schedule, advance_to, build_schedule
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
from cwd_lightning.distill.weights import TermWeights, gradient_norm
from cwd_lightning.tasks import Task, check_class_counts


@dataclass
class StepLosses:
    """What one step computes: the task loss and its named parts, Σ weight·term, each term's unweighted value
    (in the graph), the detached values to log and the auxiliary losses of losses with their own optimiser."""

    task: Tensor
    parts: dict[str, Tensor]
    distill: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)
    values: dict[str, Tensor] = field(default_factory=dict)
    auxiliary: dict[str, Tensor] = field(default_factory=dict)


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
    (``on_non_finite: skip`` skips such steps): ``distill/guards.py``. A term's weight may follow a schedule or
    be calibrated (``distill/weights.py``); ``time_budget`` trains for seconds of the training loop instead of
    steps, the schedules defined over the budget (``distill/budget.py``).
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
    ) -> None:
        super().__init__()
        self.task, self.student, self.teacher = task, student, teacher
        if "teacher" in (teachers or {}):
            raise ValueError("model.teachers: the name 'teacher' is model.teacher's; name the others otherwise")
        if "teacher" in (teacher_checkpoints or {}):
            raise ValueError("model.teacher_checkpoints: model.teacher's weights go in model.teacher_checkpoint")
        if teachers and not terms:
            raise ValueError("model.teachers are set but model.terms are not: no term would read them")
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
        self.clock = TrainingClock(time_budget) if time_budget is not None else None
        if self.clock is not None and warmup_steps:
            raise ValueError("model.warmup_steps: a schedule over model.time_budget has no step count; use "
                             "lr_schedule: onecycle (its own warm-up) or 0")  # fmt: skip
        self.term_weights = TermWeights(self.terms)
        self.total_steps = 1  # of the schedule; set with the optimiser
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
        self.share_layers = {
            term.name: self._layer_parameters(term) for term in self.terms
            if term.calibration is not None and term.calibration.mode == "gradient_share"
        }  # fmt: skip

    def _layer_parameters(self, term: DistillTerm) -> list[nn.Parameter]:
        layer = term.calibration.layer
        try:
            module = self.student.get_submodule(layer)
        except AttributeError:
            raise ValueError(f"distillation term {term.name!r}: calibration.layer {layer!r} is not a module of the "
                             "student") from None  # fmt: skip
        parameters = [p for p in module.parameters() if p.requires_grad]
        if not parameters:
            raise ValueError(f"distillation term {term.name!r}: calibration.layer {layer!r} has no trained parameters")
        return parameters

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

    def step_losses(
        self,
        batch: Any,
        student_step: Any,
        teachers: Any = None,
        auxiliary: bool = False,
        weights: dict[str, float] | None = None,
    ) -> StepLosses:
        """Record the teachers' tensors (``teachers``: a ``TeacherOutputs``, the live teachers by default) and
        run ``student_step`` recorded; the terms are weighted by ``weights`` (their own weights by default)."""
        batch = self.speed.inputs(batch)
        if self.distiller is None:
            task_loss, parts = student_step(self.student, batch)
            return StepLosses(task_loss, parts, torch.zeros((), device=self.device))
        batch = (teachers or self.live_outputs).record(batch)
        with self.distiller.recording(teacher=False):
            task_loss, parts = student_step(self.student, batch)
        context = StepContext(self.task.dense_labels(batch), self.task.ignore_index, self.global_step)
        terms, values, auxiliary_losses = self.distiller.term_values(context, auxiliary=auxiliary)
        distill = self.distiller.weighted_total(terms, weights)
        return StepLosses(task_loss, parts, distill, terms, values, auxiliary_losses)

    def compute_losses(self, batch: Any, student_step: Any, teachers: Any = None, auxiliary: bool = False):
        """``step_losses`` as a tuple: the task loss, its parts, Σ weight·term, the values, the auxiliary losses."""
        losses = self.step_losses(batch, student_step, teachers, auxiliary)
        return losses.task, losses.parts, losses.distill, losses.values, losses.auxiliary

    def progress(self) -> float:
        """The share of training done: of the time budget, else of the schedule's steps."""
        return self.clock.progress if self.clock is not None else self.global_step / self.total_steps

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        # a skipped step must leave no trace: its forward already moved the BatchNorm statistics
        statistics = self._statistics() if self.guard.skips else []
        saved = [buffer.clone() for buffer in statistics]
        step = self.global_step
        weights = self.term_weights.at(step, self.progress())
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
        self._calibrate(step, losses, weights)
        if self.automatic_optimization:
            return loss
        self._manual_update(loss, auxiliary)
        return None

    def _calibrate(self, step: int, losses: StepLosses, weights: dict[str, float]) -> None:
        """The calibrations' measurements of this step (they set the weights of the following steps)."""

        def mean(value: Tensor) -> Tensor:
            return self.trainer.strategy.reduce(value, reduce_op="mean")

        self.term_weights.observe(step, losses.task, losses.terms, mean)
        for name in self.term_weights.share_due(step, weights):
            parameters = self.share_layers[name]
            term_norm = gradient_norm(weights[name] * losses.terms[name], parameters)
            if term_norm is None:
                layer = self.term_weights.terms[name].calibration.layer
                raise ValueError(f"distillation term {name!r}: its gradient does not reach calibration.layer "
                                 f"{layer!r} of the student")  # fmt: skip
            task_norm = gradient_norm(losses.task, parameters)
            task_norm = torch.zeros(()) if task_norm is None else task_norm
            share = self.term_weights.update_share(name, float(mean(term_norm)), float(mean(task_norm)))
            self.log(f"train/gradient_share/{name}", share)

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

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        """One step, or under a time budget: to the share of the budget spent (time spent stepping not counted)."""
        if self.clock is None:
            scheduler.step()
            return
        self.clock.stop()
        advance_to(scheduler, self.clock.progress)
        self.clock.start(self.device)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.clock is not None:
            self.clock.start(self.device)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.clock is None:
            return
        self.clock.stop()
        self.log("train/budget_spent_s", self.clock.elapsed)
        if self.clock.spent:  # Lightning validates once more before it stops
            self.trainer.should_stop = True

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
        if self.term_weights.varying:
            checkpoint["term_weights"] = self.term_weights.state_dict()
        if self.clock is not None:
            checkpoint["time_budget"] = self.clock.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.guard.load_state_dict(checkpoint)
        if "term_weights" in checkpoint:
            self.term_weights.load_state_dict(checkpoint["term_weights"])
        if self.clock is not None and "time_budget" in checkpoint:
            self.clock.load_state_dict(checkpoint["time_budget"])
        restore_into_checkpoint(checkpoint, self.all_teachers(), self.teacher_fingerprints)

    # ---------------------------------------------------------------- speed switches, teacher cache
    def configure_model(self) -> None:
        """Lightning calls this once the module is on its device, before fit and validate."""
        self.speed.apply(self.student, list(self.all_teachers().values()))

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.teacher_cache is not None:
            serve_cache_views(self.teacher_cache, self.trainer.datamodule)

    def on_train_start(self) -> None:
        """The losses' preparations on the teacher, once, before the first step (a resumed run has them from its
        checkpoint)."""
        if self.distiller is not None and self.distiller.preparing_pairs():
            prepare_losses(self)

    def on_fit_start(self) -> None:
        self.guard.check_distributed(self.trainer.world_size)
        if self.clock is not None and self.trainer.max_steps != -1:
            raise ValueError(f"model.time_budget ends the run, but trainer.max_steps is {self.trainer.max_steps}: "
                             "set trainer.max_steps: -1 (and trainer.max_epochs: -1)")  # fmt: skip
        if self.teacher_cache is not None:  # the training steps read each teacher's cache from now on
            fingerprints, device = self.teacher_fingerprints, self.device
            self.training_outputs = cached_teacher_outputs(self.teacher_cache, self.live_teachers, fingerprints,
                                                           self.trainer, device)  # fmt: skip
