"""The three steps the harness times, each a closure over one fixed batch: the student alone, the
teacher's forward alone, and the full distillation step through the module's own code path."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import move_data_to_device
from torch.utils.data import default_collate

from cwd_lightning.distill.cached_run import TeacherTensors
from cwd_lightning.distill.guards import finite_flags
from cwd_lightning.distill.module import DistillationModule
from cwd_lightning.distill.teacher import CachedTeacher, TeacherOutputs
from cwd_lightning.distill.teacher_cache import TeacherCache

Precision = Literal["32", "bf16-mixed"]
Step = Callable[[], Any]


def autocast(device: torch.device, precision: Precision) -> AbstractContextManager:
    """bf16 autocast around the forward passes (losses stay fp32 by their own ``full_precision``), as
    Lightning's ``bf16-mixed``; nothing for full precision."""
    if precision == "32":
        return nullcontext()
    if precision == "bf16-mixed":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    raise ValueError(f"precision must be '32' or 'bf16-mixed', got {precision!r}")


def student_only_step(module: DistillationModule, batch: Any, precision: Precision) -> Step:
    """Task loss forward + backward + optimiser step of the student alone (the baseline run's step),
    with the experiment's optimiser over the student's parameters; the teacher is not touched."""
    module.train()
    parameters = [p for p in module.student.parameters() if p.requires_grad]
    optimizer = module.optimizer_factory(parameters)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(module.device, precision):
            loss, _ = module.task.training_loss(module.student, batch)
        loss.backward()
        optimizer.step()

    return step


def teacher_forward_step(module: DistillationModule, batch: Any, precision: Precision) -> Step:
    """The teacher's forward alone: eval mode, ``no_grad``, nothing recorded."""
    if module.teacher is None:
        raise ValueError("the experiment has no teacher (model.teacher): there is no distillation step to time")
    module.train()  # keeps the teacher in eval mode (DistillationModule.train)
    inputs = module.task.batch_inputs(batch)

    def step() -> None:
        with torch.no_grad(), autocast(module.device, precision):
            module.task.run(module.teacher, inputs)

    return step


def distillation_step(module: DistillationModule, batch: Any, precision: Precision, teachers: Any = None) -> Step:
    """One full training step through ``DistillationModule.step_losses`` (teacher recorded under no_grad,
    or ``teachers``' tensors, student recorded, every term), then backward and the optimiser step over
    ``trainable_parameters``; a loss with an optimiser of its own (an adversarial discriminator) then takes
    its step as in ``_manual_update``. No learning-rate schedule: it costs nothing measurable."""
    module.train()
    optimizer = module.optimizer_factory(module.trainable_parameters())
    auxiliary = {}
    if module.distiller is not None:
        pairs, optimizers = module.distiller.auxiliary_pairs(), module.distiller.auxiliary_optimizers()
        auxiliary = {pair.key: optimizer for pair, optimizer in zip(pairs, optimizers, strict=True)}

    def step() -> None:
        with autocast(module.device, precision):
            losses = module.step_losses(batch, module.task.training_loss, teachers, auxiliary=bool(auxiliary))
        optimizer.zero_grad(set_to_none=True)
        (losses.task + losses.distill).backward()
        optimizer.step()
        for key, auxiliary_optimizer in auxiliary.items():
            auxiliary_optimizer.zero_grad(set_to_none=True)  # the student's backward also reached them
            losses.auxiliary[key].backward()
            auxiliary_optimizer.step()

    return step


def release_gradients(module: DistillationModule) -> None:
    """Drop every .grad, so memory measured in the next phase is not held by this one."""
    module.zero_grad(set_to_none=True)


def check_steps(module: DistillationModule, batch: Any, precision: Precision) -> dict[str, Step]:
    """The non-finite checks a training run makes, each alone: the loss check of every step (one host
    sync), the gradient check before each update (one fused reduction and sync), and the weights and
    BatchNorm statistics check before each validation and checkpoint (``non_finite_state``)."""
    module.train()
    with autocast(module.device, precision):
        computed = module.step_losses(batch, module.task.training_loss)
    losses = (computed.task + computed.distill, computed.task, *computed.values.values())
    (computed.task + computed.distill).backward()
    gradients = [p.grad for p in module.trainable_parameters() if p.grad is not None]
    return {
        "loss_per_step": lambda: all(bool(torch.isfinite(value)) for value in losses),
        "gradients_per_step": lambda: bool(finite_flags(gradients).all()),  # the module's own check
        "weights_and_statistics_per_validation": module.non_finite_state,
    }


def cached_distillation_step(module: DistillationModule, batch: Any, precision: Precision) -> Step:
    """The distillation step of a run with a teacher cache (``model.teacher_cache``) on a batch that carries the
    teacher's tensors as the training loader's workers deliver them (``cached_batch``): they are upcast on the
    device and the teacher is not run."""
    cached = TeacherOutputs([CachedTeacher("teacher", module.live_teachers["teacher"].recorder)], cached=True)
    return distillation_step(module, batch, precision, teachers=cached)


def cached_batch(module: DistillationModule, batch: Any, folder: Path) -> tuple[Any, TeacherCache]:
    """``batch`` with its cache entry, and the cache: the teacher's tensors filled into a float16 cache in
    ``folder``, then read per image and collated as a loader worker does (``cache_read_step``), on the module's
    device."""
    images = module.task.batch_size(batch)
    keys = torch.stack([torch.arange(images), torch.zeros(images, dtype=torch.long)], dim=1)
    outputs = module.live_teachers["teacher"].outputs(batch)
    shapes = {path: [list(t.shape[1:]) for t in calls] for path, calls in outputs.items()}
    cache = TeacherCache(folder, shapes, images, views=1, dtype="float16")
    cache.fill(lambda _: outputs, [(*batch, {"keys": keys})], identity={"what": "make bench: one batch"})
    return (*batch, move_data_to_device(cache_read_step(cache, images)(), module.device)), cache


def cache_read_step(cache: TeacherCache, images: int) -> Callable[[], dict]:
    """What a loader worker does per batch in a cached run: read each image's view from the memory-mapped files
    and collate them with the keys (off the training step, in the workers)."""
    reader = TeacherTensors({"teacher": cache})

    def read() -> dict:
        return default_collate([{"keys": torch.tensor([i, 0]), "teacher": reader(i, 0)} for i in range(images)])

    return read
