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
    has_boxes = True

    def __init__(self, num_classes: int, class_names: list[str] | None = None, example_size: int = 64,
                 max_detections: int = 100) -> None:  # fmt: skip
        """``max_detections``: the detections per image that mAP counts (COCO's 100; a dense scene, hundreds
        of objects an image, needs more, and its detector's ``detections_per_img`` as many)."""
        super().__init__()
        self.num_classes = num_classes
        self.class_names = class_names
        self.example_size = example_size
        self.max_detections = max_detections
        # pycocotools' summary reads its AP lines at 100 detections only (-1 at any other limit): at another
        # limit the APs are read from COCOeval's precision array at that limit, as its summary does at 100
        self.metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="pycocotools",
                                           max_detection_thresholds=[1, 10, max_detections],
                                           extended_summary=max_detections != 100)  # fmt: skip

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
        # where the boxes go: each image's resize, and the padded batch the maps are computed on
        self.geometry = (images, [tuple(image.shape[-2:]) for image in images], image_list.image_sizes,
                         tuple(image_list.tensors.shape[-2:]))  # fmt: skip
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

    def input_boxes(self, batch: tuple[Images, Targets]) -> tuple[list[Tensor], tuple[int, int]]:
        """The targets' boxes resized as the detector's transform resized these images in this step's ``run`` of
        the teacher (which sizes them as the student does), in the padded input's pixels, and that input's H×W."""
        images, originals, resized, padded = getattr(self, "geometry", (None,) * 4)
        if images is not batch[0]:
            raise ValueError("a loss that reads the boxes needs this step's teacher forward (it records the "
                             "detector's resize); a teacher cache has none: leave model.teacher_cache out")  # fmt: skip
        boxes = []
        for target, (height, width), (new_height, new_width) in zip(batch[1], originals, resized, strict=True):
            scale = torch.tensor([new_width / width, new_height / height] * 2).to(target["boxes"])
            boxes.append(target["boxes"] * scale)
        return boxes, padded

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
        if self.max_detections != 100:
            values = {**values, **aps_at_the_last_limit(values["precision"])}
        names = {"map": "mAP", "map_50": "mAP50", "map_75": "mAP75", "map_small": "mAP_small",
                 "map_medium": "mAP_medium", "map_large": "mAP_large"}  # fmt: skip
        return {f"val/{name}": values[key].float() for key, name in names.items()}


def aps_at_the_last_limit(precision: Tensor) -> dict[str, Tensor]:
    """COCOeval's AP lines from its precision array (IoU thresholds × recall points × classes × areas ×
    detection limits; -1 where a class has no ground truth) at the last detection limit: the mean over IoU
    0.50:0.95, at 0.50 and 0.75, and per area (all, small, medium, large)."""

    def mean(values: Tensor) -> Tensor:
        valid = values[values > -1]
        return valid.mean() if valid.numel() else torch.tensor(-1.0)

    at_limit = precision[..., -1]
    return {"map": mean(at_limit[:, :, :, 0]), "map_50": mean(at_limit[0, :, :, 0]),
            "map_75": mean(at_limit[5, :, :, 0]), "map_small": mean(at_limit[:, :, :, 1]),
            "map_medium": mean(at_limit[:, :, :, 2]), "map_large": mean(at_limit[:, :, :, 3])}  # fmt: skip
