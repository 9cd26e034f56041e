"""What the distillation engine asks of a task (segmentation, detection)."""

from __future__ import annotations

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
    ignore_index: int | None = None

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
