"""Detection DataModule over COCO-format or Pascal VOC XML annotations (and the embedded ``shapes``)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Literal

import lightning as L
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader

from cwd_lightning.data.datamodule import check_enough_for_a_batch
from cwd_lightning.data.detection import (
    CocoDetection,
    VocXmlDetection,
    collate_detection,
    detection_eval_transforms,
    detection_train_transforms,
    voc_to_coco,
)
from cwd_lightning.data.preflight import check_samples
from cwd_lightning.data.resumable import resumable_train_loader
from cwd_lightning.data.shapes import SHAPES_CLASSES, ShapesSpec, generate_shapes

COCO_HINT = (
    "Get COCO 2017 (train2017/, val2017/, annotations/instances_{train,val}2017.json) from the COCO "
    "website and point data.root at the folder that holds them."
)


class DetectionDataModule(L.LightningDataModule):
    """``layout: coco`` reads ``<root>/annotations/instances_<split>.json`` with images in
    ``<root>/<image_dir or split>``; ``layout: voc`` reads ``Annotations/*.xml``. With ``shapes`` set
    the embedded dataset is generated on first use and its COCO json exported from the XML."""

    def __init__(
        self,
        root: str,
        class_names: list[str],
        layout: Literal["coco", "voc"] = "coco",
        train_split: str = "train2017",
        val_split: str = "val2017",
        image_dir: str | None = None,
        image_size: int = 512,
        scale_range: tuple[float, float] = (0.75, 1.25),
        crop: bool = True,
        batch_size: int = 8,
        val_batch_size: int = 8,
        num_workers: int = 4,
        shapes: ShapesSpec | None = None,
        on_bad_sample: Literal["error", "skip"] = "error",
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["shapes"])  # plain types only: checkpoints load with weights_only
        self.hparams["shapes"] = asdict(shapes) if shapes is not None else None
        self.root, self.class_names, self.layout = Path(root), list(class_names), layout
        self.train_split, self.val_split, self.image_dir = train_split, val_split, image_dir
        self.batch_size, self.val_batch_size, self.num_workers = batch_size, val_batch_size, num_workers
        self.shapes = shapes
        self.on_bad_sample = on_bad_sample
        self.skipped_samples: dict[str, int] = {}  # split → samples left out (on_bad_sample: skip), logged
        self.train_tf = detection_train_transforms(image_size, scale_range, crop)
        self.eval_tf = detection_eval_transforms()

    def prepare_data(self) -> None:
        if self.shapes is None:
            return
        generate_shapes(self.root, self.shapes)
        if self.layout == "coco":
            for split in (self.train_split, self.val_split):
                if not (self.root / "annotations" / f"instances_{split}.json").is_file():
                    voc_to_coco(self.root, split, SHAPES_CLASSES[1:])

    def _dataset(self, split: str, transforms, evaluation: bool = False):
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"dataset root {self.root} does not exist. {COCO_HINT if self.layout == 'coco' else ''}"
            )
        if self.layout == "voc":
            return VocXmlDetection(self.root, split, self.class_names, transforms)
        annotations = self.root / "annotations" / f"instances_{split}.json"
        dataset = CocoDetection(self.root / (self.image_dir or split), annotations, transforms, evaluation=evaluation)
        if dataset.class_names != self.class_names:
            raise ValueError(f"data.class_names {self.class_names} differ from the categories of "
                             f"{dataset.annotation_file}: {dataset.class_names}")  # fmt: skip
        return dataset

    def setup(self, stage: str | None = None) -> None:
        # the CLI sets up the data before the run starts (to check it) and Lightning again: build once
        if stage in (None, "fit") and not hasattr(self, "train_set"):
            self.train_set = self._dataset(self.train_split, self.train_tf)
            self._keep_readable(self.train_set, self.train_split)
            check_enough_for_a_batch(len(self.train_set), self.batch_size, self.train_split)
        if hasattr(self, "val_set"):
            return
        self.val_set = self._dataset(self.val_split, self.eval_tf, evaluation=True)
        self._keep_readable(self.val_set, self.val_split)

    def _keep_readable(self, dataset, split: str) -> None:
        bad = set(check_samples([[s.path] for s in dataset.samples], dataset.load, f"{self.root} split {split!r}",
                            skip=self.on_bad_sample == "skip"))  # fmt: skip
        self.skipped_samples[split] = len(bad)
        dataset.samples = [sample for index, sample in enumerate(dataset.samples) if index not in bad]

    def train_dataloader(self) -> StatefulDataLoader:
        return resumable_train_loader(self.train_set, self.batch_size, self.num_workers, collate_detection)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.val_batch_size, num_workers=self.num_workers,
                          collate_fn=collate_detection)  # fmt: skip
