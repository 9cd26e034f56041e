"""The speed switches of a run: channels-last weights and inputs, a compiled student, and the teachers' own
precision and layout."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any, Literal

import torch
from torch import Tensor, nn

TeacherPrecision = Literal["auto", "32", "bf16", "16"]
_LOW_PRECISION = {"bf16": torch.bfloat16, "16": torch.float16}


class TeacherSpeed:
    """How the teachers run, whatever the student does: ``precision`` ``auto`` runs them as the student (under the
    trainer's precision), ``32`` in fp32 even under a mixed-precision student, ``bf16``/``16`` under autocast to
    that dtype with their recorded outputs upcast to fp32 for the losses (on GPUs a large teacher's forward is
    most of a step); ``channels_last`` (None: as the student) their weights in NHWC."""

    def __init__(self, precision: TeacherPrecision = "auto", channels_last: bool | None = None) -> None:
        if precision not in ("auto", "32", *_LOW_PRECISION):
            raise ValueError(f"model.teacher_precision must be auto, 32, bf16 or 16, got {precision!r}")
        self.precision, self.channels_last = precision, channels_last

    @property
    def upcasts(self) -> bool:
        return self.precision in _LOW_PRECISION

    def autocast(self, device: torch.device) -> AbstractContextManager:
        if self.precision == "auto":
            return nullcontext()
        if self.precision == "32":
            return torch.autocast(device.type, enabled=False)
        return torch.autocast(device.type, dtype=_LOW_PRECISION[self.precision])


class SpeedSwitches:
    """``channels_last``: the student's weights (and the teachers', unless ``teacher`` says otherwise) and the input
    images in NHWC (convolutions then run faster on tensor cores); ``compile_student: <backend>``: the student's
    forward compiled in place (``nn.Module.compile``: parameter names, checkpoints and the recorder's hooks stay
    as they are). Applied once the module is on its device (Lightning's ``configure_model``), and only once."""

    def __init__(self, channels_last: bool = False, compile_student: str | None = None,
                 teacher: TeacherSpeed | None = None) -> None:  # fmt: skip
        self.channels_last, self.compile_student = channels_last, compile_student
        self.teacher = teacher or TeacherSpeed()
        self._applied: set[str] = set()

    def apply(self, student: nn.Module, teachers: list[nn.Module]) -> None:
        if "channels_last" not in self._applied:
            teachers_too = self.channels_last if self.teacher.channels_last is None else self.teacher.channels_last
            for model in [*([student] if self.channels_last else []), *(teachers if teachers_too else [])]:
                model.to(memory_format=torch.channels_last)
            self._applied.add("channels_last")
        if self.compile_student and "compile" not in self._applied:
            student.compile(backend=self.compile_student)
            self._applied.add("compile")

    def inputs(self, batch: Any) -> Any:
        """Images in channels_last when the weights are (segmentation batches: (images, masks, …))."""
        images = batch[0] if isinstance(batch, tuple | list) else None
        if self.channels_last and isinstance(images, Tensor) and images.ndim == 4:
            return (batch[0].contiguous(memory_format=torch.channels_last), *batch[1:])
        return batch
