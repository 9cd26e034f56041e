"""A distillation term as declared in the experiment YAML."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from cwd_lightning.distill.connectors import ConnectorKind, ResizeMode

_SELECTOR = re.compile(r"^(?P<module>[^\[\]]*)(?:\[(?P<key>[^\[\]]+)\])?$")


@dataclass
class DistillTerm:
    """``weight · loss(student tensor, teacher tensor)`` for one or several pairs of tapped tensors.

    Paths are dotted module names relative to the student / teacher, optionally with a selector for
    modules that return a tuple or dict: ``decoder``, ``backbone.fpn[p6]``, ``head[0]``. A list of
    paths expands the term over several pairs (e.g. FPN levels), logged one by one and summed.
    """

    name: str
    student: str | list[str]
    teacher: str | list[str]
    loss: nn.Module
    weight: float = 1.0
    connector: ConnectorKind | None = None
    resize: ResizeMode | None = None

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_]+", self.name):
            raise ValueError(f"distillation term name {self.name!r}: use letters, digits and '_' only")
        student, teacher = self.student_paths, self.teacher_paths
        if len(student) != len(teacher):
            raise ValueError(
                f"distillation term {self.name!r}: {len(student)} student path(s) but {len(teacher)} "
                "teacher path(s); they are paired one to one"
            )
        for path in student + teacher:
            if not _SELECTOR.match(path):
                raise ValueError(f"distillation term {self.name!r}: malformed path {path!r}")

    @property
    def student_paths(self) -> list[str]:
        return [self.student] if isinstance(self.student, str) else list(self.student)

    @property
    def teacher_paths(self) -> list[str]:
        return [self.teacher] if isinstance(self.teacher, str) else list(self.teacher)

    def pairs(self) -> list[tuple[str, str, str]]:
        """(label, student path, teacher path) per pair; the label is '' for a single pair."""
        pairs = list(zip(self.student_paths, self.teacher_paths, strict=True))
        if len(pairs) == 1:
            return [("", *pairs[0])]
        return [(_label(teacher, index), student, teacher) for index, (student, teacher) in enumerate(pairs)]


def split_path(path: str) -> tuple[str, str | None]:
    """``'backbone.fpn[p6]'`` → ``('backbone.fpn', 'p6')``."""
    match = _SELECTOR.match(path)
    assert match is not None
    return match["module"], match["key"]


def select(output: Any, key: str | None, where: str) -> Tensor:
    """Pick the tensor a path points at from a module output (tensor, tuple/list or dict)."""
    if key is not None:
        if isinstance(output, dict):
            if key not in output:
                raise KeyError(f"{where}: output has keys {list(output)}, not {key!r}")
            output = output[key]
        elif isinstance(output, list | tuple):
            if not key.lstrip("-").isdigit() or not -len(output) <= int(key) < len(output):
                raise KeyError(f"{where}: output is a sequence of {len(output)}, not indexable by {key!r}")
            output = output[int(key)]
        else:
            raise KeyError(f"{where}: output is a {type(output).__name__}, it cannot be indexed by {key!r}")
    if not isinstance(output, Tensor):
        raise TypeError(
            f"{where}: output is a {type(output).__name__}, not a tensor; add a selector such as "
            "'path[0]' or 'path[key]'"
        )
    return output


def _label(teacher_path: str, index: int) -> str:
    _, key = split_path(teacher_path)
    return re.sub(r"[^A-Za-z0-9_]", "_", key) if key is not None else str(index)
