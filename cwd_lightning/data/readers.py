"""Image / mask pairs from the standard on-disk layouts, with errors that name the file at fault."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision import tv_tensors

IGNORE_INDEX = 255

VOC_HINT = (
    "Get Pascal VOC 2012 from the official site (VOCtrainval_11-May-2012.tar) and point data.root at "
    "its VOCdevkit/VOC2012 folder, or set data.download: true; for the SBD 'trainaug' list put "
    "SegmentationClassAug/ and ImageSets/Segmentation/trainaug.txt inside it."
)
CITYSCAPES_HINT = (
    "Cityscapes needs a (free) account: download leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip "
    "from the Cityscapes website, unzip both into one folder and point data.root at it."
)

# Cityscapes labelIds 0..33 → the 19 trainIds used for evaluation; everything else is ignored.
_CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
                         25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}  # fmt: skip
CITYSCAPES_CLASSES = [
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
]  # fmt: skip


def cityscapes_label_lut() -> np.ndarray:
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for label_id, train_id in _CITYSCAPES_TRAIN_IDS.items():
        lut[label_id] = train_id
    return lut


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


class SegmentationFiles(Dataset):
    """(image, mask) pairs from a list of file paths; masks are checked when loaded."""

    def __init__(
        self,
        pairs: list[tuple[Path, Path]],
        num_classes: int,
        transforms: Callable[..., Any] | None = None,
        label_lut: np.ndarray | None = None,
    ) -> None:
        self.pairs = pairs
        self.num_classes = num_classes
        self.transforms = transforms
        self.label_lut = label_lut

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image_path, mask_path = self.pairs[index]
        image, mask = read_image(image_path), read_mask(mask_path)
        if self.label_lut is not None:
            if mask.max(initial=0) > 33:
                raise ValueError(f"mask {mask_path} has labelId {mask.max()} > 33: is it a *_labelIds.png file?")
            mask = self.label_lut[mask]
        if image.shape[:2] != mask.shape:
            raise ValueError(
                f"image {image_path} is {image.shape[1]}×{image.shape[0]} but its mask {mask_path} is "
                f"{mask.shape[1]}×{mask.shape[0]}"
            )
        bad = (mask >= self.num_classes) & (mask != IGNORE_INDEX)
        if bad.any():
            raise ValueError(
                f"mask {mask_path} has class ids {sorted(np.unique(mask[bad]).tolist())} ≥ num_classes="
                f"{self.num_classes} (only {IGNORE_INDEX} may exceed it)"
            )
        return image, mask

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.load(index)
        sample = (
            tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1).contiguous()),
            tv_tensors.Mask(torch.from_numpy(mask)),
        )
        if self.transforms is not None:
            sample = self.transforms(*sample)
        return sample[0].as_subclass(torch.Tensor), sample[1].as_subclass(torch.Tensor).long()


def voc_pairs(root: Path, split: str, mask_dir: str | None = None) -> list[tuple[Path, Path]]:
    """Pascal VOC 2012 layout: ImageSets/Segmentation/<split>.txt, JPEGImages/*.jpg, masks in
    SegmentationClass/ (SegmentationClassAug/ for the SBD 'trainaug' split)."""
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root {root} does not exist. {VOC_HINT}")
    list_file = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not list_file.is_file():
        raise FileNotFoundError(f"split file {list_file} not found. {VOC_HINT}")
    mask_dir = mask_dir or ("SegmentationClassAug" if split == "trainaug" else "SegmentationClass")
    names = [line.split()[0] for line in list_file.read_text().splitlines() if line.strip()]
    if not names:  # else: no validation at all (and no best.ckpt), or PyTorch's num_samples=0
        raise ValueError(f"split file {list_file} lists no images")
    pairs = [(root / "JPEGImages" / f"{n}.jpg", root / mask_dir / f"{n}.png") for n in names]
    _check_exist(pairs, list_file)
    return pairs


def cityscapes_pairs(root: Path, split: str) -> list[tuple[Path, Path]]:
    """Cityscapes layout: leftImg8bit/<split>/<city>/*_leftImg8bit.png with
    gtFine/<split>/<city>/*_gtFine_labelIds.png."""
    image_root = root / "leftImg8bit" / split
    if not image_root.is_dir():
        raise FileNotFoundError(f"Cityscapes folder {image_root} does not exist. {CITYSCAPES_HINT}")
    pairs = []
    for image_path in sorted(image_root.glob("*/*_leftImg8bit.png")):
        stem = image_path.name[: -len("_leftImg8bit.png")]
        pairs.append((image_path, root / "gtFine" / split / image_path.parent.name / f"{stem}_gtFine_labelIds.png"))
    if not pairs:
        raise FileNotFoundError(f"no *_leftImg8bit.png images under {image_root}. {CITYSCAPES_HINT}")
    _check_exist(pairs, image_root)
    return pairs


def _check_exist(pairs: list[tuple[Path, Path]], source: Path) -> None:
    missing = [str(p) for pair in pairs for p in pair if not p.is_file()]
    if missing:
        more = f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""
        raise FileNotFoundError(
            f"{len(missing)} file(s) listed by {source} are missing: {', '.join(missing[:3])}{more}"
        )
