"""Detectors from torchvision (RetinaNet, FCOS, Faster R-CNN) on ResNet or timm backbones with an FPN, with
their anchors and box/score outputs kept in fp32 under mixed precision."""

from __future__ import annotations

from collections import OrderedDict
from functools import partial
from typing import Literal

import torch
from torch import Tensor, nn
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d


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
