"""Data: the segmentation and detection DataModules, their readers and augmentations, the embedded
``shapes`` generator, the pre-flight read of every sample and the resumable (seeded, stateful) sampling."""

from cwd_lightning.data.annotations import CocoDetection, VocXmlDetection, voc_to_coco
from cwd_lightning.data.base import CheckedDataModule
from cwd_lightning.data.detection import DetectionDataModule, collate_detection
from cwd_lightning.data.images import IGNORE_INDEX, read_image, read_mask
from cwd_lightning.data.segmentation import (
    CITYSCAPES_CLASSES,
    SegmentationDataModule,
    SegmentationFiles,
    cityscapes_pairs,
    voc_pairs,
)
from cwd_lightning.data.shapes import SHAPES_CLASSES, ShapesSpec, generate_shapes

__all__ = [
    "CITYSCAPES_CLASSES",
    "IGNORE_INDEX",
    "SHAPES_CLASSES",
    "CheckedDataModule",
    "CocoDetection",
    "DetectionDataModule",
    "SegmentationDataModule",
    "SegmentationFiles",
    "ShapesSpec",
    "VocXmlDetection",
    "cityscapes_pairs",
    "collate_detection",
    "generate_shapes",
    "read_image",
    "read_mask",
    "voc_pairs",
    "voc_to_coco",
]
