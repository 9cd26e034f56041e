"""Augmentations with torchvision transforms.v2: joint image/mask (masks nearest, padded with 255) and
image/box (boxes clipped, empty ones dropped)."""

from __future__ import annotations

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from cwd_lightning.data.images import IGNORE_INDEX

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def train_transforms(
    crop_size: int | tuple[int, int],
    base_size: int,
    scale_range: tuple[float, float] = (0.5, 2.0),
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> v2.Compose:
    """Random scale (shorter side ∈ base_size·scale_range), crop padded with 255 in the mask, flip."""
    low, high = (round(base_size * s) for s in scale_range)
    return v2.Compose(
        [
            v2.RandomResize(low, high + 1, antialias=True),
            v2.RandomCrop(crop_size, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}),
            v2.RandomHorizontalFlip(),
            v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
            v2.Normalize(mean, std),
        ]
    )


class PadToMultiple(v2.Transform):
    """Pad bottom/right so H and W are multiples of ``multiple`` (encoders with stride 32 need it);
    padded mask pixels are 255, so they never count."""

    def __init__(self, multiple: int = 32) -> None:
        super().__init__()
        self.multiple = multiple

    def make_params(self, flat_inputs: list) -> dict:
        height, width = v2.query_size(flat_inputs)
        return {"padding": [0, 0, -width % self.multiple, -height % self.multiple]}

    def transform(self, inpt, params: dict):
        if not any(params["padding"]):
            return inpt
        fill = IGNORE_INDEX if isinstance(inpt, tv_tensors.Mask) else 0
        return v2.functional.pad(inpt, params["padding"], fill=fill)


def eval_transforms(
    resize: int | None = None,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> v2.Compose:
    """Whole images (optionally shorter side resized), padded to a multiple of 32, normalised."""
    steps = [v2.Resize(resize, antialias=True)] if resize else []
    return v2.Compose(
        [
            *steps,
            PadToMultiple(32),
            v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
            v2.Normalize(mean, std),
        ]
    )


def detection_train_transforms(
    size: int, scale_range: tuple[float, float] = (0.75, 1.25), crop: bool = True
) -> v2.Compose:
    """Random scale (shorter side), flip and, with ``crop``, a size×size crop (boxes clipped, empty ones
    dropped); float in [0, 1] (torchvision detectors normalise inside their own transform)."""
    low, high = (round(size * s) for s in scale_range)
    crop_steps = [v2.RandomCrop(size, pad_if_needed=True, fill=0)] if crop else []
    return v2.Compose(
        [
            v2.RandomResize(low, high + 1, antialias=True),
            v2.RandomHorizontalFlip(),
            *crop_steps,
            v2.ClampBoundingBoxes(),
            v2.SanitizeBoundingBoxes(min_size=1.0),
            v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
        ]
    )


def detection_eval_transforms() -> v2.Compose:
    return v2.Compose([v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True)])
