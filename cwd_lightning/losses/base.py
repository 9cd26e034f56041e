"""The contract of a distillation loss: what it may declare beyond ``forward(student, teacher)``, and the one
check of that declaration the engine makes when it builds a term.

A loss is an ``nn.Module`` called as ``loss(student, teacher, **context)`` on the aligned pair of one term.
Plain two-tensor modules (``ChannelWiseDivergence``, ``torch.nn.MSELoss``) declare nothing. A loss that needs
more declares it:

- **context**: keyword parameters of ``forward`` named after ``CONTEXT_FIELDS`` are filled by the engine:
  ``labels`` (N×H×W int64 ground truth, nearest-resized to the compared maps, ignore pixels kept as
  ``ignore_index``), ``ignore_index``, ``step`` (the global step) and ``boxes`` (a detection task's ground-truth
  boxes of each image as an M×4 x1, y1, x2, y2 tensor in the coordinates of the compared map's grid: the
  detector's resize and padding applied, so the same boxes land on every FPN level at its own scale). A
  required parameter with any other name is an error when the term is built, as is ``labels`` on a task
  without dense labels and ``boxes`` on one without boxes.
- **own modules**: ``build(student_shape, teacher_shape)`` runs once per pair, on the loss's own copy, with
  the probed shapes; modules it creates are trained with the student, saved in checkpoints and left out of
  the export.
- **own optimiser**: a loss whose ``auxiliary_optimizer`` is set also trains ``auxiliary_parameters()`` on
  ``auxiliary_loss(student, teacher)`` with a second optimiser (an adversarial discriminator): one update
  after each student update, on detached maps.
- **preparation**: a loss with ``prepare_steps > 0`` trains ``prepare_parameters()`` on the teacher alone
  before distillation starts: ``prepare_steps`` updates of ``prepare_optimizer`` on
  ``prepare_loss(teacher, **context)``, over the training data, the student not run (MasKD's mask tokens). It
  is done once: the loss's ``prepared`` buffer is set after it, saved in checkpoints with the parameters, so a
  resumed run does not prepare again. The prepared parameters are frozen afterwards (no optimiser has them).
- **a part of the teacher**: a loss whose ``teacher_modules`` names modules of its term's teacher (dotted paths,
  in the order they run) gets ``teacher_part``, a callable that runs them on a tensor of the loss's choosing
  (CrossKD runs the rest of the teacher's head on the student's head features). The teacher stays frozen: its
  weights require no gradient and get none, the tensor passed in does, and the modules run in eval mode.
- **more teacher tensors**: ``teacher_inputs()`` maps keyword parameters of ``forward`` to paths of the term's
  teacher; each is recorded with the teacher's forward and given at the pair's call (the same FPN level).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

CONTEXT_FIELDS = ("labels", "ignore_index", "step", "boxes")


class DistillationLoss(nn.Module):
    """Base class of the losses here: the declarations above, with defaults that declare nothing."""

    #: a callable ``params -> torch.optim.Optimizer`` for ``auxiliary_parameters()``; None: no second optimiser
    auxiliary_optimizer: Callable[..., torch.optim.Optimizer] | None = None

    def build(self, student_shape: torch.Size, teacher_shape: torch.Size) -> None:
        """Create modules that depend on the probed shapes (N×C×H×W of each side)."""

    def auxiliary_parameters(self) -> list[nn.Parameter]:
        """Parameters trained by ``auxiliary_optimizer`` only (never by the student's optimiser)."""
        return []

    def auxiliary_loss(self, student: Tensor, teacher: Tensor) -> Tensor:
        """The loss minimised by the second optimiser; both inputs are detached."""
        raise NotImplementedError(f"{type(self).__name__} declares no auxiliary loss")

    #: updates of the preparation on the teacher alone (0: none)
    prepare_steps: int = 0
    #: a callable ``params -> torch.optim.Optimizer`` for ``prepare_parameters()``
    prepare_optimizer: Callable[..., torch.optim.Optimizer] | None = None

    def prepare_parameters(self) -> list[nn.Parameter]:
        """Parameters trained by the preparation only, frozen afterwards."""
        return []

    def prepare_loss(self, teacher: Tensor, **context) -> Tensor:
        """The loss of the preparation, on the teacher's tensor alone (may take the context fields)."""
        raise NotImplementedError(f"{type(self).__name__} declares no preparation")

    #: dotted paths of modules of the term's teacher that ``forward`` runs in order through ``teacher_part``
    teacher_modules: tuple[str, ...] = ()

    def teacher_inputs(self) -> dict[str, str]:
        """More tensors of the term's teacher that ``forward`` takes: keyword → teacher path (``module/key``
        selectors allowed), recorded at the pair's call."""
        return {}


@dataclass(frozen=True)
class Declaration:
    """What the engine gives a loss and does for it, read once from the loss when its term is built."""

    context: tuple[str, ...]  # the context fields its forward takes
    auxiliary: bool  # whether it trains modules of its own with its own optimiser
    prepares: bool = False  # whether it prepares modules of its own on the teacher before distillation
    prepare_context: tuple[str, ...] = ()  # the context fields its prepare_loss takes
    teacher_part: bool = False  # whether its forward takes ``teacher_part`` (it names ``teacher_modules``)
    teacher_inputs: tuple[tuple[str, str], ...] = ()  # (keyword, teacher path) of the teacher tensors it takes


def build_own_modules(loss: nn.Module, student_shape: torch.Size, teacher_shape: torch.Size) -> None:
    """``loss.build(...)`` for a loss that builds modules from the probed shapes (any other loss: nothing)."""
    build = getattr(loss, "build", None)
    if callable(build):
        build(student_shape, teacher_shape)


def declaration(loss: nn.Module, has_labels: bool, has_boxes: bool = False) -> Declaration:
    """The loss's declaration, checked (after ``build_own_modules``): its forward asks only for what the
    engine can give (``labels`` only on a task with dense labels), and a loss with an optimiser of its own
    says what it trains and on which loss. Errors name the loss."""
    name = type(loss).__name__
    parameters = list(inspect.signature(loss.forward).parameters.values())
    tensors = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][:2]
    if len(tensors) < 2:
        raise TypeError(f"{name}.forward must take (student, teacher) tensors first")
    teacher_part = bool(tuple(getattr(loss, "teacher_modules", ()) or ()))
    teacher_inputs = tuple(getattr(loss, "teacher_inputs", dict)().items())
    given = {keyword for keyword, _ in teacher_inputs} | ({"teacher_part"} if teacher_part else set())
    for keyword in given:
        if keyword not in {p.name for p in parameters} or keyword in CONTEXT_FIELDS:
            raise TypeError(f"{name} declares the teacher tensor {keyword!r} but its forward has no such keyword "
                            "parameter (or it is a context field's name)")  # fmt: skip
    context = _context_fields(name, "forward", [p for p in parameters if p.name not in given], tensors, has_labels,
                              has_boxes)  # fmt: skip
    auxiliary = getattr(loss, "auxiliary_optimizer", None) is not None
    if auxiliary:
        method = getattr(type(loss), "auxiliary_loss", None)
        if not callable(method) or method is DistillationLoss.auxiliary_loss or not loss.auxiliary_parameters():
            raise TypeError(f"{name} sets auxiliary_optimizer but has no auxiliary_loss() or no "
                            "auxiliary_parameters() (see losses/base.py)")  # fmt: skip
    prepares = int(getattr(loss, "prepare_steps", 0) or 0) > 0
    prepare_context: tuple[str, ...] = ()
    if prepares:
        method = getattr(type(loss), "prepare_loss", None)
        if (
            method is None
            or method is DistillationLoss.prepare_loss
            or not loss.prepare_parameters()
            or loss.prepare_optimizer is None
            or not isinstance(getattr(loss, "prepared", None), torch.Tensor)
        ):
            raise TypeError(f"{name} sets prepare_steps but lacks prepare_loss(), prepare_parameters(), "
                            "prepare_optimizer or its prepared buffer (see losses/base.py)")  # fmt: skip
        prepare = list(inspect.signature(loss.prepare_loss).parameters.values())
        prepare_context = _context_fields(name, "prepare_loss", prepare, prepare[:1], has_labels, has_boxes)
    return Declaration(context, auxiliary, prepares, prepare_context, teacher_part, teacher_inputs)


def _context_fields(
    name: str, method: str, parameters: list, tensors: list, has_labels: bool, has_boxes: bool
) -> tuple[str, ...]:
    """The context fields a method asks for; a required parameter the engine cannot fill is an error."""
    context = []
    for parameter in parameters:
        if parameter in tensors or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        if parameter.name in CONTEXT_FIELDS:
            context.append(parameter.name)
            required = parameter.default is parameter.empty
            if parameter.name == "labels" and required and not has_labels:
                raise ValueError(f"{name} needs ground-truth labels, and this task has no dense labels")
            if parameter.name == "boxes" and required and not has_boxes:
                raise ValueError(f"{name} needs ground-truth boxes, and this task has none (a detection task has)")
        elif parameter.default is parameter.empty:
            raise TypeError(
                f"{name}.{method} needs {parameter.name!r}, which the engine cannot give; "
                f"a loss can ask for the two tensors and {', '.join(CONTEXT_FIELDS)}"
            )
    return tuple(context)
