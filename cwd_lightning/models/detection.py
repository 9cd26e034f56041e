"""Detectors from torchvision (RetinaNet, FCOS, Faster R-CNN) on ResNet or timm backbones with an FPN, with
their anchors and box/score outputs kept in fp32 under mixed precision; a RetinaNet also in mmdetection's
layout (P6 from C5, no ReLU before P7, unrounded anchors at fixed strides), so that mmdet's checkpoints load."""

from __future__ import annotations

from collections import OrderedDict
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool, LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d

from cwd_lightning.models.weights import load_state, read_checkpoint


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
    p6_from: Literal["p5", "c5"] | None = None,
    relu_before_p7: bool | None = None,
    anchor_style: Literal["torchvision", "mmdet"] | None = None,
    checkpoint: str | None = None,
) -> nn.Module:
    """A torchvision detector; ``backbone`` is any torchvision ResNet (``resnet18`` … ``resnet152``) or a
    timm model as ``tu-<name>``. ``num_classes`` counts foreground classes (labels 1..K).

    ``min_size``/``max_size`` set the detectors' resize in evaluation (800 px by default in torchvision,
    10-20 s a step on a CPU); in training the data pipeline's sizes are kept, or its scale jitter would
    be undone. ``anchor_sizes`` (one
    base size per pyramid level, RetinaNet) must suit the object sizes at that resolution.
    ``head_norm: group`` puts GroupNorm(32) in the RetinaNet head (torchvision's v2 recipe), which
    trains from scratch much more readily than the plain head.

    RetinaNet's layout: ``p6_from`` (``p5``, torchvision's v1; ``c5``, the paper's and mmdet's), ``relu_before_p7``
    (torchvision: yes; mmdet: no) and ``anchor_style`` (``torchvision``: sizes s, ⌊s·2^⅓⌋, ⌊s·2^⅔⌋ rounded to whole
    pixels at stride image size // grid size; ``mmdet``: s·2^(k/3) unrounded at the fixed strides 8 … 128).
    ``checkpoint`` loads the whole detector's weights after it is built (a run's ``.ckpt``, a state_dict, or an
    mmdetection RetinaNet file, converted: ``models/importers.py``) and makes it a teacher that needs no
    ``teacher_checkpoint``; its backbone then has frozen BatchNorm, as with ImageNet weights. Left unset, the three
    layout options are mmdet's for an mmdet file and torchvision's otherwise.
    """
    if arch not in ("retinanet", "fcos", "fasterrcnn"):
        raise ValueError(f"unknown detector arch {arch!r}; choose retinanet, fcos or fasterrcnn")
    ignored = [name for name, value in (("anchor_sizes", anchor_sizes), ("head_norm", head_norm)) if value is not None]
    if arch != "retinanet" and ignored:
        raise ValueError(f"build_detector: {', '.join(ignored)} configure the RetinaNet head and anchors only; "
                         f"remove them for arch: {arch}")  # fmt: skip
    layout = (p6_from, relu_before_p7, anchor_style)
    if arch != "retinanet" and any(value is not None for value in layout):
        raise ValueError(f"build_detector: p6_from, relu_before_p7 and anchor_style configure RetinaNet only; "
                         f"remove them for arch: {arch}")  # fmt: skip
    state, origin = read_checkpoint(checkpoint, "build_detector checkpoint") if checkpoint else (None, None)
    p6_from, relu_before_p7, anchor_style = resolved_layout(origin, *layout)
    one_stage = arch in ("retinanet", "fcos")
    extra = LastLevelMaxPool()
    if one_stage:  # torchvision's own block for its default layout: the same modules, built in the same order
        default = p6_from == "p5" and relu_before_p7
        source_channels = _c5_channels(backbone) if p6_from == "c5" else fpn_channels
        extra = (LastLevelP6P7(fpn_channels, fpn_channels) if default
                 else ExtraLevels(source_channels, fpn_channels, p6_from, relu_before_p7))  # fmt: skip
    pretrained = backbone_weights == "imagenet" and checkpoint is None  # a checkpoint replaces ImageNet's
    trained = pretrained or checkpoint is not None
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
                # frozen BN statistics only make sense for trained weights; from scratch BN must learn
                norm_layer=FrozenBatchNorm2d if trained else nn.BatchNorm2d,
                trainable_layers=trainable_layers if trained else 5,
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
        head = None
        if head_norm == "group":
            head = RetinaNetHead(fpn_channels, 9, num_classes + 1, norm_layer=partial(nn.GroupNorm, 32))
        if anchor_style == "mmdet":
            sizes = tuple(tuple(s * 2 ** (k / 3) for k in range(3)) for s in bases)
            anchors = FixedStrideAnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
        else:
            sizes = tuple((s, int(s * 2 ** (1 / 3)), int(s * 2 ** (2 / 3))) for s in bases)
            anchors = Float32AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
        detector = RetinaNet(body, num_classes + 1, anchor_generator=anchors, head=head, **common)
    elif arch == "fcos":
        detector = FCOS(body, num_classes + 1, **common)
    else:
        detector = FasterRCNN(body, num_classes + 1, **common)
    detector = keep_box_outputs_in_float32(detector)
    if state is not None:
        load_state(detector, state, f"build_detector checkpoint {str(checkpoint)!r}")
        detector.pretrained_source = f"checkpoint {Path(checkpoint).name}"  # a teacher needs no teacher_checkpoint
    return detector


def detector_layout(checkpoint: str) -> dict[str, Any]:
    """The RetinaNet layout a checkpoint file implies (mmdet's for an mmdetection file; nothing for others, whose
    layout is the default), so that a detector rebuilt without the file (a resumed run: ``models/pretrained.py``)
    keeps it."""
    _, origin = read_checkpoint(checkpoint, "build_detector checkpoint")
    if origin != "mmdetection":
        return {}
    p6_from, relu_before_p7, anchor_style = resolved_layout(origin, None, None, None)
    return {"p6_from": p6_from, "relu_before_p7": relu_before_p7, "anchor_style": anchor_style}


build_detector.settings_from_checkpoint = detector_layout


def resolved_layout(origin: str | None, p6_from: str | None, relu_before_p7: bool | None,
                    anchor_style: str | None) -> tuple[str, bool, str]:  # fmt: skip
    """The RetinaNet layout options, the unset ones mmdet's for an mmdet checkpoint and torchvision's otherwise."""
    mmdet = origin == "mmdetection"
    return (p6_from or ("c5" if mmdet else "p5"), (not mmdet) if relu_before_p7 is None else relu_before_p7,
            anchor_style or ("mmdet" if mmdet else "torchvision"))  # fmt: skip


def _c5_channels(backbone: str) -> int:
    """C5's width: 512 for the basic-block ResNets, 2048 for the bottleneck ones (ResNeXt, wide ResNets); a timm
    encoder's from its feature info."""
    if backbone.startswith("tu-"):
        import timm

        return timm.create_model(backbone[3:], pretrained=False, features_only=True).feature_info.channels()[-1]
    return 512 if backbone in ("resnet18", "resnet34") else 2048


class ExtraLevels(ExtraFPNBlock):
    """P6 and P7 of a one-stage detector: P6 a stride-2 3×3 conv on C5 or on P5, P7 one on P6, after a ReLU or
    (mmdet's RetinaNet) without. Initialised as torchvision's ``LastLevelP6P7``, whose keys (``p6``, ``p7``) it has."""

    def __init__(self, in_channels: int, out_channels: int, source: str, relu_before_p7: bool) -> None:
        super().__init__()
        self.p6 = nn.Conv2d(in_channels, out_channels, 3, 2, 1)
        self.p7 = nn.Conv2d(out_channels, out_channels, 3, 2, 1)
        for module in (self.p6, self.p7):
            nn.init.kaiming_uniform_(module.weight, a=1)
            nn.init.constant_(module.bias, 0)
        self.source, self.relu_before_p7 = source, relu_before_p7

    def forward(self, p: list[Tensor], c: list[Tensor], names: list[str]) -> tuple[list[Tensor], list[str]]:
        p6 = self.p6(c[-1] if self.source == "c5" else p[-1])
        p7 = self.p7(torch.relu(p6) if self.relu_before_p7 else p6)
        return [*p, p6, p7], [*names, "p6", "p7"]


class Float32AnchorGenerator(AnchorGenerator):
    """torchvision's generator takes the feature maps' dtype: under bf16 autocast the anchors (and so the
    decoded boxes) were bf16, off by up to 8 px at 800×1344. Only the maps' sizes matter, so pass those."""

    def forward(self, image_list: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:
        sizes = [feature.new_empty((0, *feature.shape[-2:]), dtype=torch.float32) for feature in feature_maps]
        return super().forward(image_list, sizes)


class FixedStrideAnchorGenerator(Float32AnchorGenerator):
    """mmdetection's anchors: sizes as given (unrounded), at each level's nominal stride 8·2^i (torchvision divides
    the padded image size by the grid size: 800 px over a 13-cell P6 gives 61, not 64)."""

    def generate_anchors(self, scales: list[float], aspect_ratios: list[float], dtype: torch.dtype = torch.float32,
                         device: torch.device | None = None) -> Tensor:  # fmt: skip
        """Zero-centred anchors of every (ratio, scale), ratio-major as torchvision and mmdet order them."""
        scales = torch.as_tensor(scales, dtype=dtype, device=device)
        h_ratios = torch.sqrt(torch.as_tensor(aspect_ratios, dtype=dtype, device=device))
        ws = (1 / h_ratios[:, None] * scales[None, :]).view(-1)
        hs = (h_ratios[:, None] * scales[None, :]).view(-1)
        return torch.stack([-ws, -hs, ws, hs], dim=1) / 2  # not rounded

    def forward(self, image_list: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:
        grid_sizes = [feature.shape[-2:] for feature in feature_maps]
        device = feature_maps[0].device
        strides = [[torch.tensor(8 * 2**level, device=device)] * 2 for level in range(len(grid_sizes))]
        self.set_cell_anchors(torch.float32, device)
        levels = self.grid_anchors(grid_sizes, strides)
        return [torch.cat(levels) for _ in image_list.image_sizes]


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
