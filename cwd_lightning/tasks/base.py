"""What the distillation engine asks of a task (segmentation, detection)."""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn


class Task(nn.Module):
    """Task-specific parts plugged into the one ``DistillationModule``: how to run a model on a batch,
    the task loss, and the validation metrics. Holds the metric state, so it is an ``nn.Module``."""

    #: metric that selects the best checkpoint
    monitor: str = "val/loss_task"
    monitor_mode: str = "min"
    #: whether ``dense_labels`` gives per-pixel labels (losses such as IFVD need them)
    has_dense_labels: bool = False
    #: whether ``input_boxes`` gives each image's ground-truth boxes (losses such as FGD need them)
    has_boxes: bool = False
    ignore_index: int | None = None
    #: whether a student of this task exports as one graph, images in and outputs at their size out
    #: (``torch.export`` / ONNX); otherwise the export writes its state_dict only
    exports_graph: bool = False

    def example_input(self) -> Any:
        """A small input used once at construction to check paths, shapes and channel counts."""
        raise NotImplementedError

    def run(self, model: nn.Module, inputs: Any, paths: Sequence[str] = ()) -> Any:
        """Plain forward of a model (used for the probe and for the teacher); ``paths`` are the modules
        recorded during this forward, so a task may skip parts that nothing reads."""
        return model(inputs)

    def dense_labels(self, batch: Any) -> Tensor | None:
        """Per-pixel N×H×W labels of a batch (``ignore_index`` where unlabelled), or None."""
        return None

    def input_boxes(self, batch: Any) -> tuple[list[Tensor], tuple[int, int]] | None:
        """Each image's boxes in the pixels of the network input of the last ``run`` and that input's H×W, or None."""
        return None

    def training_loss(self, model: nn.Module, batch: Any) -> tuple[Tensor, dict[str, Tensor]]:
        """Task loss of ``model`` on ``batch`` and its named parts, for logging."""
        raise NotImplementedError

    def batch_inputs(self, batch: Any) -> Any:
        """The part of a batch that the models take as input."""
        raise NotImplementedError

    def validation_step(self, model: nn.Module, batch: Any) -> tuple[Tensor, dict[str, Tensor]]:
        """Update the validation metrics; return the task loss and its named parts."""
        raise NotImplementedError

    def compute_metrics(self) -> dict[str, Tensor]:
        """Aggregate and reset the validation metrics; keys are logged as given (``val/...``)."""
        raise NotImplementedError

    def first_samples(self, batch: Any, count: int) -> Any:
        """The first ``count`` samples of a batch, as a batch (monitors keep a few to look at)."""
        raise NotImplementedError

    def output_classes(self, model: nn.Module) -> int | None:
        """How many classes ``model`` predicts, counted as ``num_classes`` counts them; None if unknown."""
        return None

    def batch_size(self, batch: Any) -> int:
        return len(self.batch_inputs(batch))


def check_class_counts(task: Task, student: nn.Module | None = None, data: Any = None) -> None:
    """The student and the data have the task's classes: else the task loss fails at the first step (a
    label the student has no output for, reported as a bad mask) or classes go unused. A teacher may
    predict others (a COCO detector distilling its FPN into an 80-class student); a term comparing its
    logits with the student's then fails at the build's probe, which compares their channels."""
    expected = getattr(task, "num_classes", None)
    if expected is None:
        return
    if student is not None and (classes := task.output_classes(student)) not in (None, expected):
        raise ValueError(
            f"model.student predicts {classes} classes but model.task.init_args.num_classes is {expected}: make "
            "them agree (for the builders here: model.student.init_args.num_classes)"
        )
    classes = getattr(data, "num_classes", None)
    if classes is None and getattr(data, "class_names", None) is not None:
        classes = len(data.class_names)
    if classes is not None and classes != expected:
        raise ValueError(f"data has {classes} classes (data.init_args.num_classes / class_names) but the "
                         f"task has {expected} (model.task.init_args.num_classes): make them agree")  # fmt: skip


def monitored_metric(task_spec: dict[str, Any]) -> str:
    """The metric that selects the best checkpoint, of a task given as ``{class_path, init_args}`` (a saved
    config): read off the task class, so nothing outside ``tasks/`` needs to know metric names."""
    module_name, _, name = str(task_spec["class_path"]).rpartition(".")
    task_class = getattr(importlib.import_module(module_name), name)
    return task_class.monitor
