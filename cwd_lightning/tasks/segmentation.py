"""Semantic segmentation: cross-entropy (with an auxiliary head's), mIoU / per-class IoU / pixel accuracy."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassJaccardIndex

from cwd_lightning.models.segmentation import main_logits
from cwd_lightning.tasks.base import Task


class SegmentationTask(Task):
    """Per-pixel classification with ``ignore_index`` pixels (VOC boundaries, Cityscapes void). A model may
    return ``{"out": logits, "aux": auxiliary logits}``: in training the auxiliary cross-entropy enters
    the task loss with ``aux_weight`` (0.4, as PSPNet and mmseg) and is logged as its own part."""

    monitor = "val/mIoU"
    monitor_mode = "max"
    has_dense_labels = True
    exports_graph = True

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = 255,
        class_names: list[str] | None = None,
        example_size: int = 64,
        aux_weight: float = 0.4,
    ) -> None:
        super().__init__()
        if aux_weight < 0:
            raise ValueError(f"task.aux_weight must be ≥ 0, got {aux_weight}")
        self.aux_weight = aux_weight
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"task.class_names has {len(class_names)} names for num_classes={num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = class_names or [str(index) for index in range(num_classes)]
        self.example_size = example_size
        common = {"num_classes": num_classes, "ignore_index": ignore_index, "validate_args": False}
        self.metrics = MetricCollection(
            {
                "mIoU": MulticlassJaccardIndex(average="macro", **common),
                "IoU": MulticlassJaccardIndex(average="none", **common),
                "pixel_acc": MulticlassAccuracy(average="micro", **common),
                "confusion": MulticlassConfusionMatrix(**common),
            }
        )
        self.last_confusion: Tensor | None = None  # of the last validation, for the prediction monitor

    def example_input(self) -> Tensor:
        return torch.zeros(2, 3, self.example_size, self.example_size)

    def output_classes(self, model: nn.Module) -> int | None:
        training = model.training
        model.eval()  # no BatchNorm statistics moved by this probe
        try:
            with torch.no_grad():
                return main_logits(model(self.example_input())).shape[1]
        finally:
            model.train(training)

    def batch_inputs(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        return batch[0]

    def dense_labels(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        return batch[1]

    def first_samples(self, batch: tuple[Tensor, Tensor], count: int) -> tuple[Tensor, Tensor]:
        images, masks = batch
        return images[:count].detach(), masks[:count].detach()

    def _loss(self, logits: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
        if logits.shape[-2:] != masks.shape[-2:]:
            logits = F.interpolate(logits, size=masks.shape[-2:], mode="bilinear", align_corners=False)
        return F.cross_entropy(logits.float(), masks.long(), ignore_index=self.ignore_index), logits

    def training_loss(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        images, masks = batch
        output = model(images)
        loss, _ = self._loss(main_logits(output), masks)
        parts = {"ce": loss.detach()}
        if isinstance(output, dict) and output.get("aux") is not None and self.aux_weight:
            auxiliary, _ = self._loss(output["aux"], masks)
            parts["aux_ce"] = auxiliary.detach()
            loss = loss + self.aux_weight * auxiliary
        return loss, parts

    def predict(self, model: nn.Module, images: Tensor) -> Tensor | None:
        """Class map at the images' size (logits upsampled first, as for the metrics); None for a model that gives
        no logits (a feature teacher: its output is a dict of maps without ``out``)."""
        output = model(images)
        if isinstance(output, dict) and "out" not in output:
            return None
        logits = main_logits(output)
        if logits.shape[-2:] != images.shape[-2:]:
            logits = F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return logits.argmax(1)

    def validation_step(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        images, masks = batch
        loss, logits = self._loss(main_logits(model(images)), masks)
        self.metrics.update(logits.argmax(1), masks)
        return loss, {}

    def compute_metrics(self) -> dict[str, Tensor]:
        values = self.metrics.compute()
        self.metrics.reset()
        self.last_confusion = values["confusion"].detach().cpu()
        out = {"val/mIoU": values["mIoU"], "val/pixel_acc": values["pixel_acc"]}
        for name, iou in zip(self.class_names, values["IoU"], strict=True):
            out[f"val/IoU/{name}"] = iou
        return out
