"""Segmentation DataModule over a Pascal VOC 2012-layout or Cityscapes-layout tree."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import lightning as L
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader

from cwd_lightning.data import readers
from cwd_lightning.data.preflight import check_samples
from cwd_lightning.data.resumable import all_views_loader, resumable_train_loader
from cwd_lightning.data.shapes import ShapesSpec, generate_shapes
from cwd_lightning.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transforms, train_transforms


class SegmentationDataModule(L.LightningDataModule):
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
        super().__init__()
        # checkpoints must load with weights_only=True: keep hyperparameters to plain types
        self.save_hyperparameters(ignore=["shapes"])
        self.hparams["shapes"] = asdict(shapes) if shapes is not None else None
        self.root = Path(root)
        self.num_classes = num_classes
        self.layout = layout
        self.train_split, self.val_split = train_split, val_split
        self.batch_size, self.val_batch_size, self.num_workers = batch_size, val_batch_size, num_workers
        self.shapes, self.download = shapes, download
        self.on_bad_sample = on_bad_sample
        self.skipped_samples: dict[str, int] = {}  # split → samples left out (on_bad_sample: skip), logged
        self.teacher_views = 0  # set by a teacher cache (DistillationModule.teacher_cache_views)
        self.train_tf = train_transforms(crop_size, base_size, scale_range, mean, std)
        self.eval_tf = eval_transforms(val_resize, mean, std)

    def prepare_data(self) -> None:
        if self.shapes is not None:
            generate_shapes(self.root, self.shapes)
        elif self.download and self.layout == "voc" and not self.root.is_dir():
            _download_voc(self.root)

    def _dataset(self, split: str, transforms) -> readers.SegmentationFiles:
        if self.layout == "cityscapes":
            pairs = readers.cityscapes_pairs(self.root, split)
            lut = readers.cityscapes_label_lut()
        else:
            pairs, lut = readers.voc_pairs(self.root, split), None
        return readers.SegmentationFiles(pairs, self.num_classes, transforms, label_lut=lut)

    def setup(self, stage: str | None = None) -> None:
        # the CLI sets up the data before the run starts (to check it) and Lightning again: build once
        if stage in (None, "fit") and not hasattr(self, "train_set"):
            self.train_set = self._dataset(self.train_split, self.train_tf)
            self._keep_readable(self.train_set, self.train_split)
            check_enough_for_a_batch(len(self.train_set), self.batch_size, self.train_split)
        if hasattr(self, "val_set"):
            return
        self.val_set = self._dataset(self.val_split, self.eval_tf)
        self._keep_readable(self.val_set, self.val_split)

    def _keep_readable(self, dataset: readers.SegmentationFiles, split: str) -> None:
        bad = set(check_samples(dataset.pairs, dataset.load, f"{self.root} split {split!r}",
                            skip=self.on_bad_sample == "skip"))  # fmt: skip
        self.skipped_samples[split] = len(bad)
        dataset.pairs = [pair for index, pair in enumerate(dataset.pairs) if index not in bad]

    def train_dataloader(self) -> StatefulDataLoader:
        return resumable_train_loader(self.train_set, self.batch_size, self.num_workers, views=self.teacher_views)

    # ---------------------------------------------------------------- what a teacher cache needs
    def use_teacher_views(self, views: int) -> None:
        """Train on ``views`` fixed augmented views per image, each batch with its cache keys."""
        self.teacher_views = views

    def views_loader(self, batch_size: int) -> StatefulDataLoader:
        return all_views_loader(self.train_set, self.teacher_views, batch_size, self.num_workers)

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
        return DataLoader(self.val_set, batch_size=self.val_batch_size, num_workers=self.num_workers)


def check_enough_for_a_batch(images: int, batch_size: int, split: str) -> None:
    """Training drops the last incomplete batch: fewer images than one batch would train nothing."""
    if images < batch_size:
        raise ValueError(f"split {split!r} has {images} image(s), fewer than data.init_args.batch_size = {batch_size}")


def _download_voc(root: Path) -> None:
    """VOC 2012 trainval through torchvision's downloader (into root/../.. as VOCdevkit/VOC2012)."""
    from torchvision.datasets import VOCSegmentation

    if root.parts[-2:] != ("VOCdevkit", "VOC2012"):
        raise ValueError(f"data.download needs data.root to end in VOCdevkit/VOC2012, got {root}")
    try:
        VOCSegmentation(str(root.parent.parent), year="2012", image_set="train", download=True)
    except Exception as error:
        raise RuntimeError(f"downloading Pascal VOC 2012 into {root} failed ({error}). {readers.VOC_HINT}") from error
