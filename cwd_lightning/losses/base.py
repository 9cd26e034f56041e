"""What a distillation loss may declare beyond ``forward(student, teacher)``.

A loss is an ``nn.Module`` called as ``loss(student, teacher, **context)`` on the aligned pair of one
term. Plain two-tensor modules (``ChannelWiseDivergence``, ``torch.nn.MSELoss``) need nothing of this
file. A loss that needs more declares it, and the engine checks the declaration when it is built:

- **context**: keyword parameters of ``forward`` named after ``CONTEXT_FIELDS`` are filled by the
  engine: ``labels`` (N×H×W int64 ground truth, nearest-resized to the compared maps, ignore pixels
  kept as ``ignore_index``), ``ignore_index`` and ``step`` (the global step). A required parameter
  with any other name is an error at build time.
- **own modules**: ``build(student_shape, teacher_shape)`` runs once per pair, on the loss's own copy,
  with the probed shapes; modules it creates are trained with the student, saved in checkpoints and
  left out of the export.
- **own optimiser**: a loss whose ``auxiliary_optimizer`` is set also trains ``auxiliary_parameters()``
  on ``auxiliary_loss(student, teacher)`` with a second optimiser (an adversarial discriminator).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

CONTEXT_FIELDS = ("labels", "ignore_index", "step")


class DistillationLoss(nn.Module):
    """Optional base class: the hooks below, with defaults that declare nothing."""

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


def context_fields(loss: nn.Module) -> dict[str, bool]:
    """The context fields that ``loss.forward`` asks for, each with whether it is required; a required
    parameter the engine cannot fill (anything beyond the two tensors and ``CONTEXT_FIELDS``) is an
    error naming the loss."""
    parameters = list(inspect.signature(loss.forward).parameters.values())
    tensors = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][:2]
    if len(tensors) < 2:
        raise TypeError(f"{type(loss).__name__}.forward must take (student, teacher) tensors first")
    asked: dict[str, bool] = {}
    for parameter in parameters:
        if parameter in tensors or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        if parameter.name in CONTEXT_FIELDS:
            asked[parameter.name] = parameter.default is parameter.empty
        elif parameter.default is parameter.empty:
            raise TypeError(
                f"{type(loss).__name__}.forward needs {parameter.name!r}, which the engine cannot give; "
                f"a loss can ask for the two tensors and {', '.join(CONTEXT_FIELDS)}"
            )
    return asked


@contextmanager
def full_precision(tensor: Tensor) -> Iterator[None]:
    """No autocast inside: losses are computed in fp32 even in a mixed-precision run."""
    with torch.autocast(device_type=tensor.device.type, enabled=False):
        yield


def check_maps(name: str, student: Tensor, teacher: Tensor, *, same_channels: bool = True) -> None:
    """Both N×C×H×W with the same N, H, W (and C unless the loss compares across channel counts)."""
    axes = (0, 1, 2, 3) if same_channels else (0, 2, 3)
    if student.ndim != 4 or teacher.ndim != 4 or any(student.shape[a] != teacher.shape[a] for a in axes):
        what = "N×C×H×W tensors of the same shape" if same_channels else "N×C×H×W tensors with the same N, H, W"
        raise ValueError(
            f"{name} expects two {what}, got student {tuple(student.shape)} and teacher {tuple(teacher.shape)}"
        )


def check_labels(name: str, labels: Tensor | None, student: Tensor) -> Tensor:
    """Labels present and N×H×W matching the compared maps."""
    if labels is None:
        raise ValueError(f"{name} needs ground-truth labels; the task gave none (a segmentation task does)")
    if labels.shape != (student.shape[0], *student.shape[2:]):
        raise ValueError(
            f"{name}: labels {tuple(labels.shape)} do not match the maps' N×H×W "
            f"{(student.shape[0], *student.shape[2:])}"
        )
    return labels.long()
