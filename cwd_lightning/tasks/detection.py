"""Object detection: torchvision RetinaNet / FCOS / Faster R-CNN on ResNet or timm backbones with an
FPN, the detectors' own losses, COCO mAP with torchmetrics."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from functools import partial
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torchmetrics.detection import MeanAveragePrecision
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d

from cwd_lightning.tasks.base import Task

Images = list[Tensor]
Targets = list[dict[str, Tensor]]


class TimmFPNBackbone(nn.Module):
    """A timm ``features_only`` encoder under torchvision's ``FeaturePyramidNetwork``: the same
    interface as torchvision's ``BackboneWithFPN`` (``.body``, ``.fpn``, ``.out_channels``)."""

    def __init__(self, name: str, out_channels: int, pretrained: bool, extra_blocks: nn.Module,
                 out_indices: tuple[int, ...] = (2, 3, 4)) -> None:  # fmt: skip
        super().__init__()
        import timm

        self.body = timm.create_model(name, pretrained=pretrained, features_only=True, out_indices=out_indices)
        self.fpn = FeaturePyramidNetwork(self.body.feature_info.channels(), out_channels, extra_blocks=extra_blocks)
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        return self.fpn(OrderedDict((str(i), feature) for i, feature in enumerate(self.body(x))))


def build_detector(
    arch: Literal["retinanet", "fcos", "fasterrcnn"] = "retinanet",
    backbone: str = "resnet50",
    num_classes: int = 80,
    backbone_weights: Literal["imagenet"] | None = "imagenet",
    min_size: int = 800,
    max_size: int = 1333,
    fpn_channels: int = 256,
    anchor_sizes: list[int] | None = None,
    trainable_layers: int = 5,
    head_norm: Literal["group"] | None = None,
) -> nn.Module:
    """A torchvision detector; ``backbone`` is any torchvision ResNet (``resnet18`` … ``resnet152``) or a
    timm model as ``tu-<name>``. ``num_classes`` counts foreground classes (labels 1..K).

    ``min_size``/``max_size`` set the detectors' resize in evaluation (800 px by default in torchvision,
    10-20 s a step on a CPU); in training the data pipeline's sizes are kept, or its scale jitter would
    be undone. ``anchor_sizes`` (one
    base size per pyramid level, RetinaNet) must suit the object sizes at that resolution.
    ``head_norm: group`` puts GroupNorm(32) in the RetinaNet head (torchvision's v2 recipe), which
    trains from scratch much more readily than the plain head.
    """
    if arch not in ("retinanet", "fcos", "fasterrcnn"):
        raise ValueError(f"unknown detector arch {arch!r}; choose retinanet, fcos or fasterrcnn")
    ignored = [name for name, value in (("anchor_sizes", anchor_sizes), ("head_norm", head_norm)) if value is not None]
    if arch != "retinanet" and ignored:
        raise ValueError(f"build_detector: {', '.join(ignored)} configure the RetinaNet head and anchors only; "
                         f"remove them for arch: {arch}")  # fmt: skip
    one_stage = arch in ("retinanet", "fcos")
    extra = LastLevelP6P7(fpn_channels, fpn_channels) if one_stage else LastLevelMaxPool()
    pretrained = backbone_weights == "imagenet"
    try:
        if backbone.startswith("tu-"):
            # C3-C5 + P6/P7 (one-stage) or C2-C5 + pool (Faster R-CNN): five levels for the five anchor sizes
            stages = (2, 3, 4) if one_stage else (1, 2, 3, 4)
            body = TimmFPNBackbone(backbone[3:], fpn_channels, pretrained, extra, stages)
        else:
            from torchvision.models import get_model_weights

            weights = get_model_weights(backbone).IMAGENET1K_V1 if pretrained else None
            body = resnet_fpn_backbone(
                backbone_name=backbone,
                weights=weights,
                # frozen BN statistics only make sense for pretrained weights; from scratch BN must learn
                norm_layer=FrozenBatchNorm2d if pretrained else nn.BatchNorm2d,
                trainable_layers=trainable_layers if pretrained else 5,
                returned_layers=[2, 3, 4] if one_stage else [1, 2, 3, 4],
                extra_blocks=extra,
            )
            if fpn_channels != 256:
                raise ValueError("torchvision ResNet-FPN backbones have 256 channels; use fpn_channels: 256")
    except (OSError, RuntimeError) as error:
        if not pretrained:
            raise
        raise RuntimeError(
            f"could not load ImageNet weights for backbone {backbone!r} ({type(error).__name__}: {error}). "
            "They are downloaded on first use; connect once, or set backbone_weights: null."
        ) from error
    # in training the images keep the data pipeline's sizes (its scale jitter and crop); in evaluation the
    # detector resizes them to min_size/max_size (torchvision's _skip_resize applies to training only)
    common = {"min_size": min_size, "max_size": max_size, "_skip_resize": True}
    if arch == "retinanet":
        # torchvision's anchors: 32-512 px, 3 scales × 3 ratios per level
        bases = anchor_sizes or (32, 64, 128, 256, 512)
        sizes = tuple((s, int(s * 2 ** (1 / 3)), int(s * 2 ** (2 / 3))) for s in bases)
        head = None
        if head_norm == "group":
            head = RetinaNetHead(fpn_channels, 9, num_classes + 1, norm_layer=partial(nn.GroupNorm, 32))
        anchors = Float32AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
        detector = RetinaNet(body, num_classes + 1, anchor_generator=anchors, head=head, **common)
    elif arch == "fcos":
        detector = FCOS(body, num_classes + 1, **common)
    else:
        detector = FasterRCNN(body, num_classes + 1, **common)
    return keep_box_outputs_in_float32(detector)


class Float32AnchorGenerator(AnchorGenerator):
    """torchvision's generator takes the feature maps' dtype: under bf16 autocast the anchors (and so the
    decoded boxes) were bf16, off by up to 8 px at 800×1344. Only the maps' sizes matter, so pass those."""

    def forward(self, image_list: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:
        sizes = [feature.new_empty((0, *feature.shape[-2:]), dtype=torch.float32) for feature in feature_maps]
        return super().forward(image_list, sizes)


class Float32Conv2d(nn.Conv2d):
    """A box or score output layer that runs in fp32 under autocast (its input cast up, weights fp32)."""

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float())


class Float32Linear(nn.Linear):
    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float())


#: the layers whose outputs are box regressions, scores or centerness (RetinaNet, FCOS, Faster R-CNN)
_OUTPUT_LAYERS = ("cls_logits", "bbox_reg", "bbox_ctrness", "bbox_pred", "cls_score")


def keep_box_outputs_in_float32(detector: nn.Module) -> nn.Module:
    """The heads' output layers compute in fp32 (mixed precision elsewhere), so box coding, the losses and
    the decoded boxes see fp32 values; the state_dict is unchanged (the layers change class only)."""
    for name, module in detector.named_modules():
        if type(module) is AnchorGenerator:  # RetinaNet's, Faster R-CNN's RPN's
            module.__class__ = Float32AnchorGenerator
        elif name.rsplit(".", 1)[-1] in _OUTPUT_LAYERS:
            if type(module) is nn.Conv2d:
                module.__class__ = Float32Conv2d
            elif type(module) is nn.Linear:
                module.__class__ = Float32Linear
    return detector


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
