"""The speed switches of a run: channels-last weights and inputs, and a compiled student."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


class SpeedSwitches:
    """``channels_last``: the student's and the teacher's weights and the input images in NHWC (convolutions
    then run faster on tensor cores); ``compile_student: <backend>``: the student's forward compiled in place
    (``nn.Module.compile``: parameter names, checkpoints and the recorder's hooks stay as they are). Applied
    once the module is on its device (Lightning's ``configure_model``), and only once."""

    def __init__(self, channels_last: bool = False, compile_student: str | None = None) -> None:
        self.channels_last, self.compile_student = channels_last, compile_student
        self._applied: set[str] = set()

    def apply(self, student: nn.Module, teachers: list[nn.Module]) -> None:
        if self.channels_last and "channels_last" not in self._applied:
            for model in (student, *teachers):
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
