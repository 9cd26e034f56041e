"""The dilated segmentors of the CWD paper and of mmseg's ``*-d8`` configs: PSPNet-D8 and DeepLabV3-D8 on
a ResNet-V1c (deep stem) whose stages 3 and 4 are dilated (strides 1, 2, 1, 1; dilations 1, 1, 2, 4), so
the logits have output stride 8, with an auxiliary FCN head on stage 3 for training."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from torch import Tensor, nn

from cwd_lightning.models.heads import AtrousPyramidHead, FCNHead, PyramidPoolingHead
from cwd_lightning.models.weights import load_weights

#: timm names of the V1c ResNets (deep stem 32-32-64, as mmseg's), and extra arguments; the V1d ones (deep
#: stem and average-pool shortcuts) are offered because timm has ImageNet weights for their ResNet-18/34
_ENCODERS = {
    "resnet18": ("resnet18", {"stem_type": "deep", "stem_width": 32}),
    "resnet34": ("resnet34", {"stem_type": "deep", "stem_width": 32}),
    "resnet50": ("resnet50c", {}),
    "resnet101": ("resnet101c", {}),
    "resnet152": ("resnet152c", {}),
    "resnet18d": ("resnet18d", {}),
    "resnet34d": ("resnet34d", {}),
    "resnet50d": ("resnet50d", {}),
    "resnet101d": ("resnet101d", {}),
}


class DilatedSegmentor(nn.Module):
    """``encoder`` (stages 3 and 4 at stride 8) → ``decode_head`` (PSP or ASPP) → logits at stride 8.

    Returns ``{"out": logits}``, plus ``{"aux": auxiliary logits}`` in training when it has an
    auxiliary head (both at stride 8: the task upsamples them to the labels' size for the loss)."""

    def __init__(self, encoder: nn.Module, decode_head: nn.Module, auxiliary_head: nn.Module | None) -> None:
        super().__init__()
        self.encoder = encoder
        self.decode_head = decode_head
        self.auxiliary_head = auxiliary_head

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        stage3, stage4 = self.encoder(images)
        outputs = {"out": self.decode_head(stage4)}
        if self.auxiliary_head is not None and self.training:
            outputs["aux"] = self.auxiliary_head(stage3)
        return outputs


def build_dilated_segmentor(
    head: Literal["psp", "aspp"] = "psp",
    encoder_name: str = "resnet101",
    num_classes: int = 19,
    encoder_weights: str | None = "imagenet",
    auxiliary: bool = True,
    channels: int | None = None,
    auxiliary_channels: int | None = None,
    checkpoint: str | None = None,
) -> DilatedSegmentor:
    """mmseg's channel widths by default: head 512 and auxiliary 256 for ResNet-50/101/152, 128 and 64 for
    ResNet-18/34. ``encoder_weights="imagenet"`` loads timm's ImageNet weights where timm has them (the
    50/101/152 V1c); a deep-stem ResNet-18/34 has none in timm, which is an error naming the choice.
    ``checkpoint`` loads the whole network's weights after it is built: a state_dict, a run's ``.ckpt`` or an
    mmsegmentation model-zoo file of the same network (e.g. to start a student from mmseg's ``pspnet_r18-d8``)."""
    import timm

    if encoder_name not in _ENCODERS:
        raise ValueError(f"dilated segmentor: encoder {encoder_name!r} is not one of {sorted(_ENCODERS)}")
    if head not in ("psp", "aspp"):
        raise ValueError(f"dilated segmentor: head {head!r} is not 'psp' or 'aspp'")
    timm_name, extra = _ENCODERS[encoder_name]
    if encoder_weights not in (None, "imagenet"):
        raise ValueError(f"dilated segmentor: encoder_weights must be 'imagenet' or null, got {encoder_weights!r}")
    pretrained = encoder_weights == "imagenet"
    if pretrained and extra:
        raise ValueError(
            f"dilated segmentor: timm has no ImageNet weights for the V1c {encoder_name} (mmseg's "
            f"{encoder_name}_v1c); use {encoder_name}d (V1d, with weights), set encoder_weights: null, or load "
            "such weights into the student yourself"
        )
    try:
        encoder = timm.create_model(timm_name, pretrained=pretrained, features_only=True, output_stride=8,
                                    out_indices=(3, 4), **extra)  # fmt: skip
    except Exception as error:
        if not pretrained:
            raise
        raise RuntimeError(
            f"could not load ImageNet weights for {timm_name!r} ({type(error).__name__}: {error}). timm downloads "
            "them from the Hugging Face hub on first use: connect once (or copy them into the HF cache), or set "
            "encoder_weights: null."
        ) from error
    _undilate_basic_block_conv2(encoder)
    stage3_channels, stage4_channels = encoder.feature_info.channels()
    wide = stage4_channels >= 2048
    channels = channels or (512 if wide else 128)
    auxiliary_channels = auxiliary_channels or (256 if wide else 64)
    head_class = PyramidPoolingHead if head == "psp" else AtrousPyramidHead
    decode_head = head_class(stage4_channels, channels, num_classes)
    auxiliary_head = FCNHead(stage3_channels, auxiliary_channels, num_classes) if auxiliary else None
    segmentor = DilatedSegmentor(encoder, decode_head, auxiliary_head)
    if checkpoint is not None:  # as a student's start or as a teacher's weights (it then needs no teacher_checkpoint)
        load_weights(segmentor, checkpoint, side="build_dilated_segmentor")
        segmentor.pretrained_source = f"checkpoint {Path(checkpoint).name}"
    return segmentor


def _undilate_basic_block_conv2(encoder: nn.Module) -> None:
    """mmseg's dilated BasicBlock (ResNet-18/34) dilates only its first 3×3 conv (``conv2``: padding 1,
    dilation 1); timm dilates both. Same parameters, different receptive field: match mmseg's, the network
    the paper's and mmseg's R18 students are. Bottlenecks have one 3×3 conv and already agree."""
    from timm.models.resnet import BasicBlock

    for block in encoder.modules():
        if isinstance(block, BasicBlock) and block.conv2.dilation != (1, 1):
            block.conv2.dilation, block.conv2.padding = (1, 1), (1, 1)
