"""The teacher in bf16 and fp16 against fp32 (``model.teacher_precision``): what its forward costs, and how far its
targets move from the fp32 teacher's on the bench batch."""

from __future__ import annotations

from typing import Any

import torch

from cwd_lightning.bench.timing import time_step
from cwd_lightning.distill.module import DistillationModule
from cwd_lightning.distill.speed import TeacherSpeed
from cwd_lightning.distill.teacher import LiveTeacher
from cwd_lightning.losses import ChannelWiseDivergence

#: the τ of the paper's logits setting, at which the targets' change is measured
TAU = 4.0


def teacher_precision_effect(module: DistillationModule, batch: Any, repeats: int, warmup: int,
                             device: torch.device) -> dict[str, Any]:  # fmt: skip
    """Per teacher precision (32, bf16, 16): the median forward time, and per tapped N×C×H×W tensor the CWD
    (τ = 4, τ²·KL per channel, as the loss) between its map and the fp32 teacher's, and the largest absolute
    difference over the fp32 map's largest magnitude."""
    recorder = module.live_teachers["teacher"].recorder
    teachers = {precision: LiveTeacher(module.teacher, module.task, recorder, TeacherSpeed(precision))
                for precision in ("32", "bf16", "16")}  # fmt: skip
    reference = teachers["32"].outputs(batch)
    divergence = ChannelWiseDivergence(TAU)
    result: dict[str, Any] = {"what": __doc__.splitlines()[0], "tau": TAU}
    for precision, teacher in teachers.items():
        try:
            outputs = teacher.outputs(batch)
        except RuntimeError as error:  # an op without a kernel in this dtype on this device
            result[precision] = {"skipped": str(error).splitlines()[0]}
            continue
        timing = time_step(lambda teacher=teacher: teacher.outputs(batch), repeats, warmup, device)
        tensors = {}
        for path, calls in outputs.items():
            for call, (low, full) in enumerate(zip(calls, reference[path], strict=True)):
                if low.ndim != 4:
                    continue
                scale = float(full.abs().max()) or 1.0
                tensors[f"{path}[{call}]"] = {
                    "cwd_to_fp32": float(divergence(low, full)),
                    "max_abs_difference_relative": float((low - full).abs().max()) / scale,
                }
        result[precision] = {"forward_ms": timing.median_ms, "tensors": tensors}
    return result
