"""A distillation term as declared in the experiment YAML, and how it expands into compared pairs."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from torch import Tensor, nn

from cwd_lightning.distill.connectors import ConnectorKind, ResizeMode
from cwd_lightning.distill.weights import Calibration, WeightSchedule

#: ``<module path>`` or ``<module path>/<key>``: a dotted module path (empty: the model itself), and the key or
#: index of its output to take (module paths never contain "/", and YAML reads these forms as plain strings)
_SELECTOR = re.compile(r"^(?P<module>[^/\[\]]*)(?:/(?P<key>[^/\[\]]+))?$")
#: the form these paths had before: ``backbone.fpn[p6]``, ``[out]``
_OLD_SELECTOR = re.compile(r"^(?P<module>[^\[\]]*)\[(?P<key>[^\[\]]+)\]$")

Calls = int | list[int] | Literal["all"] | None


@dataclass
class DistillTerm:
    """``weight · loss(student tensor, teacher tensor)`` for one or several pairs of tapped tensors.

    Paths are dotted module names relative to the student / teacher, optionally with a selector for
    modules that return a tuple or dict: ``decoder``, ``backbone.fpn/p6``, ``head/0``, and ``/out`` for the
    key ``out`` of the model's own output. A list of paths expands the term over several pairs (e.g. FPN
    levels), logged one by one and summed.

    ``calls`` picks which call of a module that runs several times per forward is compared (a shared
    detection head runs once per FPN level): an index, a list of indices, or ``all``; each chosen
    call is one more pair. Left unset, a module must run exactly once: distilling "the last call" of
    a repeated module silently is what this refuses.

    ``from_teacher`` names the teacher whose paths these are: ``teacher`` (``model.teacher``) or a name of
    ``model.teachers``.

    ``schedule`` makes the weight vary over training (deferred start, warm-up, decay, stop) and
    ``calibration`` sets it from measurements (a ratio to the task loss, or a share of the gradient at a
    student layer); see ``distill/weights.py``. Either is logged as ``train/weight/<name>``.
    """

    name: str
    student: str | list[str]
    teacher: str | list[str]
    loss: nn.Module
    weight: float = 1.0
    connector: ConnectorKind | None = None
    resize: ResizeMode | None = None
    calls: Calls = None
    from_teacher: str = "teacher"
    schedule: WeightSchedule | None = None
    calibration: Calibration | None = None

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_]+", self.name):
            raise ValueError(f"distillation term {self.name!r}: use letters, digits and '_' only")
        if self.weight < 0:
            raise ValueError(f"distillation term {self.name!r}: weight must be ≥ 0, got {self.weight}")
        student, teacher = self.student_paths, self.teacher_paths
        if len(student) != len(teacher):
            raise ValueError(
                f"distillation term {self.name!r}: {len(student)} student path(s) but {len(teacher)} "
                "teacher path(s); they are paired one to one"
            )
        for path in student + teacher:
            if (old := _OLD_SELECTOR.match(path)) is not None:
                raise ValueError(f"distillation term {self.name!r}: the selector {path!r} is written "
                                 f"{old['module'] + '/' + old['key']!r} now")  # fmt: skip
            if not isinstance(path, str) or not _SELECTOR.match(path):
                raise ValueError(f"distillation term {self.name!r}: malformed path {path!r} (a dotted module path, "
                                 "optionally /<key> of its output)")  # fmt: skip
        calls = [self.calls] if isinstance(self.calls, int) else self.calls
        if isinstance(calls, list) and (not calls or any(not isinstance(c, int) or c < 0 for c in calls)):
            raise ValueError(f"distillation term {self.name!r}: calls must be 'all', an index ≥ 0 or a list of them")

    @property
    def student_paths(self) -> list[str]:
        return [self.student] if isinstance(self.student, str) else list(self.student)

    @property
    def teacher_paths(self) -> list[str]:
        return [self.teacher] if isinstance(self.teacher, str) else list(self.teacher)

    def chosen_calls(self, count: int, where: str) -> list[int | None]:
        """The calls to compare of a module that ran ``count`` times in the probe forward."""
        if self.calls is None:
            if count != 1:
                raise ValueError(
                    f"distillation term {self.name!r}: {where} runs {count} times per forward; say which "
                    "call(s) to distill with `calls: <index>`, `calls: [0, 2]` or `calls: all`"
                )
            return [None]
        calls = (
            list(range(count)) if self.calls == "all" else [self.calls] if isinstance(self.calls, int) else self.calls
        )
        if any(call >= count for call in calls):
            raise ValueError(f"distillation term {self.name!r}: calls {self.calls} but {where} runs {count} time(s)")
        return list(calls)


def pair_labels(paths: list[str], calls: list[int | None]) -> list[str]:
    """Distinct, readable log labels for a term's pairs: the shortest trailing part of the teacher
    paths that tells them apart (``fpn/p3`` … → ``p3``; ``body/0``, ``fpn/0`` → ``body_0``,
    ``fpn_0``), plus ``call<k>`` for a chosen call. A single pair has the label ``''``."""
    if len(paths) == 1:
        return [""]
    parts = [re.split(r"[./]+", path.strip("/")) for path in paths]
    suffixes = [[f"call{call}"] if call is not None else [] for call in calls]
    for depth in range(max(len(part) for part in parts) + 1):  # depth 0: the calls alone, if they differ
        labels = ["_".join([*part[len(part) - depth :], *suffix]) for part, suffix in zip(parts, suffixes, strict=True)]
        if all(labels) and len(set(labels)) == len(labels):
            break
    if len(set(labels)) != len(labels):  # the same path and call twice: number them
        labels = [f"{label}_{index}" for index, label in enumerate(labels)]
    return [re.sub(r"[^A-Za-z0-9_]", "_", label) for label in labels]


def split_path(path: str) -> tuple[str, str | None]:
    """``'backbone.fpn/p6'`` → ``('backbone.fpn', 'p6')``; ``'/out'`` → ``('', 'out')``."""
    match = _SELECTOR.match(path)
    assert match is not None
    return match["module"], match["key"]


def select(output: Any, key: str | None, where: str) -> Tensor:
    """Pick the tensor a path points at from a module output (tensor, tuple/list or dict); a selector that does
    not fit the output is a config error (ValueError, one line from the CLI)."""
    if key is not None:
        if isinstance(output, dict):
            if key not in output:
                raise ValueError(f"{where}: output has keys {list(output)}, not {key!r}")
            output = output[key]
        elif isinstance(output, list | tuple):
            if not key.lstrip("-").isdigit() or not -len(output) <= int(key) < len(output):
                raise ValueError(f"{where}: output is a sequence of {len(output)}, not indexable by {key!r}")
            output = output[int(key)]
        else:
            raise ValueError(f"{where}: output is a {type(output).__name__}, it cannot be indexed by {key!r}")
    if not isinstance(output, Tensor):
        raise ValueError(
            f"{where}: output is a {type(output).__name__}, not a tensor; add a selector such as 'path/0' or 'path/key'"
        )
    return output


def teacher_side(name: str) -> str:
    """How errors name a teacher: ``teacher`` for ``model.teacher``, ``teacher 'vit'`` for ``model.teachers.vit``."""
    return "teacher" if name == "teacher" else f"teacher {name!r}"
