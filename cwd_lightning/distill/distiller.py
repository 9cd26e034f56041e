"""The distiller: recorders on both models, and one ``DistillPair`` (connector + loss, ``pairs.py``) per compared pair.

Built once from a probe forward, so that every path, call, channel count, loss signature and shape is
checked before training starts. At each step it turns the recorded tensors into Σ weight · loss.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from cwd_lightning.distill.connectors import build_connector
from cwd_lightning.distill.pairs import DistillPair, StepContext, TeacherPart
from cwd_lightning.distill.recorder import ForwardRecorder
from cwd_lightning.distill.terms import DistillTerm, pair_labels, split_path, teacher_side
from cwd_lightning.losses.base import Declaration, build_own_modules, declaration


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


class Distiller(nn.Module):
    """Recorders on the student and on each teacher a term reads, and the pairs of every term
    (``pairs[term][i]``). ``teachers`` are the run's teachers by name (``teacher`` is ``model.teacher``)."""

    def __init__(self, terms: list[DistillTerm], student: nn.Module, teachers: dict[str, nn.Module]) -> None:
        super().__init__()
        if len({term.name for term in terms}) != len(terms):
            raise ValueError("model.terms: every distillation term needs a unique name")
        for term in terms:
            if term.from_teacher not in teachers:
                raise ValueError(f"distillation term {term.name!r}: from_teacher {term.from_teacher!r} is not a "
                                 f"teacher of this run (teachers: {', '.join(teachers) or 'none'})")  # fmt: skip
        unread = [name for name in teachers if name not in {term.from_teacher for term in terms}]
        if unread:
            where = ", ".join("model.teacher" if name == "teacher" else f"model.teachers.{name}" for name in unread)
            raise ValueError(f"{where}: read by no term (a term reads model.teacher unless its from_teacher names "
                             "another)")  # fmt: skip
        self.terms = terms
        self.student_recorder = ForwardRecorder(
            student, [split_path(p)[0] for t in terms for p in t.student_paths], side="student"
        )
        paths = {name: [split_path(p)[0] for t in terms if t.from_teacher == name for p in _teacher_reads(t)]
                 for name in teachers}  # fmt: skip
        self.teacher_recorders = {
            name: ForwardRecorder(model, paths[name], side=teacher_side(name)) for name, model in teachers.items()
            if paths[name]
        }  # fmt: skip
        self.pairs = nn.ModuleDict()

    # ------------------------------------------------------------------ build
    def build(self, task: Any, student: nn.Module, teachers: dict[str, nn.Module]) -> Distiller:
        """Probe forward of the student and the teachers on the task's example input (the student in eval
        mode, so no BatchNorm statistics move), then per term: expand paths × calls into pairs, build
        connectors and the losses' own modules from the probed shapes, check each loss's declaration, and
        call it once so a shape mismatch fails now."""
        example = task.example_input()
        with evaluating(student), torch.no_grad(), self.recording():
            task.run(student, example, self.student_recorder.paths)
            for name, recorder in self.teacher_recorders.items():
                task.run(teachers[name], example, recorder.paths)
        try:
            for term in self.terms:
                self.pairs[term.name] = nn.ModuleList(self._build_term(term, task, teachers[term.from_teacher]))
        finally:
            self.clear()
        return self

    def _build_term(self, term: DistillTerm, task: Any, teacher_model: nn.Module) -> list[DistillPair]:
        has_labels, has_boxes = task.has_dense_labels, task.has_boxes
        sources: list[tuple[str, str, int | None]] = []
        for student_path, teacher_path in zip(term.student_paths, term.teacher_paths, strict=True):
            counts = {
                side: len(recorder.calls(split_path(path)[0]))
                for side, recorder, path in (
                    ("student", self.student_recorder, student_path),
                    ("teacher", self.teacher_recorders[term.from_teacher], teacher_path),
                )
            }
            if counts["student"] != counts["teacher"] and term.calls is not None:
                raise ValueError(
                    f"distillation term {term.name!r}: student {student_path!r} runs {counts['student']} times "
                    f"but teacher {teacher_path!r} runs {counts['teacher']} times per forward"
                )
            calls = term.chosen_calls(max(counts.values()), f"{student_path!r}/{teacher_path!r}")
            sources += [(student_path, teacher_path, call) for call in calls]
        labels = pair_labels([teacher for _, teacher, _ in sources], [call for _, _, call in sources])
        pairs = []
        for label, (student_path, teacher_path, call) in zip(labels, sources, strict=True):
            pair = DistillPair(term, label, student_path, teacher_path, call)
            student, teacher = pair.tapped(self.student_recorder, self.teacher_recorders[pair.teacher_name])
            if term.connector is not None:
                pair.connector = build_connector(term.connector, student.shape[1], teacher.shape[1])
            with torch.no_grad(), evaluating(pair):  # no BN statistics moved by the probe
                student, teacher = self.aligned(pair)
            labels = torch.zeros(student.shape[0], *student.shape[2:], dtype=torch.long) if has_labels else None
            boxes = [torch.zeros(0, 4)] * student.shape[0] if has_boxes else None  # the probe's images: none
            probe = StepContext(labels, task.ignore_index, 0, boxes, tuple(student.shape[-2:]) if has_boxes else None)
            try:
                build_own_modules(pair.loss, student.shape, teacher.shape)
                pair.declared = self._declaration(term, pair.loss, has_labels, has_boxes)
                if pair.declared.teacher_part:
                    pair.teacher_part = self._teacher_part(term, pair.loss, teacher_model)
                with torch.no_grad(), evaluating(pair):
                    self.value(pair, student, teacher, probe)
            except ValueError as error:
                if isinstance(error, _DeclarationError):
                    raise
                raise ValueError(
                    f"distillation term {term.name!r}: student {student_path!r} gives {tuple(student.shape[1:])} "
                    f"and teacher {teacher_path!r} gives {tuple(teacher.shape[1:])} (C×H×W) after the connector "
                    f"and resize, which {type(pair.loss).__name__} refuses: {error}. For a channel or size "
                    "mismatch set connector: conv|conv_bn|conv_bn_relu and/or resize: "
                    "student_to_teacher|teacher_to_student."
                ) from error
            pairs.append(pair)
        return pairs

    @staticmethod
    def _teacher_part(term: DistillTerm, loss: nn.Module, teacher_model: nn.Module) -> TeacherPart:
        try:
            return TeacherPart(teacher_model, tuple(loss.teacher_modules), teacher_side(term.from_teacher))
        except ValueError as error:
            raise _DeclarationError(f"distillation term {term.name!r}: {type(loss).__name__}.teacher_modules: "
                                    f"{error}") from None  # fmt: skip

    @staticmethod
    def _declaration(term: DistillTerm, loss: nn.Module, has_labels: bool, has_boxes: bool) -> Declaration:
        try:
            return declaration(loss, has_labels, has_boxes)
        except ValueError as error:
            raise _DeclarationError(f"distillation term {term.name!r}: {error}") from None
        except TypeError as error:
            raise TypeError(f"distillation term {term.name!r}: {error}") from None

    # ------------------------------------------------------------------ steps
    def iter_pairs(self) -> Iterator[DistillPair]:
        for term in self.terms:
            yield from self.pairs[term.name]

    def aligned(self, pair: DistillPair) -> tuple[Tensor, Tensor]:
        """The pair's recorded (student, teacher) tensors with its connector and resize applied."""
        return pair.aligned(self.student_recorder, self.teacher_recorders[pair.teacher_name])

    def value(self, pair: DistillPair, student: Tensor, teacher: Tensor, context: StepContext) -> Tensor:
        """The pair's loss on its aligned tensors, given the context and teacher tensors it declares."""
        return pair.value(student, teacher, context, self.teacher_recorders[pair.teacher_name])

    @contextmanager
    def recording(self, student: bool = True, teacher: bool = True) -> Iterator[None]:
        with ExitStack() as stack:
            if student:
                stack.enter_context(self.student_recorder)
            if teacher:
                for recorder in self.teacher_recorders.values():
                    stack.enter_context(recorder)
            yield

    def clear(self) -> None:
        self.student_recorder.clear()
        for recorder in self.teacher_recorders.values():
            recorder.clear()

    def compute(
        self, context: StepContext, auxiliary: bool = False, weights: dict[str, float] | None = None
    ) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
        """From the recorded step: Σ weight·term (``weights`` by term name; the terms' own weights by default),
        each term's (unweighted) value (per pair when a term expands), and (if ``auxiliary``) the auxiliary loss
        of every pair that trains a module of its own with its own optimiser."""
        terms, values, auxiliary_losses = self.term_values(context, auxiliary)
        return self.weighted_total(terms, weights), values, auxiliary_losses

    def weighted_total(self, terms: dict[str, Tensor], weights: dict[str, float] | None = None) -> Tensor:
        total = torch.zeros(())
        for term in self.terms:
            weight = term.weight if weights is None else weights[term.name]
            total = total.to(terms[term.name].device) + weight * terms[term.name]
        return total

    def term_values(
        self, context: StepContext, auxiliary: bool = False
    ) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
        """From the recorded step: each term's unweighted value (in the graph), the detached values to log (per
        pair too when a term expands) and the auxiliary losses (when asked)."""
        terms: dict[str, Tensor] = {}
        values: dict[str, Tensor] = {}
        auxiliary_losses: dict[str, Tensor] = {}
        try:
            for term in self.terms:
                term_values = []
                for pair in self.pairs[term.name]:
                    student, teacher = self.aligned(pair)
                    value = self.value(pair, student, teacher, context)
                    term_values.append(value)
                    if pair.label:
                        values[pair.key] = value.detach()
                    if auxiliary and pair.declared.auxiliary:
                        auxiliary_losses[pair.key] = pair.loss.auxiliary_loss(student.detach(), teacher.detach())
                terms[term.name] = torch.stack(term_values).sum()
                values[term.name] = terms[term.name].detach()
        finally:
            self.clear()
        return terms, values, auxiliary_losses

    # ------------------------------------------------------------------ parameters
    def auxiliary_pairs(self) -> list[DistillPair]:
        """The pairs whose loss trains modules of its own with its own optimiser, in term order."""
        return [pair for pair in self.iter_pairs() if pair.declared.auxiliary]

    def auxiliary_optimizers(self) -> list[torch.optim.Optimizer]:
        """One optimiser per ``auxiliary_pairs()`` entry, over what that loss trains alone."""
        return [pair.loss.auxiliary_optimizer(pair.loss.auxiliary_parameters()) for pair in self.auxiliary_pairs()]

    def auxiliary_parameter_ids(self) -> set[int]:
        return {id(p) for pair in self.auxiliary_pairs() for p in pair.loss.auxiliary_parameters()}

    @property
    def wants_boxes(self) -> bool:
        """Whether a loss of this run asks for the batch's boxes (computing them costs a little)."""
        return any("boxes" in pair.declared.context for pair in self.iter_pairs())

    def preparing_pairs(self) -> list[DistillPair]:
        """The pairs whose loss prepares modules of its own on the teacher and has not done so yet."""
        return [pair for pair in self.iter_pairs() if pair.declared.prepares and not bool(pair.loss.prepared)]

    def prepared_parameter_ids(self) -> set[int]:
        return {id(p) for pair in self.iter_pairs() if pair.declared.prepares for p in pair.loss.prepare_parameters()}

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Connectors and the losses' own modules, without what a second optimiser trains or a preparation
        trained (frozen since)."""
        excluded = self.auxiliary_parameter_ids() | self.prepared_parameter_ids()
        return [p for p in self.parameters() if p.requires_grad and id(p) not in excluded]


def _teacher_reads(term: DistillTerm) -> list[str]:
    """The teacher paths a term records: its pairs' and the extra teacher tensors its loss takes."""
    return [*term.teacher_paths, *getattr(term.loss, "teacher_inputs", dict)().values()]


class _DeclarationError(ValueError):
    """A loss's declaration refused when its term is built (not a shape the loss cannot compare)."""
