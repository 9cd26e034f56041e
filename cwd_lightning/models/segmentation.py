"""Segmentation networks from segmentation-models-pytorch (any architecture, any encoder; timm encoders as
``tu-<name>``), and what the rest of the code reads off a segmentation model's output."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from cwd_lightning.models.pruning import prune_unused_modules


def build_segmentation_model(
    arch: str = "PSPNet",
    encoder_name: str = "resnet18",
    num_classes: int = 21,
    encoder_weights: str | None = "imagenet",
    in_channels: int = 3,
    arch_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """Any segmentation-models-pytorch architecture with any encoder (timm encoders as ``tu-<name>``).

    Encoder stages that the architecture never calls (PSPNet uses 3 of 5 ResNet stages) are removed,
    so every parameter of the model receives a gradient (DDP-safe, less memory).
    """
    import segmentation_models_pytorch as smp

    kwargs = dict(arch_kwargs or {})
    try:
        model = smp.create_model(
            arch,
            encoder_name=encoder_name,
            encoder_weights=encoder_weights,
            in_channels=in_channels,
            classes=num_classes,
            **kwargs,
        )
    except KeyError as error:
        raise ValueError(
            f"segmentation model: unknown arch or encoder ({arch!r}, {encoder_name!r}): {error}"
        ) from error
    except Exception as error:
        if encoder_weights is None:
            raise
        raise RuntimeError(
            f"could not load {encoder_weights!r} weights for encoder {encoder_name!r} ({type(error).__name__}: "
            f"{error}). They are downloaded on first use: connect to the internet once (or copy them into "
            "the torch / Hugging Face cache), or set encoder_weights: null to start from random init."
        ) from error
    return prune_unused_modules(model, torch.zeros(1, in_channels, 64, 64))


def main_logits(output: Tensor | dict[str, Tensor]) -> Tensor:
    """The logits of a model that returns a tensor, or ``{"out": ..., "aux": ...}`` (torchvision, PSPNet-D8)."""
    return output["out"] if isinstance(output, dict) else output
