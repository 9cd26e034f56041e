"""Decoding image and mask files, with errors that name the file at fault."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

#: the mask value of pixels that no loss or metric counts (VOC boundaries, Cityscapes void, crop padding)
IGNORE_INDEX = 255


def read_image(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return np.array(image.convert("RGB"))
    except (OSError, UnidentifiedImageError) as error:
        raise ValueError(f"cannot read image {path}: {error}") from error


def read_mask(path: Path) -> np.ndarray:
    """Class indices of a palette ('P') or grayscale ('L') PNG, never its colours."""
    try:
        with Image.open(path) as image:
            if image.mode not in ("P", "L"):
                raise ValueError(f"mask {path} has mode {image.mode}; expected a palette or grayscale PNG")
            return np.array(image)
    except (OSError, UnidentifiedImageError) as error:
        raise ValueError(f"cannot read mask {path}: {error}") from error
