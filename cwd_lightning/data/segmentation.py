"""Segmentation data: image/mask pairs in the Pascal VOC 2012 layout (VOC, VOC + SBD trainaug, the embedded
``shapes``) or the Cityscapes layout, and the DataModule over them."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchdata.stateful_dataloader import StatefulDataLoader
from torchvision import tv_tensors

from cwd_lightning.data.base import CheckedDataModule
from cwd_lightning.data.images import IGNORE_INDEX, read_image, read_mask
from cwd_lightning.data.sampling import all_views_loader, resumable_train_loader
from cwd_lightning.data.shapes import ShapesSpec, generate_shapes
from cwd_lightning.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transforms, train_transforms

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

    def sample_files(self) -> list[list[Path]]:
        return [list(pair) for pair in self.pairs]

    def drop(self, indices: set[int]) -> None:
        self.pairs = [pair for index, pair in enumerate(self.pairs) if index not in indices]

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


class SegmentationDataModule(CheckedDataModule):
    """Reads ``root`` in the ``voc`` layout (VOC 2012, VOC + SBD trainaug, the embedded ``shapes``) or
    the ``cityscapes`` layout. With ``shapes`` set, the embedded dataset is generated into ``root`` on
    first use."""

    def __init__(
        self,
        root: str,
        num_classes: int,
        layout: Literal["voc", "cityscapes"] = "voc",
        train_split: str = "train",
        val_split: str = "val",
        crop_size: int = 512,
        base_size: int = 512,
        scale_range: tuple[float, float] = (0.5, 2.0),
        val_resize: int | None = None,
        batch_size: int = 8,
        val_batch_size: int = 1,
        num_workers: int = 4,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        shapes: ShapesSpec | None = None,
        download: bool = False,
        on_bad_sample: Literal["error", "skip"] = "error",
    ) -> None:
        super().__init__(on_bad_sample)
        # checkpoints must load with weights_only=True: keep hyperparameters to plain types
        self.save_hyperparameters(ignore=["shapes"])
        self.hparams["shapes"] = asdict(shapes) if shapes is not None else None
        self.root = Path(root)
        self.num_classes = num_classes
        self.layout = layout
        self.train_split, self.val_split = train_split, val_split
        self.batch_size, self.val_batch_size, self.num_workers = batch_size, val_batch_size, num_workers
        self.shapes, self.download = shapes, download
        self.teacher_views, self.views_seed = 0, 0  # set by a teacher cache (model.teacher_cache)
        self.teacher_tensors: Callable[[int, int], Any] | None = None  # its reader, once the cache is filled
        self.train_tf = train_transforms(crop_size, base_size, scale_range, mean, std)
        self.eval_tf = eval_transforms(val_resize, mean, std)

    def prepare_data(self) -> None:
        if self.shapes is not None:
            generate_shapes(self.root, self.shapes)
        elif self.download and self.layout == "voc" and not self.root.is_dir():
            _download_voc(self.root)

    def dataset(self, split: str, training: bool) -> SegmentationFiles:
        transforms = self.train_tf if training else self.eval_tf
        if self.layout == "cityscapes":
            return SegmentationFiles(cityscapes_pairs(self.root, split), self.num_classes, transforms,
                                     label_lut=cityscapes_label_lut())  # fmt: skip
        return SegmentationFiles(voc_pairs(self.root, split), self.num_classes, transforms)

    def train_dataloader(self) -> StatefulDataLoader:
        return resumable_train_loader(self.train_set, self.batch_size, self.num_workers, views=self.teacher_views,
                                      views_seed=self.views_seed, teacher_tensors=self.teacher_tensors,
                                      pin_memory=self.pins_memory())  # fmt: skip

    # ---------------------------------------------------------------- what a teacher cache needs
    def use_teacher_views(self, views: int, seed: int = 0) -> None:
        """Train on ``views`` fixed augmented views per image, augmented from the cache's ``seed``, each batch
        with its cache entry."""
        self.teacher_views, self.views_seed = views, seed

    def serve_teacher_tensors(self, read: Callable[[int, int], Any]) -> None:
        """``read(index, view)``: the cached teacher tensors of a view, returned with each training image."""
        self.teacher_tensors = read

    def views_loader(self, batch_size: int) -> StatefulDataLoader:
        return all_views_loader(self.train_set, self.teacher_views, self.views_seed, batch_size, self.num_workers)

    def cache_identity(self) -> dict[str, Any]:
        """Everything that decides the augmented training images: a cache made under other settings is
        never served (the list of files with their sizes and modification times, and every transform)."""
        files = [
            [str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for pair in self.train_set.pairs for p in pair
        ]
        return {
            "files": hashlib.sha256(json.dumps(files).encode()).hexdigest(),
            "images": len(self.train_set),
            "train_transforms": repr(self.train_tf),
            "num_classes": self.num_classes,
            "layout": self.layout,
        }

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self.val_set, batch_size=self.val_batch_size, num_workers=self.num_workers, pin_memory=self.pins_memory()
        )


def _download_voc(root: Path) -> None:
    """VOC 2012 trainval through torchvision's downloader (into root/../.. as VOCdevkit/VOC2012)."""
    from torchvision.datasets import VOCSegmentation

    if root.parts[-2:] != ("VOCdevkit", "VOC2012"):
        raise ValueError(f"data.download needs data.root to end in VOCdevkit/VOC2012, got {root}")
    try:
        VOCSegmentation(str(root.parent.parent), year="2012", image_set="train", download=True)
    except Exception as error:
        raise RuntimeError(f"downloading Pascal VOC 2012 into {root} failed ({error}). {VOC_HINT}") from error
