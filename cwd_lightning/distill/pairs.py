"""One compared pair of a term (where its tensors come from, its own connector and loss), what the engine
knows about a step for the losses that ask (``StepContext``) and what a step computes (``StepLosses``)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cwd_lightning.distill.connectors import match_size
from cwd_lightning.distill.recorder import ForwardRecorder, resolve_module
from cwd_lightning.distill.terms import DistillTerm, select, split_path
from cwd_lightning.losses.base import Declaration


@dataclass
class StepContext:
    """What the engine knows about the current batch, for losses that ask (see ``losses/base.py``)."""

    labels: Tensor | None = None  # N×H×W at the input resolution
    ignore_index: int | None = None
    step: int = 0
    boxes: list[Tensor] | None = None  # per image, M×4 in the network input's (resized, padded) pixels
    input_size: tuple[int, int] | None = None  # the network input's (padded) H×W

    def for_loss(self, fields: tuple[str, ...], size: torch.Size) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for name in fields:
            at = {"labels": self.labels_at, "boxes": self.boxes_at}.get(name)
            values[name] = at(size) if at is not None else getattr(self, name)
        return values

    def boxes_at(self, size: torch.Size) -> list[Tensor] | None:
        """The boxes in the coordinates of an H×W map of the network input (x by W / input W, y by H / input H)."""
        if self.boxes is None:
            return None
        height, width = self.input_size
        scale = torch.tensor([size[1] / width, size[0] / height] * 2)
        return [boxes * scale.to(boxes) for boxes in self.boxes]

    def labels_at(self, size: torch.Size) -> Tensor | None:
        """Labels nearest-resized to ``size`` (H×W), so the ignore index survives unchanged."""
        if self.labels is None or self.labels.shape[-2:] == size:
            return self.labels
        return F.interpolate(self.labels[:, None].float(), size=tuple(size), mode="nearest")[:, 0].long()


class TeacherPart:
    """Modules of a frozen teacher run in order on another tensor (CrossKD: the rest of the teacher's head on the
    student's head features). The teacher's weights require no gradient, so they get none and the tensor passed
    in does; the modules run in eval mode. Not an ``nn.Module``: the teacher's modules are neither registered in
    the pair nor saved with it, and a copy of the pair shares them."""

    def __init__(self, teacher: nn.Module, paths: tuple[str, ...], side: str) -> None:
        self.paths = tuple(paths)
        self.modules = [resolve_module(teacher, path, side) for path in self.paths]
        trainable = [path for path, module in zip(self.paths, self.modules, strict=True)
                     if any(p.requires_grad for p in module.parameters())]  # fmt: skip
        if trainable:
            raise ValueError(f"{side} modules {', '.join(trainable)} require gradients: a teacher part runs frozen")

    def __call__(self, tensor: Tensor) -> Tensor:
        weights = next((p for module in self.modules for p in module.parameters()), None)
        if weights is not None:  # in the teacher's precision (the caller upcasts what comes back)
            tensor = tensor.to(weights.dtype)
        for module in self.modules:
            if module.training:
                raise RuntimeError(f"teacher module {self.paths[self.modules.index(module)]!r} is in train mode")
            tensor = module(tensor)
        return tensor

    def __deepcopy__(self, memo: dict) -> TeacherPart:
        return self  # the frozen teacher is shared, never copied


class DistillPair(nn.Module):
    """One compared pair of a term: where its tensors come from, and its own connector and loss."""

    def __init__(self, term: DistillTerm, label: str, student_path: str, teacher_path: str, call: int | None) -> None:
        super().__init__()
        self.term_name = term.name
        self.label = label
        self.weight = term.weight
        self.resize = term.resize
        self.student_path = student_path
        self.teacher_path = teacher_path
        self.call = call
        self.teacher_name = term.from_teacher
        self.loss = copy.deepcopy(term.loss)  # each pair owns its loss (and whatever the loss builds)
        self.connector: nn.Module | None = None
        self.declared = Declaration(context=(), auxiliary=False)  # read from the loss when the term is built
        self.teacher_part: TeacherPart | None = None  # when the loss runs part of the teacher

    @property
    def key(self) -> str:
        """Log name: ``<term>`` or ``<term>/<label>``."""
        return f"{self.term_name}/{self.label}" if self.label else self.term_name

    def teacher_tapped(self, teacher_recorder: ForwardRecorder) -> Tensor:
        """The recorded teacher tensor alone (what a loss's preparation reads)."""
        module, key = split_path(self.teacher_path)
        where = f" (call {self.call})" if self.call is not None else ""
        return select(
            teacher_recorder.get(module, self.call), key, f"{teacher_recorder.side} {self.teacher_path!r}{where}"
        )

    def tapped(self, student_recorder: ForwardRecorder, teacher_recorder: ForwardRecorder) -> tuple[Tensor, Tensor]:
        where = f" (call {self.call})" if self.call is not None else ""
        tensors = []
        for recorder, path in ((student_recorder, self.student_path), (teacher_recorder, self.teacher_path)):
            module, key = split_path(path)
            tensors.append(select(recorder.get(module, self.call), key, f"{recorder.side} {path!r}{where}"))
        return tensors[0], tensors[1]

    def aligned(self, student_recorder: ForwardRecorder, teacher_recorder: ForwardRecorder) -> tuple[Tensor, Tensor]:
        """The recorded pair with the connector and resize applied: what the loss compares."""
        student, teacher = self.tapped(student_recorder, teacher_recorder)
        if self.connector is not None:
            student = self.connector(student)
        if self.resize is not None:
            student, teacher = match_size(student, teacher, self.resize)
        return student, teacher

    def teacher_extras(self, teacher_recorder: ForwardRecorder) -> dict[str, Any]:
        """What the loss takes from its teacher beyond the pair: ``teacher_part`` and its teacher tensors at the
        pair's call."""
        extras: dict[str, Any] = {"teacher_part": self.teacher_part} if self.declared.teacher_part else {}
        where = f" (call {self.call})" if self.call is not None else ""
        for keyword, path in self.declared.teacher_inputs:
            module, key = split_path(path)
            extras[keyword] = select(teacher_recorder.get(module, self.call), key,
                                     f"{teacher_recorder.side} {path!r}{where}")  # fmt: skip
        return extras

    def value(
        self, student: Tensor, teacher: Tensor, context: StepContext, teacher_recorder: ForwardRecorder
    ) -> Tensor:
        context_values = context.for_loss(self.declared.context, student.shape[-2:])
        return self.loss(student, teacher, **context_values, **self.teacher_extras(teacher_recorder))


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
