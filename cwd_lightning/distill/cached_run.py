"""A run that trains from teacher caches (``model.teacher_cache``): its options, the caches found or filled
(once, under a lock, whichever run of a sweep gets there first), their tensors served by the training loader's
workers with each image, and validations that run the teacher only when something reads what it gives."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from filelock import FileLock
from torch import Tensor

from cwd_lightning.data.sampling import run_seed
from cwd_lightning.distill.teacher import CachedTeacher, LiveTeacher, TeacherOutputs
from cwd_lightning.distill.teacher_cache import DTYPES, TeacherCache, cache_folder, default_root


@dataclass
class TeacherCacheOptions:
    """``model.teacher_cache``: train from the teacher's recorded tensors for ``views`` fixed augmented views
    of every training image, filled once into ``folder`` (default ``~/.cache/cwd_lightning/teacher_cache``),
    stored as ``dtype`` (float32: the live targets bit for bit); ``views: epochs`` is one view per epoch of the
    run's schedule (the live run's augmentation diversity). The views are augmented from ``seed``, not from
    the run's seed (which still orders the data and seeds dropout), so every run and seed of a sweep reads one
    cache; ``seed: run`` draws them from the run's seed instead (each seed its own draw and its own cache). A
    validation runs the teacher (for the ``val/distill/*`` values) only every ``validation_every``-th time
    (default: the cadence of the run's ``ChannelDistributionMonitor``; never without one; 1: always) and then on
    its first ``validation_batches`` batches (default: all); otherwise it runs the student alone."""

    views: int | Literal["epochs"]
    folder: str | None = None
    dtype: Literal["float16", "float32"] = "float16"
    seed: int | Literal["run"] = 0
    validation_every: int | None = None
    validation_batches: int | None = None

    def __post_init__(self) -> None:
        if self.views != "epochs" and (not isinstance(self.views, int) or self.views < 1):
            raise ValueError(f"model.teacher_cache.views must be a number ≥ 1 or 'epochs', got {self.views!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"model.teacher_cache.dtype must be {' or '.join(sorted(DTYPES))}, got {self.dtype!r}")
        if self.seed != "run" and not isinstance(self.seed, int):
            raise ValueError(f"model.teacher_cache.seed must be a number or 'run', got {self.seed!r}")
        for key in ("validation_every", "validation_batches"):
            if getattr(self, key) is not None and getattr(self, key) < 0:
                raise ValueError(f"model.teacher_cache.{key} must be ≥ 0, got {getattr(self, key)}")


def open_cache(options: TeacherCacheOptions, live: LiveTeacher, fingerprint: str, trainer: Any,
               device: Any) -> TeacherCache:  # fmt: skip
    """The cache of this teacher (``live``), data and views: found, or filled when missing or damaged. The teacher
    runs as in a live training step (with ``teacher_precision: auto`` under the trainer's precision), and that
    precision is part of the cache's identity. Rank 0 fills while the other ranks wait; a lock beside the folder
    makes another run (a sweep's rows side by side) wait for the fill instead of filling it too."""
    data, plugin = trainer.datamodule, trainer.precision_plugin
    follows_trainer = live.speed.precision == "auto"

    def run_teacher(batch: Any) -> dict:
        batch = (batch[0].to(device), *batch[1:])
        if not follows_trainer:
            return live.outputs(batch)
        with plugin.forward_context():  # as Lightning runs the training step
            return live.outputs(plugin.convert_input(batch))

    loader = data.views_loader(batch_size=data.batch_size)
    shapes = {path: [list(t.shape[1:]) for t in calls] for path, calls in run_teacher(next(iter(loader))).items()}
    precision = str(trainer.precision) if follows_trainer else live.speed.precision
    identity = TeacherCache.identity(fingerprint, data, data.teacher_views, options.dtype, shapes, data.views_seed,
                                     precision)  # fmt: skip
    root = Path(options.folder) if options.folder else default_root()
    cache = TeacherCache(cache_folder(root, identity), shapes, len(data.train_set), data.teacher_views, options.dtype)
    if trainer.is_global_zero:
        fill_once(cache, lambda: cache.fill(run_teacher, loader, identity))
    trainer.strategy.barrier("teacher_cache")
    if not cache.is_complete():
        raise RuntimeError(f"the teacher cache {cache.folder} is incomplete after rank 0 filled it: on several "
                           "machines model.teacher_cache.folder must be on a filesystem every node sees")  # fmt: skip
    return cache


def fill_once(cache: TeacherCache, fill: Callable[[], None]) -> bool:
    """``fill()`` unless the cache is complete, under a lock beside its folder: a process that finds another one
    filling it waits, then reads what that one wrote. Whether this call filled it."""
    cache.folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{cache.folder}.lock"):
        if cache.is_complete():
            return False
        fill()
        return True


class TeacherTensors:
    """``(index, view)`` → every teacher's cached tensors of that view, by teacher name: what the training loader's
    workers return with each image (each process maps the files itself)."""

    def __init__(self, caches: dict[str, TeacherCache]) -> None:
        self.caches = caches

    def __call__(self, index: int, view: int) -> dict[str, dict[str, list[Tensor]]]:
        return {name: cache.read(index, view) for name, cache in self.caches.items()}


def log_caches(loggers: list[Any], caches: dict[str, TeacherCache]) -> None:
    """The caches' folders (config), their total size and fill time (``teacher_cache/*`` at step 0)."""
    folders = {"teacher_cache/folder" + ("" if name == "teacher" else f"/{name}"): str(cache.folder)
               for name, cache in caches.items()}  # fmt: skip
    size = sum(cache.size_bytes for cache in caches.values()) / 2**20
    fill = sum(cache.recorded_fill_seconds() for cache in caches.values())
    for logger in loggers:
        logger.log_hyperparams(folders)
        logger.log_metrics({"teacher_cache/size_mib": size, "teacher_cache/fill_seconds": fill}, step=0)


def views_seed(options: TeacherCacheOptions) -> int:
    """The seed the views are augmented from: the options' own, or with ``seed: run`` the run's."""
    return run_seed() if options.seed == "run" else int(options.seed)


def schedule_epochs(trainer: Any, images: int, batch_size: int) -> int:
    """The epochs a fit's schedule spans: ``max_steps`` optimiser steps over the batches an epoch has on each rank
    (last one dropped, ``limit_train_batches`` applied), or ``max_epochs``. Fixed when the run starts: a resume
    that lengthens the schedule gets more views, so another cache."""
    batches = images // trainer.world_size // batch_size
    limit = trainer.limit_train_batches
    batches = min(batches, limit) if isinstance(limit, int) else int(batches * limit)
    if batches < 1:
        raise ValueError(f"model.teacher_cache.views: epochs: an epoch of {images} images has no batch of "
                         f"{batch_size} on each of {trainer.world_size} rank(s)")  # fmt: skip
    if trainer.max_steps > 0:
        return max(1, math.ceil(trainer.max_steps * trainer.accumulate_grad_batches / batches))
    if trainer.max_epochs is not None and trainer.max_epochs > 0:
        return trainer.max_epochs
    raise ValueError("model.teacher_cache.views: epochs needs a fit with trainer.max_steps or trainer.max_epochs; "
                     "a time-budgeted run has no fixed number of epochs, give the number of views")  # fmt: skip


def channel_monitor_cadence(callbacks: list[Any]) -> int:
    """Every how many validations the run's channel monitor looks at the distillation (0: it has none)."""
    from cwd_lightning.callbacks import ChannelDistributionMonitor  # the callbacks import the engine

    cadences = [callback.every_n_epochs for callback in callbacks if isinstance(callback, ChannelDistributionMonitor)]
    return min(cadences, default=0)


class CachedTeacherRun:
    """The DistillationModule's teacher-cache hooks: the training data serves the caches' views (``setup``), the
    caches are found or filled before the first step and their tensors come with each batch
    (``open_teacher_caches``), and a validation runs the teachers only when ``validates_with_teachers``."""

    teacher_cache: TeacherCacheOptions | None
    teacher_caches: dict[str, TeacherCache] | None = None  # by teacher name, once open
    validations_run = 0

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.teacher_cache is not None:
            datamodule = self.trainer.datamodule
            if not hasattr(datamodule, "use_teacher_views"):
                raise ValueError(f"model.teacher_cache needs a data module that serves fixed augmented views "
                                 f"(SegmentationDataModule); {type(datamodule).__name__} does not")  # fmt: skip
            views = self.teacher_cache.views
            if views == "epochs":
                views = schedule_epochs(self.trainer, len(datamodule.train_set), datamodule.batch_size)
            datamodule.use_teacher_views(views, views_seed(self.teacher_cache))

    def open_teacher_caches(self) -> None:
        """Each teacher's cache on its own (keyed by that teacher's fingerprint), read by the training loader from
        now on; the training steps take the teachers' tensors from the batches."""
        if self.teacher_cache is None:
            return
        caches = {name: open_cache(self.teacher_cache, live, self.teacher_fingerprints[name], self.trainer,
                                   self.device) for name, live in self.live_teachers.items()}  # fmt: skip
        log_caches(self.trainer.loggers, caches)
        self.teacher_caches = caches
        self.trainer.datamodule.serve_teacher_tensors(TeacherTensors(caches))
        sources = [CachedTeacher(name, live.recorder) for name, live in self.live_teachers.items()]
        self.training_outputs = TeacherOutputs(sources, cached=True)

    def on_validation_epoch_start(self) -> None:
        if not self.trainer.sanity_checking:
            self.validations_run += 1

    def validates_with_teachers(self, batch_idx: int) -> bool:
        """Whether this validation batch runs the teachers: always, but in a cached fit's validations, where the
        options' cadence and subset decide (the student's metrics never need the teachers)."""
        options = self.teacher_cache
        if options is None or self.trainer.sanity_checking or self.trainer.state.fn != "fit":
            return True
        every = options.validation_every
        every = channel_monitor_cadence(self.trainer.callbacks) if every is None else every
        if every == 0 or self.validations_run % every:
            return False
        return options.validation_batches is None or batch_idx < options.validation_batches
