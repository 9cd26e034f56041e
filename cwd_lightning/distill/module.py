"""DistillationModule: a frozen teacher, a trainable student and YAML-declared distillation terms."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn

from cwd_lightning.distill import teacher as teacher_utils
from cwd_lightning.distill.distiller import Distiller, StepContext, evaluating
from cwd_lightning.distill.inspection import parameter_counts
from cwd_lightning.distill.schedules import Schedule, build_schedule
from cwd_lightning.distill.teacher_cache import DTYPES, TeacherCache, cache_folder, default_root
from cwd_lightning.distill.terms import DistillTerm
from cwd_lightning.tasks.base import Task

# the frozen teacher is in eval mode on purpose; Lightning warns about any module in eval mode at fit start
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode", category=UserWarning)


#: on_non_finite: skip gives up after this many non-finite batches in a row (a diverged model, not a bad batch)
MAX_CONSECUTIVE_SKIPS = 20


class DistillationModule(L.LightningModule):
    """Total loss = task loss + Σ weight · term. Without teacher and terms it trains a plain model
    (a teacher or a baseline student) through the same code path.

    The teacher is loaded from ``teacher_checkpoint``, frozen, kept in eval mode and run under
    ``no_grad``; its weights are fingerprinted, left out of this module's checkpoints and restored
    (and checked against the fingerprint) on resume. The optimiser is ``optimizer`` (the only route to
    configure it) over the student, the connectors and the losses' own modules; a loss that trains a
    module of its own with a second optimiser (an adversarial discriminator) switches the module to
    Lightning's manual optimisation, one update of each optimiser per batch.
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
        teacher_cache_views: int = 0,
        teacher_cache_dir: str | None = None,
        teacher_cache_dtype: Literal["float16", "float32"] = "float16",
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
        if on_non_finite not in ("error", "skip"):
            raise ValueError(f"model.on_non_finite must be 'error' or 'skip', got {on_non_finite!r}")
        self.on_non_finite = on_non_finite
        self.skipped_steps = 0  # steps whose loss was not finite, skipped (on_non_finite: skip); checkpointed
        self._consecutive_skips = 0
        self.channels_last = channels_last
        self.compile_student = compile_student
        if teacher_cache_views < 0 or (teacher_cache_views and not terms):
            raise ValueError("model.teacher_cache_views must be ≥ 0, and > 0 only with distillation terms")
        if teacher_cache_dtype not in DTYPES:
            raise ValueError(f"model.teacher_cache_dtype must be one of {sorted(DTYPES)}, got {teacher_cache_dtype!r}")
        self.teacher_cache_views, self.teacher_cache_dir = teacher_cache_views, teacher_cache_dir
        self.teacher_cache_dtype = teacher_cache_dtype
        self.teacher_cache: TeacherCache | None = None  # opened at fit start (see ``_open_teacher_cache``)

        if self.terms and teacher is None:
            raise ValueError("model.terms are set but model.teacher is not: distillation needs a teacher")
        check_class_counts(task, student)
        pretrained = getattr(teacher, "pretrained_source", None)  # set by the zoo builders (models/zoo.py)
        if teacher is not None and teacher_checkpoint is None and pretrained is None:
            raise ValueError(
                "model.teacher is set but model.teacher_checkpoint is not: a teacher with random weights "
                "teaches nothing (give a teacher run's .ckpt or a state_dict file, or build the teacher with "
                "pretrained weights: cwd_lightning.models.zoo.torchvision_model / smp_pretrained)"
            )
        self.teacher = teacher
        self.teacher_fingerprint: str | None = None
        if teacher is not None:
            if teacher_checkpoint is not None:  # over whatever the builder loaded
                teacher_utils.load_weights(teacher, teacher_checkpoint)
            teacher_utils.freeze(teacher)
            self.teacher_fingerprint = teacher_utils.fingerprint(teacher)
            self.hparams["teacher_fingerprint"] = self.teacher_fingerprint

        self.distiller: Distiller | None = None
        if self.terms:
            self.distiller = Distiller(self.terms, student, teacher)
            example = task.example_input()
            with evaluating(student):
                self.distiller.build(
                    lambda: task.run(student, example, self.distiller.student_recorder.paths),
                    lambda: task.run(teacher, example, self.distiller.teacher_recorder.paths),
                    has_labels=task.has_dense_labels,
                    ignore_index=task.ignore_index,
                )
        self.auxiliary_keys = (
            [p.key for p in self.distiller.iter_pairs() if p.auxiliary_optimizer] if self.terms else []
        )
        self.automatic_optimization = not self.auxiliary_keys

    # ---------------------------------------------------------------- teacher stays frozen
    def train(self, mode: bool = True) -> DistillationModule:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    # ---------------------------------------------------------------- steps
    def forward(self, inputs: Any) -> Any:
        return self.task.run(self.student, inputs)

    def _losses(self, batch: Any, student_step: Any, auxiliary: bool = False):
        """Run the teacher (no_grad, recorded) and ``student_step`` (recorded): the task loss and its
        named parts, Σ weight·term, each term's value and the auxiliary losses (when asked)."""
        batch = self._memory_format(batch)
        if self.distiller is None:
            task_loss, parts = student_step(self.student, batch)
            return task_loss, parts, torch.zeros((), device=self.device), {}, {}
        if self.teacher_cache is not None and self.training and len(batch) == 3:  # (images, masks, cache keys)
            batch, keys = batch[:2], batch[2]
            self.distiller.teacher_recorder.outputs = self.teacher_cache.lookup(keys, self.device)
        else:
            with torch.no_grad(), self.distiller.recording(student=False):
                self.task.run(self.teacher, self.task.batch_inputs(batch), self.distiller.teacher_recorder.paths)
        with self.distiller.recording(teacher=False):
            task_loss, parts = student_step(self.student, batch)
        context = StepContext(self.task.dense_labels(batch), self.task.ignore_index, self.global_step)
        distill_total, values, auxiliary_losses = self.distiller.compute(context, auxiliary=auxiliary)
        return task_loss, parts, distill_total, values, auxiliary_losses

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        # a skipped step must leave no trace: its forward already moved the BatchNorm statistics
        statistics = self._statistics() if self.on_non_finite == "skip" else []
        saved = [buffer.clone() for buffer in statistics]
        task_loss, parts, distill_total, values, auxiliary = self._losses(
            batch, self.task.training_loss, auxiliary=not self.automatic_optimization
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
        if not self._finite_step(logs, (loss, *auxiliary.values())):
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

    def _finite_step(self, logs: dict[str, Tensor], losses: tuple[Tensor, ...]) -> bool:
        """False when this step is to be skipped. Under DDP nothing is checked here: a host sync every step
        would stall the ranks, and a rank raising alone would leave the others waiting in the next
        all-reduce; a non-finite loss there reaches the weights of every rank, which are checked on every
        rank together before each validation and checkpoint."""
        if self.trainer.world_size > 1 or all(bool(torch.isfinite(value)) for value in losses):
            self._consecutive_skips = 0
            return True
        bad = [name for name, value in logs.items() if not torch.isfinite(value).all()]
        if self.on_non_finite == "skip" and self._consecutive_skips + 1 >= MAX_CONSECUTIVE_SKIPS:
            raise FloatingPointError(
                f"non-finite loss at step {self.global_step} in {', '.join(bad)} for {MAX_CONSECUTIVE_SKIPS} batches "
                "in a row (model.on_non_finite: skip): the model has diverged, skipping cannot help. Stopped; any "
                "checkpoint already written holds the last validated state."
            )
        if self.on_non_finite == "skip":
            self._consecutive_skips += 1
            self.skipped_steps += 1
            self.log("train/skipped_steps", float(self.skipped_steps))
            warnings.warn(f"non-finite loss at step {self.global_step} in {', '.join(bad)}: step skipped "
                          f"({self.skipped_steps} so far, model.on_non_finite: skip)", stacklevel=2)  # fmt: skip
            return False
        raise FloatingPointError(
            f"non-finite loss at step {self.global_step} in {', '.join(bad)} (task = train/loss_task, "
            f"a distillation term = train/distill/<term>): { ({k: float(v) for k, v in logs.items()}) }. "
            "Stopped before this step's update; any checkpoint already written holds the last validated state "
            "(model.on_non_finite: skip skips such steps instead)."
        )

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Gradients that overflowed although the loss is finite stop the run here, before they reach the
        weights (not under DDP: see ``_finite_step``; not under a 16-bit grad scaler, which skips them)."""
        if self.trainer.world_size > 1 or getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            return
        named = [(n, p.grad) for group in optimizer.param_groups for n, p in self._named(group["params"])]
        named = [(n, g) for n, g in named if g is not None]
        if not named or bool(finite_flags([g for _, g in named]).all()):
            return
        bad = [n for n, g in named if not torch.isfinite(g).all()]
        raise FloatingPointError(
            f"non-finite gradients at step {self.global_step} (finite loss): {', '.join(bad[:5])}"
            f"{f' (+{len(bad) - 5} more)' if len(bad) > 5 else ''}. Stopped before the update."
        )

    def _named(self, parameters: list[Tensor]) -> list[tuple[str, Tensor]]:
        names = {id(p): n for n, p in self.named_parameters()}
        return [(names.get(id(p), "?"), p) for p in parameters]

    def _manual_update(self, loss: Tensor, auxiliary: dict[str, Tensor]) -> None:
        """One student update, then one update of each loss's own optimiser on its auxiliary loss. The
        auxiliary steps go through the strategy (precision, scaler) but are not counted as training
        steps, so ``max_steps`` and the schedule count student updates, as in automatic optimisation."""
        main, *others = self.optimizers()
        main.zero_grad()
        self.manual_backward(loss)
        main.step()
        self.lr_schedulers().step()
        for key, optimizer in zip(self.auxiliary_keys, others, strict=True):
            optimizer.zero_grad()  # the student's backward also reached these parameters
            self.manual_backward(auxiliary[key])
            self.trainer.strategy.optimizer_step(optimizer.optimizer, closure=lambda: None, model=self)

    def non_finite_state(self) -> list[str]:
        """Names of the trained weights and buffers (BatchNorm statistics) holding inf or NaN: the student,
        the connectors and the losses' own modules. One fused reduction, one host sync."""
        named = [(f"student.{n}", t) for n, t in [*self.student.named_parameters(), *self.student.named_buffers()]]
        if self.distiller is not None:
            named += [(f"distiller.{n}", t) for n, t in [*self.distiller.named_parameters(),
                                                         *self.distiller.named_buffers()]]  # fmt: skip
        named = [(name, tensor) for name, tensor in named if tensor.is_floating_point()]
        if not named:
            return []
        finite = finite_flags([tensor for _, tensor in named]).tolist()
        return [name for (name, _), ok in zip(named, finite, strict=True) if not ok]

    def _refuse_non_finite_state(self, moment: str) -> None:
        bad = self.non_finite_state()
        if bad:
            more = f" (+{len(bad) - 5} more)" if len(bad) > 5 else ""
            raise FloatingPointError(
                f"non-finite weights or statistics at step {self.global_step}, {moment}: {', '.join(bad[:5])}{more}. "
                "Stopped: no checkpoint of this state is written (best.ckpt, if any, keeps the last finite model; "
                "a smaller learning rate, warm-up or gradient clipping usually helps)."
            )

    def on_validation_start(self) -> None:
        if self.trainer.state.fn == "fit":  # a diverged student is never validated, so never 'best'
            self._refuse_non_finite_state("before validation")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        task_loss, _, _, values, _ = self._losses(batch, self.task.validation_step)
        logs = {"val/loss_task": task_loss} if task_loss is not None else {}  # detectors: no eval loss
        logs.update({f"val/distill/{name}": value for name, value in values.items()})
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
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = build_schedule(optimizer, self.lr_schedule, total, self.warmup_steps, self.poly_power)
        main = {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
        if self.automatic_optimization:
            return main
        pairs = {pair.key: pair for pair in self.distiller.iter_pairs()}
        auxiliary = [
            {"optimizer": pairs[key].auxiliary_optimizer(pairs[key].loss.auxiliary_parameters())}
            for key in self.auxiliary_keys
        ]
        return [main, *auxiliary]

    # ---------------------------------------------------------------- checkpoints without the teacher
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._refuse_non_finite_state("before writing a checkpoint")
        teacher_utils.strip_from_checkpoint(checkpoint)
        checkpoint["skipped_steps"] = self.skipped_steps

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.skipped_steps = int(checkpoint.get("skipped_steps", 0))
        teacher_utils.restore_into_checkpoint(checkpoint, self.teacher, self.teacher_fingerprint)
        if self.distiller is not None:
            self.distiller.rename_legacy_keys(checkpoint["state_dict"])

    def configure_model(self) -> None:
        """The speed switches, once the module is on its device (Lightning calls this before fit, validate):
        ``channels_last`` for the student's and the teacher's weights and the inputs (convolutions then run
        NHWC, faster on tensor cores); ``compile_student: <backend>`` compiles the student's forward in place
        (``nn.Module.compile``: parameter names, checkpoints and the recorder's hooks stay as they are)."""
        if self.channels_last and not getattr(self, "_channels_last_done", False):
            self.student.to(memory_format=torch.channels_last)
            if self.teacher is not None:
                self.teacher.to(memory_format=torch.channels_last)
            self._channels_last_done = True
        if self.compile_student and not getattr(self, "_compiled", False):
            self.student.compile(backend=self.compile_student)
            self._compiled = True

    def _memory_format(self, batch: Any) -> Any:
        """Images in channels_last when the weights are (segmentation batches: (images, masks))."""
        if (
            self.channels_last
            and isinstance(batch, tuple | list)
            and isinstance(batch[0], Tensor)
            and batch[0].ndim == 4
        ):
            return (batch[0].contiguous(memory_format=torch.channels_last), *batch[1:])
        return batch

    # ---------------------------------------------------------------- teacher cache
    def setup(self, stage: str) -> None:
        if stage == "fit" and self.teacher_cache_views:
            data = self.trainer.datamodule
            if not hasattr(data, "use_teacher_views"):
                raise ValueError(
                    f"model.teacher_cache_views needs a data module that serves fixed augmented views "
                    f"(SegmentationDataModule); {type(data).__name__} does not"
                )
            data.use_teacher_views(self.teacher_cache_views)

    def teacher_outputs(self, batch: Any) -> dict[str, list[Tensor]]:
        """The teacher's recorded tensors for a batch (every call of every tapped module), as a cache
        stores them; a module whose output is not a tensor cannot be cached."""
        with torch.no_grad(), self.distiller.recording(student=False):
            self.task.run(self.teacher, self.task.batch_inputs(batch), self.distiller.teacher_recorder.paths)
            outputs = {path: list(calls) for path, calls in self.distiller.teacher_recorder.outputs.items()}
        self.distiller.clear()
        for path, calls in outputs.items():
            if not all(isinstance(call, Tensor) for call in calls):
                raise ValueError(f"model.teacher_cache_views: the teacher's {path!r} does not output a tensor "
                                 f"({type(calls[0]).__name__}); tap the tensor itself to cache it")  # fmt: skip
        return outputs

    def _open_teacher_cache(self) -> None:
        """Find the cache of this teacher, data and views, fill it on rank 0 when missing or damaged (the
        other ranks wait, then read the same files), open it, and log its size and fill time."""
        data = self.trainer.datamodule
        loader = data.views_loader(batch_size=data.batch_size)
        first = next(iter(loader))
        first = (first[0].to(self.device), *first[1:])
        shapes = {path: [list(t.shape[1:]) for t in calls] for path, calls in self.teacher_outputs(first).items()}
        views, dtype = self.teacher_cache_views, self.teacher_cache_dtype
        identity = TeacherCache.identity(self, data, views, dtype, shapes)
        root = Path(self.teacher_cache_dir) if self.teacher_cache_dir else default_root()
        cache = TeacherCache(cache_folder(root, identity), shapes, len(data.train_set), views, dtype)
        if self.trainer.is_global_zero and not cache.is_complete():
            cache.fill(lambda batch: self.teacher_outputs((batch[0].to(self.device), *batch[1:])), loader, identity)
        self.trainer.strategy.barrier("teacher_cache")
        if not cache.is_complete():
            raise RuntimeError(f"the teacher cache {cache.folder} is incomplete after filling it")
        cache.open()
        self.teacher_cache = cache
        record = json.loads((cache.folder / "cache.json").read_text())
        stats = {
            "teacher_cache/size_mib": cache.size_bytes / 2**20,
            "teacher_cache/fill_seconds": record["fill_seconds"],
        }
        for logger in self.loggers:
            logger.log_hyperparams({"teacher_cache/folder": str(cache.folder)})
            logger.log_metrics(stats, step=0)

    def on_fit_start(self) -> None:
        if self.teacher_cache_views:
            self._open_teacher_cache()
        if self.on_non_finite == "skip" and self.trainer.world_size > 1:
            raise ValueError("model.on_non_finite: skip is not supported under DDP (the ranks would have to agree "
                             "on every step); use error")  # fmt: skip
        skipped = getattr(self.trainer.datamodule, "skipped_samples", None) or {}
        batch = getattr(self.trainer.datamodule, "batch_size", None)
        if self.trainer.ckpt_path is not None:  # a resume: the step-0 rows are in the record already
            skipped, batch = {}, None
        for logger in self.loggers:
            logger.log_hyperparams(parameter_counts(self))
            if isinstance(batch, int):  # what one optimiser step sees: devices × nodes × batch × accumulation
                scale = {
                    "global_batch_size": float(batch * self.trainer.world_size * self.trainer.accumulate_grad_batches)
                }
                logger.log_hyperparams(scale)
                logger.log_metrics(scale, step=0)
            if skipped:  # on_bad_sample: skip — how many samples of each split the run does without
                logger.log_metrics({f"data/skipped_samples/{split}": n for split, n in skipped.items()}, step=0)


def finite_flags(tensors: list[Tensor]) -> Tensor:
    """Whether each tensor is all finite, as one boolean tensor: a single host sync to read it."""
    return torch.stack([torch.isfinite(tensor).all() for tensor in tensors])


def check_class_counts(task: Task, student: nn.Module) -> None:
    """The student predicts the task's classes: else the task loss fails at the first step (a label the
    student has no output for) or classes go unused. A teacher may predict others (a COCO detector
    distilling its FPN into an 80-class student); a term comparing its logits with the student's then
    fails at the build's probe, which compares their channels."""
    expected = getattr(task, "num_classes", None)
    classes = task.output_classes(student)
    if expected is not None and classes is not None and classes != expected:
        raise ValueError(
            f"model.student predicts {classes} classes but model.task.init_args.num_classes is {expected}: make "
            "them agree (for the builders here: model.student.init_args.num_classes)"
        )
