"""Checkpoints of other frameworks, loaded into the networks here without those frameworks.

mmsegmentation's ``*-d8`` segmentors (``EncoderDecoder`` with a ``ResNetV1c`` backbone, a ``PSPHead`` or
``ASPPHead`` and an ``FCNHead`` auxiliary head) are layer for layer the dilated segmentors of
``models/dilated.py``: only the key names differ. ``mmseg_to_dilated`` renames every key of such a model-zoo
file (``{"meta", "state_dict"}`` with ``backbone.``, ``decode_head.`` and ``auxiliary_head.`` keys, from mmseg
0.x or 1.x) or reports the ones it cannot map.

mmdetection's RetinaNet (``ResNet``/``ResNeXt`` + ``FPN`` with ``add_extra_convs='on_input'`` + ``RetinaHead``) is
torchvision's RetinaNet built in mmdet's layout (``build_detector`` with P6 from C5, no ReLU before P7 and mmdet's
anchors): ``mmdet_retinanet_to_torchvision`` renames its keys and gives its sigmoid classifier, K channels per
anchor, the background channel that the detectors here have in front of the K classes (labels 1 … K).
"""

from __future__ import annotations

import math
import re

import torch
from torch import Tensor

#: (mmseg key pattern, our key) for the dilated segmentors, tried in order; \\1 … are the pattern's groups
MMSEG_DILATED = [
    (r"backbone\.stem\.([0134]|6)\.(.+)", r"encoder.conv1.\1.\2"),  # the deep stem: conv, BN, conv, BN, conv
    (r"backbone\.stem\.7\.(.+)", r"encoder.bn1.\1"),  # its last BN is timm's bn1
    (r"backbone\.(layer\d+\.\d+\.(?:conv\d|bn\d|downsample\.[01])\..+)", r"encoder.\1"),
    (r"decode_head\.psp_modules\.(\d+)\.1\.conv\.(.+)", r"decode_head.pools.\1.1.0.\2"),
    (r"decode_head\.psp_modules\.(\d+)\.1\.bn\.(.+)", r"decode_head.pools.\1.1.1.\2"),
    (r"decode_head\.image_pool\.1\.conv\.(.+)", r"decode_head.image_pool.1.0.\1"),
    (r"decode_head\.image_pool\.1\.bn\.(.+)", r"decode_head.image_pool.1.1.\1"),
    (r"decode_head\.aspp_modules\.(\d+)\.conv\.(.+)", r"decode_head.branches.\1.0.\2"),
    (r"decode_head\.aspp_modules\.(\d+)\.bn\.(.+)", r"decode_head.branches.\1.1.\2"),
    (r"decode_head\.bottleneck\.conv\.(.+)", r"decode_head.bottleneck.0.\1"),
    (r"decode_head\.bottleneck\.bn\.(.+)", r"decode_head.bottleneck.1.\1"),
    (r"decode_head\.conv_seg\.(.+)", r"decode_head.classifier.\1"),
    (r"auxiliary_head\.convs\.0\.conv\.(.+)", r"auxiliary_head.conv.0.\1"),
    (r"auxiliary_head\.convs\.0\.bn\.(.+)", r"auxiliary_head.conv.1.\1"),
    (r"auxiliary_head\.conv_seg\.(.+)", r"auxiliary_head.classifier.\1"),
]


def is_mmseg_state(state: dict[str, Tensor]) -> bool:
    """An mmsegmentation segmentor's state_dict: a backbone and a decode head, at the top level."""
    return any(k.startswith("backbone.") for k in state) and any(k.startswith("decode_head.") for k in state)


def rename(state: dict[str, Tensor], rules: list[tuple[str, str]]) -> tuple[dict[str, Tensor], list[str]]:
    """``state`` with every key renamed by the first rule whose pattern matches all of it, and the keys no rule
    matched."""
    compiled = [(re.compile(pattern), replacement) for pattern, replacement in rules]
    renamed, unmapped = {}, []
    for key, tensor in state.items():
        for pattern, replacement in compiled:
            if pattern.fullmatch(key):
                renamed[pattern.sub(replacement, key)] = tensor
                break
        else:
            unmapped.append(key)
    return renamed, unmapped


def renamed_fully(state: dict[str, Tensor], rules: list[tuple[str, str]], what: str, target: str) -> dict[str, Tensor]:
    """``rename`` when every key maps; else an error naming the unmapped keys (the first 8 and how many more)."""
    renamed, unmapped = rename(state, rules)
    if unmapped:
        more = f" … (+{len(unmapped) - 8} more)" if len(unmapped) > 8 else ""
        raise ValueError(f"{what} with {len(unmapped)} key(s) that match no layer of {target}: "
                         f"{', '.join(unmapped[:8])}{more}")  # fmt: skip
    return renamed


def mmseg_to_dilated(state: dict[str, Tensor], source: str) -> dict[str, Tensor]:
    """The state_dict of an mmseg PSPNet-D8 / DeepLabV3-D8 (ResNet-V1c) in ``build_dilated_segmentor``'s key
    names; a key that no rule maps is an error that lists them all (``source`` names the file)."""
    return renamed_fully(state, MMSEG_DILATED, f"{source}: an mmsegmentation checkpoint", "the dilated segmentors "
                         "here (PSPNet-D8 / DeepLabV3-D8 on ResNet-V1c with an FCN auxiliary head)")  # fmt: skip


#: (mmdet key pattern, our key) for a RetinaNet with an FPN from C3 (``start_level=1``) and P6/P7 convs
MMDET_RETINANET = [
    (r"backbone\.((?:conv1|bn1)\..+)", r"backbone.body.\1"),
    (r"backbone\.(layer\d\.\d+\.(?:conv\d|bn\d|downsample\.[01])\..+)", r"backbone.body.\1"),
    (r"neck\.lateral_convs\.([012])\.conv\.(.+)", r"backbone.fpn.inner_blocks.\1.0.\2"),
    (r"neck\.fpn_convs\.([012])\.conv\.(.+)", r"backbone.fpn.layer_blocks.\1.0.\2"),
    (r"neck\.fpn_convs\.3\.conv\.(.+)", r"backbone.fpn.extra_blocks.p6.\1"),
    (r"neck\.fpn_convs\.4\.conv\.(.+)", r"backbone.fpn.extra_blocks.p7.\1"),
    (r"bbox_head\.cls_convs\.(\d)\.conv\.(.+)", r"head.classification_head.conv.\1.0.\2"),
    (r"bbox_head\.reg_convs\.(\d)\.conv\.(.+)", r"head.regression_head.conv.\1.0.\2"),
    (r"bbox_head\.retina_cls\.(.+)", r"head.classification_head.cls_logits.\1"),
    (r"bbox_head\.retina_reg\.(.+)", r"head.regression_head.bbox_reg.\1"),
]

#: the background channel's bias: torchvision's prior for a class, so its score (0.01) stays below any threshold
BACKGROUND_BIAS = -math.log((1 - 0.01) / 0.01)


def is_mmdet_retinanet(state: dict[str, Tensor]) -> bool:
    """An mmdetection RetinaNet's state_dict: a neck and a ``RetinaHead``."""
    return any(k.startswith("neck.") for k in state) and "bbox_head.retina_cls.weight" in state


def with_background_channel(weight: Tensor, bias: Tensor, anchors: int) -> tuple[Tensor, Tensor]:
    """A classifier of ``anchors`` × K channels (anchor-major) as one of ``anchors`` × (K + 1): channel 0 of each
    anchor a background that never fires (zero weights, ``BACKGROUND_BIAS``), channels 1 … K the classes."""
    classes = weight.shape[0] // anchors
    grouped_weight = weight.reshape(anchors, classes, *weight.shape[1:])
    grouped_bias = bias.reshape(anchors, classes)
    background_weight = torch.zeros_like(grouped_weight[:, :1])
    background_bias = torch.full_like(grouped_bias[:, :1], BACKGROUND_BIAS)
    return (torch.cat([background_weight, grouped_weight], 1).reshape(-1, *weight.shape[1:]),
            torch.cat([background_bias, grouped_bias], 1).reshape(-1))  # fmt: skip


def mmdet_retinanet_to_torchvision(state: dict[str, Tensor], source: str) -> dict[str, Tensor]:
    """The state_dict of an mmdet RetinaNet in ``build_detector``'s key names, its classifier with the background
    channel added; a key that no rule maps is an error that lists them all (``source`` names the file)."""
    target = "build_detector's RetinaNet (ResNet/ResNeXt, FPN from C3 with P6/P7, RetinaHead)"
    renamed = renamed_fully(state, MMDET_RETINANET, f"{source}: an mmdetection RetinaNet checkpoint", target)
    prefix, box = "head.classification_head.cls_logits.", "head.regression_head.bbox_reg.weight"
    anchors = renamed[box].shape[0] // 4
    renamed[f"{prefix}weight"], renamed[f"{prefix}bias"] = with_background_channel(
        renamed[f"{prefix}weight"], renamed[f"{prefix}bias"], anchors)  # fmt: skip
    return renamed
