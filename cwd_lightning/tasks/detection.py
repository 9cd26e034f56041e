"""Object detection: the detectors' own losses in training, COCO mAP (torchmetrics, pycocotools backend) in
validation, and what distillation runs of a detector (its backbone + FPN, the head when tapped)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics.detection import MeanAveragePrecision

from cwd_lightning.tasks.base import Task

Images = list[Tensor]
Targets = list[dict[str, Tensor]]


def _evaluation_target(target: dict[str, Tensor]) -> dict[str, Tensor]:
    """Boxes and labels, and the crowd flags and annotated areas when the reader gives them (COCOeval uses
    both: crowd regions are ignored, areas decide small/medium/large)."""
    kept = {key: target[key] for key in ("boxes", "labels", "iscrowd", "area") if key in target}
    return {**kept, "boxes": kept["boxes"].float()}


class DetectionTask(Task):
    """The detector computes its own losses in train mode; validation runs it in eval mode and feeds
    the detections to torchmetrics' COCO mAP (pycocotools backend)."""

    monitor = "val/mAP"
    monitor_mode = "max"

    def __init__(self, num_classes: int, class_names: list[str] | None = None, example_size: int = 64) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.class_names = class_names
        self.example_size = example_size
        self.metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="pycocotools")

    def example_input(self) -> Images:
        return [torch.zeros(3, self.example_size, self.example_size) for _ in range(2)]

    def run(self, model: nn.Module, images: Images, paths: Sequence[str] = ()) -> Any:
        """What distillation needs of a detector: its own resize/normalise, the backbone + FPN, and the
        head only when a recorded path lies in it (the head is the costly part at small sizes)."""
        transform, was_training = model.transform, model.transform.training
        transform.train(self.training)  # a frozen teacher sizes the images as the student does in this phase
        try:
            image_list, _ = transform(images)
        finally:
            transform.train(was_training)
        features = model.backbone(image_list.tensors)
        if any(path == "head" or path.startswith("head.") for path in paths):
            model.head(list(features.values()))
        return features

    def output_classes(self, model: nn.Module) -> int | None:
        """Foreground classes of a torchvision detector (its heads count the background too)."""
        head = getattr(getattr(model, "head", None), "classification_head", None)  # RetinaNet, FCOS
        if head is not None and hasattr(head, "num_classes"):
            return head.num_classes - 1
        predictor = getattr(getattr(model, "roi_heads", None), "box_predictor", None)  # Faster R-CNN
        score = getattr(predictor, "cls_score", None)
        return score.out_features - 1 if isinstance(score, nn.Linear) else None

    def batch_inputs(self, batch: tuple[Images, Targets]) -> Images:
        return batch[0]

    def first_samples(self, batch: tuple[Images, Targets], count: int) -> tuple[Images, Targets]:
        return batch[0][:count], batch[1][:count]

    def training_loss(self, model: nn.Module, batch: tuple[Images, Targets]) -> tuple[Tensor, dict[str, Tensor]]:
        images, targets = batch
        losses = model(images, [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets])
        return sum(losses.values()), {name: value.detach() for name, value in losses.items()}

    def validation_step(self, model: nn.Module, batch: tuple[Images, Targets]) -> tuple[Tensor | None, dict]:
        images, targets = batch
        detections = model(images)
        self.metric.update(
            [{k: d[k].float() if k != "labels" else d[k] for k in ("boxes", "scores", "labels")} for d in detections],
            [_evaluation_target(target) for target in targets],
        )
        return None, {}  # torchvision detectors give no loss in eval mode

    def compute_metrics(self) -> dict[str, Tensor]:
        values = self.metric.compute()
        self.metric.reset()
        names = {"map": "mAP", "map_50": "mAP50", "map_75": "mAP75", "map_small": "mAP_small",
                 "map_medium": "mAP_medium", "map_large": "mAP_large"}  # fmt: skip
        return {f"val/{name}": values[key].float() for key, name in names.items()}
