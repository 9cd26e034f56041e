"""Looking inside a DistillationModule without training it: the compared tensors, parameter counts."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from cwd_lightning.distill.distiller import evaluating


@torch.no_grad()
def distillation_pairs(module: Any, batch: Any) -> dict[str, tuple[Tensor, Tensor, float, list[str] | None]]:
    """Per term and pair (eval mode, no gradient): the aligned (student, teacher) tensors, the loss's τ
    (1 if it has none) and channel names when channels are the classes. Pairs whose two sides have
    different channel counts (compared by losses that pool over channels) are left out."""
    distiller = module.distiller
    if distiller is None:
        return {}
    inputs = module.task.batch_inputs(batch)
    class_names = getattr(module.task, "class_names", None)
    pairs = {}
    with evaluating(module.student, distiller):
        module.live_outputs.record(batch)  # every teacher a term reads
        with distiller.recording(teacher=False):
            module.task.run(module.student, inputs, distiller.student_recorder.paths)
        try:
            for pair in distiller.iter_pairs():
                student, teacher = distiller.aligned(pair)
                if student.shape != teacher.shape:
                    continue
                names = class_names if class_names and len(class_names) == student.shape[1] else None
                pairs[pair.key] = (student, teacher, float(getattr(pair.loss, "tau", 1.0)), names)
        finally:
            distiller.clear()
    return pairs


def parameter_counts(module: Any) -> dict[str, int]:
    """Student, teachers (all of them), distiller (connectors and the losses' own modules) and trainable parameters."""

    def count(parameters) -> int:
        return sum(p.numel() for p in parameters)

    teachers: dict[str, nn.Module] = module.all_teachers()
    return {
        "params/student": count(module.student.parameters()),
        "params/teacher": sum(count(teacher.parameters()) for teacher in teachers.values()),
        "params/distiller": count(module.distiller.parameters()) if module.distiller is not None else 0,
        "params/trainable": count(p for p in module.parameters() if p.requires_grad),
    }
