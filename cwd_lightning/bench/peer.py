"""The same distillation step driven by torchdistill (its ``DistillationBox``: forward hooks, I/O dicts,
loss wrappers, ``WeightedSumLoss``, its optimiser registry and its backward/step), side by side with ours.

torchdistill has no CWD loss, so the plain reference formulation (``losses.ReferenceCWD``) is registered
with it as a custom low-level loss; the task loss is torchdistill's own ``CrossEntropyLoss`` (or
``DictLossWrapper`` for an ``{"out", "aux"}`` output) on the student's output. ``import torchdistill``
stays in this file: it is an optional extra (``pip install '.[bench]'``).
"""

from __future__ import annotations

import copy
import inspect
import statistics
from importlib.metadata import version
from typing import Any

import torch
from torch import Tensor, nn

from cwd_lightning.bench.losses import ReferenceCWD
from cwd_lightning.bench.steps import Precision, Step, autocast
from cwd_lightning.bench.timing import summarize, time_interleaved
from cwd_lightning.distill.module import DistillationModule
from cwd_lightning.distill.terms import split_path
from cwd_lightning.losses import ChannelWiseDivergence

#: the key our reference CWD is registered under in torchdistill's low-level loss registry
LOSS_KEY = "cwd_lightning_reference_cwd"
#: agreement required between torchdistill's loss values and ours on the same inputs
RELATIVE_TOLERANCE = 1e-5


class RecordingReferenceCWD(ReferenceCWD):
    """The reference CWD, keeping its last value: torchdistill's ``WeightedSumLoss`` returns only the total."""

    last_value: Tensor | None = None

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        value = super().forward(student, teacher)
        self.last_value = value.detach()
        return value


def unsupported(module: DistillationModule, output: Any, masks: Tensor) -> str | None:
    """Why this experiment's step has no torchdistill counterpart here (``output``: the student's on the
    batch), or None."""
    if module.distiller is None:
        return "the experiment has no distillation terms"
    if not module.task.has_dense_labels:
        return (f"task {type(module.task).__name__}: the peer's task loss is torchdistill's CrossEntropyLoss over "
                "pixels, for tasks with dense labels only")  # fmt: skip
    for pair in module.distiller.iter_pairs():
        loss = pair.loss
        if not (isinstance(loss, ChannelWiseDivergence) and loss.normalize == "channel" and loss.divergence == "kl"):
            return f"term {pair.key!r} is {loss!r}; torchdistill is given only CWD (normalize='channel', KL)"
        if pair.connector is not None or pair.resize is not None or pair.call is not None:
            return f"term {pair.key!r} has a connector, a resize or a call index, which the peer config does not map"
        if split_path(pair.student_path)[1] is not None or split_path(pair.teacher_path)[1] is not None:
            return f"term {pair.key!r} selects part of a module's output, which SimpleLossWrapper cannot"
    logits = output["out"] if isinstance(output, dict) else output
    if logits.shape[-2:] != masks.shape[-2:]:
        return (
            f"the student's logits are {tuple(logits.shape[-2:])} and the masks {tuple(masks.shape[-2:])}: our task "
            "upsamples before the cross-entropy, torchdistill's CrossEntropyLoss does not"
        )
    return None


def optimizer_config(module: DistillationModule) -> dict[str, Any]:
    """The experiment's optimiser as torchdistill's registry key and kwargs (same class, same settings)."""
    probe = module.optimizer_factory([nn.Parameter(torch.zeros(1))])
    accepted = inspect.signature(type(probe).__init__).parameters
    return {"key": type(probe).__name__, "kwargs": {k: v for k, v in probe.defaults.items() if k in accepted}}


def train_config(module: DistillationModule, output_is_dict: bool) -> dict[str, Any]:
    """torchdistill's training configuration for the experiment's teacher, student, terms and optimiser."""
    task = module.task
    pairs = list(module.distiller.iter_pairs())
    output = {"is_from_teacher": False, "module_path": ".", "io": "output"}
    if output_is_dict:  # PSPNet-D8 style {"out", "aux"}: the auxiliary cross-entropy with the task's weight
        wrapper = {"key": "DictLossWrapper", "kwargs": {"input": output, "target": {"uses_label": True},
                                                        "weights": {"out": 1.0, "aux": task.aux_weight}}}  # fmt: skip
    else:
        wrapper = {"key": "SimpleLossWrapper", "kwargs": {"input": output, "target": {"uses_label": True}}}
    sub_terms: dict[str, Any] = {
        "task": {
            "criterion": {"key": "CrossEntropyLoss", "kwargs": {"ignore_index": task.ignore_index}},
            "criterion_wrapper": wrapper,
            "weight": 1.0,
        }
    }
    for pair in pairs:
        sides = {
            "input": {"is_from_teacher": False, "module_path": pair.student_path, "io": "output"},
            "target": {"is_from_teacher": True, "module_path": pair.teacher_path, "io": "output"},
        }
        sub_terms[pair.key] = {
            "criterion": {"key": LOSS_KEY, "kwargs": {"tau": pair.loss.tau}},
            "criterion_wrapper": {"key": "SimpleLossWrapper", "kwargs": sides},
            "weight": pair.weight,
        }
    return {
        "teacher": {
            "forward_proc": "forward_batch_only",  # model(images), as our task runs it
            "forward_hook": {"output": sorted({p.teacher_path for p in pairs})},
            "requires_grad": False,
        },
        "student": {
            "forward_proc": "forward_batch_only",
            "forward_hook": {"output": sorted({p.student_path for p in pairs})},
        },
        "criterion": {"key": "WeightedSumLoss", "kwargs": {"sub_terms": sub_terms}},
        "optimizer": optimizer_config(module),
        "num_epochs": 1,
    }


def _relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def compare(
    module: DistillationModule, batch: Any, repeats: int, warmup: int, precision: Precision, ours: Step | None
) -> dict[str, Any]:
    """torchdistill's step on copies of the experiment's teacher and student, the same batch and optimiser
    settings, timed in turn with ``ours`` (our distillation step) in every repetition: both times per step,
    ours / its ratio per repetition (median and IQR), and its loss values against ours on the same weights."""
    try:
        from torchdistill.core.distillation import DistillationBox
        from torchdistill.losses.registry import register_low_level_loss
    except ImportError:
        return {"skipped": "torchdistill not installed (pip install '.[bench]')"}
    images, masks = batch[0], batch[1].long()
    student, teacher = copy.deepcopy(module.student), copy.deepcopy(module.teacher)  # same weights, own hooks
    with torch.no_grad():
        output = student.eval()(images)  # eval: no BatchNorm statistics moved, no dropout drawn
    reason = unsupported(module, output, masks)
    if reason is not None:
        return {"skipped": reason}
    register_low_level_loss(key=LOSS_KEY)(RecordingReferenceCWD)
    config = train_config(module, isinstance(output, dict))
    box = DistillationBox(teacher, student, {}, config, module.device, None, False, 1)
    try:
        box.pre_epoch_process(epoch=0)  # student.train(), I/O dicts emptied
        check = _loss_check(module, box, images, masks)

        def step() -> None:
            with autocast(module.device, precision):
                loss = box.forward_process(images, targets=masks)
            box.post_forward_process(loss)  # backward, optimiser step, zero_grad

        steps = {"torchdistill": step, **({"ours": ours} if ours is not None else {})}
        samples = time_interleaved(steps, repeats, warmup, module.device, alternate=True)
    finally:
        box.clean_modules()  # its forward hooks removed
    timing = summarize(samples["torchdistill"])
    ratios = [a / b for a, b in zip(samples.get("ours", []), samples["torchdistill"], strict=False)]
    quartiles = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) >= 2 else [None, None, None]
    return {
        "framework": f"torchdistill {version('torchdistill')}",
        "machinery": "DistillationBox: forward hooks + I/O dicts, SimpleLossWrapper, WeightedSumLoss, optimiser "
        f"from its registry ({box.optimizer.__class__.__name__}), default_post_forward_process (backward + step)",
        "loss": f"torchdistill has no CWD: the reference CWD is registered as custom low-level loss {LOSS_KEY!r}",
        "device": module.device.type,
        "step": timing.as_dict(images=len(images)),
        "ours_step": summarize(samples["ours"]).as_dict(images=len(images)) if ours else None,
        "ratio_ours_to_torchdistill": statistics.median(ratios) if ratios else None,
        "ratio_iqr": quartiles[2] - quartiles[0] if quartiles[0] is not None else None,
        "ratio_what": "median (IQR) over repetitions of ours / torchdistill, the two steps timed in turn in each, "
        "in alternating order",
        "loss_check": check,
    }


def _loss_check(module: DistillationModule, box: Any, images: Tensor, masks: Tensor) -> dict[str, Any]:
    """Ours and torchdistill's total and per-term loss on the same weights, batch and dropout masks (the
    global RNG is reseeded before each), in train mode as in a step, without gradients."""
    with torch.no_grad():
        torch.manual_seed(0)
        ours = module.step_losses((images, masks), module.task.training_loss)
        task_loss, distill_total, values = ours.task, ours.distill, ours.values
        torch.manual_seed(0)
        theirs_total = float(box.forward_process(images, targets=masks))
    ours_total = float(task_loss + distill_total)
    terms = {}
    for pair in module.distiller.iter_pairs():
        ours, theirs = (
            float(values[pair.key if pair.label else pair.term_name]),
            float(box.criterion.term_dict[pair.key][0].low_level_loss.last_value),
        )
        terms[pair.key] = {"ours": ours, "torchdistill": theirs, "relative_difference": _relative(ours, theirs)}
    differences = [_relative(ours_total, theirs_total), *(term["relative_difference"] for term in terms.values())]
    return {
        "ours_total": ours_total,
        "torchdistill_total": theirs_total,
        "relative_difference": _relative(ours_total, theirs_total),
        "terms": terms,
        "tolerance": RELATIVE_TOLERANCE,
        "equal": max(differences) <= RELATIVE_TOLERANCE,
    }
