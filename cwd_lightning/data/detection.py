"""Detection data: the DataModule over COCO-format or Pascal VOC XML annotations (and the embedded ``shapes``),
and the collate of images with their own numbers of boxes."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Literal

import torch
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader

from cwd_lightning.data.annotations import CocoDetection, Target, VocXmlDetection, voc_to_coco
from cwd_lightning.data.base import CheckedDataModule
from cwd_lightning.data.sampling import resumable_train_loader
from cwd_lightning.data.shapes import SHAPES_CLASSES, ShapesSpec, generate_shapes
from cwd_lightning.data.transforms import detection_eval_transforms, detection_train_transforms

COCO_HINT = (
    "Get COCO 2017 (train2017/, val2017/, annotations/instances_{train,val}2017.json) from the COCO "
    "website and point data.root at the folder that holds them."
)


class DetectionDataModule(CheckedDataModule):
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
        super().__init__(on_bad_sample)
        self.save_hyperparameters(ignore=["shapes"])  # plain types only: checkpoints load with weights_only
        self.hparams["shapes"] = asdict(shapes) if shapes is not None else None
        self.root, self.class_names, self.layout = Path(root), list(class_names), layout
        self.train_split, self.val_split, self.image_dir = train_split, val_split, image_dir
        self.batch_size, self.val_batch_size, self.num_workers = batch_size, val_batch_size, num_workers
        self.shapes = shapes
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

    def dataset(self, split: str, training: bool) -> CocoDetection | VocXmlDetection:
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"dataset root {self.root} does not exist. {COCO_HINT if self.layout == 'coco' else ''}"
            )
        transforms = self.train_tf if training else self.eval_tf
        if self.layout == "voc":
            return VocXmlDetection(self.root, split, self.class_names, transforms)
        annotations = self.root / "annotations" / f"instances_{split}.json"
        dataset = CocoDetection(self.root / (self.image_dir or split), annotations, transforms, evaluation=not training)
        if dataset.class_names != self.class_names:
            raise ValueError(f"data.class_names {self.class_names} differ from the categories of "
                             f"{dataset.annotation_file}: {dataset.class_names}")  # fmt: skip
        return dataset

    def train_dataloader(self) -> StatefulDataLoader:
        return resumable_train_loader(
            self.train_set, self.batch_size, self.num_workers, collate_detection, pin_memory=self.pins_memory()
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.val_batch_size, num_workers=self.num_workers,
                          collate_fn=collate_detection, pin_memory=self.pins_memory())  # fmt: skip


def collate_detection(batch: list[tuple[torch.Tensor, Target]]) -> tuple[list[torch.Tensor], list[Target]]:
    """Images and targets as lists: every image has its own number of boxes."""
    images, targets = zip(*batch, strict=True)
    return [image.as_subclass(torch.Tensor) for image in images], [
        {**target, "boxes": target["boxes"].as_subclass(torch.Tensor)} for target in targets
    ]
