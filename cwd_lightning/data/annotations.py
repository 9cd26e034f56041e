"""Box annotations: COCO json and Pascal VOC XML readers (and a VOC → COCO export).

Boxes are ``tv_tensors.BoundingBoxes`` (XYXY, 0-based pixels), labels 1..K (0 is the detectors'
background). For training, crowd regions and degenerate boxes (zero width or height) are dropped, the
latter with a warning that names the file, so bad annotations never crash training. For evaluation
(``evaluation=True``) every annotation is kept with its ``iscrowd`` flag and its annotated ``area``, so
the COCO metrics equal pycocotools' ``COCOeval`` on the original file (crowd regions are ignore regions,
areas decide small/medium/large). Images without objects are kept (negatives).

Why not torchvision's ``CocoDetection`` + ``wrap_dataset_for_transforms_v2``: its targets carry the raw
category ids as labels (torchvision's detectors need 1..K), crowd regions as ordinary boxes and
degenerate boxes as they are, so the same filtering and mapping would follow it anyway; the reader
here shares one sample path with the VOC XML reader and names the file and annotation at fault.
"""

from __future__ import annotations

import json
import warnings
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors

from cwd_lightning.data.images import read_image

Target = dict[str, Any]


@dataclass
class Sample:
    """One image's annotations; ``crowd`` and ``areas`` only for evaluation."""

    path: Path
    boxes: list[list[float]]
    labels: list[int]
    image_id: int
    crowd: list[int] | None = None
    areas: list[float] | None = None


def _sample(sample: Sample) -> tuple[Any, Target]:
    image = read_image(sample.path)
    height, width = image.shape[:2]
    box_tensor = torch.tensor(sample.boxes, dtype=torch.float32).reshape(-1, 4)
    target = {
        "boxes": tv_tensors.BoundingBoxes(box_tensor, format="XYXY", canvas_size=(height, width)),
        "labels": torch.tensor(sample.labels, dtype=torch.int64),
        "image_id": sample.image_id,
    }
    if sample.crowd is not None:
        target["iscrowd"] = torch.tensor(sample.crowd, dtype=torch.int64)
        target["area"] = torch.tensor(sample.areas, dtype=torch.float32)
    return tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1).contiguous()), target


def _keep_box(box: list[float], where: str, dropped: list[str]) -> bool:
    """False for a degenerate box (zero width or height: dropped, counted, warned about); a box of negative
    width or height is an error in the annotation (swapped corners, or x/y/w/h read as x0/y0/x1/y1)."""
    x0, y0, x1, y1 = box
    if x1 < x0 or y1 < y0:
        raise ValueError(
            f"{where}: box {[round(v, 2) for v in box]} (x0, y0, x1, y1) has negative width or height "
            f"({x1 - x0:g} × {y1 - y0:g}): fix the annotation"
        )
    if x1 <= x0 or y1 <= y0:
        dropped.append(f"{where} {[round(v, 2) for v in box]}")
        return False
    return True


def _warn_dropped(dropped: list[str], source: Path) -> None:
    if dropped:
        more = f" (+{len(dropped) - 3} more)" if len(dropped) > 3 else ""
        warnings.warn(
            f"{source}: dropped {len(dropped)} degenerate box(es) with zero width or height: "
            f"{'; '.join(dropped[:3])}{more}",
            stacklevel=3,
        )


class _BoxDataset(Dataset):
    """Samples read and transformed on access."""

    samples: list[Sample]
    transforms: Callable | None

    def __len__(self) -> int:
        return len(self.samples)

    def sample_files(self) -> list[list[Path]]:
        return [[sample.path] for sample in self.samples]

    def drop(self, indices: set[int]) -> None:
        self.samples = [sample for index, sample in enumerate(self.samples) if index not in indices]

    def load(self, index: int) -> tuple[Any, Target]:
        """The decoded image and its target, before transforms."""
        return _sample(self.samples[index])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Target]:
        sample = self.load(index)
        return self.transforms(*sample) if self.transforms else sample


class CocoDetection(_BoxDataset):
    """``instances_*.json`` + an image folder. Category ids map to labels 1..K in id order (``category_id_of``
    maps them back); crowd annotations are skipped for training and kept as ignore regions for evaluation."""

    def __init__(
        self,
        image_dir: str | Path,
        annotation_file: str | Path,
        transforms: Callable | None = None,
        evaluation: bool = False,
    ) -> None:
        self.image_dir, self.annotation_file = Path(image_dir), Path(annotation_file)
        if not self.annotation_file.is_file():
            raise FileNotFoundError(f"COCO annotation file {self.annotation_file} not found")
        try:
            data = json.loads(self.annotation_file.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{self.annotation_file} is not valid JSON: {error}") from error
        for key in ("images", "annotations", "categories"):
            if key not in data:
                raise ValueError(f"{self.annotation_file} has no {key!r} list: not a COCO instances file")
        categories = sorted(data["categories"], key=lambda c: c["id"])
        self.class_names = [c["name"] for c in categories]
        self.label_of = {c["id"]: index + 1 for index, c in enumerate(categories)}
        self.category_id_of = {label: category for category, label in self.label_of.items()}
        by_image: dict[int, list[dict]] = defaultdict(list)
        for annotation in data["annotations"]:
            by_image[annotation["image_id"]].append(annotation)
        orphans = sorted(set(by_image) - {image["id"] for image in data["images"]})
        if orphans:  # their boxes would be dropped silently (and a wrong file is likely the cause)
            raise ValueError(f"{self.annotation_file}: annotations for image id(s) {orphans[:10]} that are not "
                             f"in 'images' ({sum(len(by_image[i]) for i in orphans)} annotation(s))")  # fmt: skip
        if not data["images"]:
            raise ValueError(f"{self.annotation_file} lists no images")
        self.samples = []
        dropped: list[str] = []
        for image in sorted(data["images"], key=lambda i: i["id"]):
            sample = Sample(self.image_dir / image["file_name"], [], [], image["id"],
                            [] if evaluation else None, [] if evaluation else None)  # fmt: skip
            for annotation in by_image[image["id"]]:
                if annotation["category_id"] not in self.label_of:
                    raise ValueError(f"{self.annotation_file}: annotation {annotation.get('id')} has unknown "
                                     f"category_id {annotation['category_id']}")  # fmt: skip
                x, y, w, h = annotation["bbox"]
                box = [x, y, x + w, y + h]
                where = f"{self.annotation_file}: annotation {annotation.get('id')} of {image['file_name']}"
                keep = _keep_box(box, where, [] if evaluation else dropped)  # evaluation keeps degenerate ones
                if not evaluation and (annotation.get("iscrowd", 0) or not keep):
                    continue
                sample.boxes.append(box)
                sample.labels.append(self.label_of[annotation["category_id"]])
                if evaluation:
                    sample.crowd.append(int(annotation.get("iscrowd", 0)))
                    sample.areas.append(float(annotation.get("area", w * h)))
            self.samples.append(sample)
        _warn_dropped(dropped, self.annotation_file)
        self.transforms = transforms


class VocXmlDetection(_BoxDataset):
    """Pascal VOC layout: ``ImageSets/Main/<split>.txt``, ``JPEGImages/``, ``Annotations/*.xml``.
    ``class_names`` (without background) fixes the labels; VOC's 1-based pixel boxes become 0-based."""

    def __init__(
        self,
        root: str | Path,
        split: str,
        class_names: list[str],
        transforms: Callable | None = None,
        keep_difficult: bool = False,
    ) -> None:
        self.root = Path(root)
        list_file = self.root / "ImageSets" / "Main" / f"{split}.txt"
        if not list_file.is_file():
            raise FileNotFoundError(f"split file {list_file} not found (Pascal VOC layout expected)")
        self.class_names = list(class_names)
        label_of = {name: index + 1 for index, name in enumerate(self.class_names)}
        self.samples = []
        dropped: list[str] = []
        for name in (line.split()[0] for line in list_file.read_text().splitlines() if line.strip()):
            xml_path = self.root / "Annotations" / f"{name}.xml"
            try:
                tree = ET.parse(xml_path)
            except (OSError, ET.ParseError) as error:
                raise ValueError(f"cannot read annotation {xml_path}: {error}") from error
            boxes, labels = [], []
            for obj in tree.findall("object"):
                label = obj.findtext("name", "").strip()
                if label not in label_of:
                    raise ValueError(f"{xml_path}: object class {label!r} is not one of {self.class_names}")
                if obj.findtext("difficult", "0").strip() == "1" and not keep_difficult:
                    continue
                box = obj.find("bndbox")
                x0, y0, x1, y1 = (float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
                box = [x0 - 1, y0 - 1, x1, y1]  # VOC pixel indices are inclusive and 1-based
                if _keep_box(box, f"{xml_path}: object {label!r}", dropped):
                    boxes.append(box)
                    labels.append(label_of[label])
            self.samples.append(Sample(self.root / "JPEGImages" / f"{name}.jpg", boxes, labels, len(self.samples)))
        _warn_dropped(dropped, self.root / "Annotations")
        self.transforms = transforms


def voc_to_coco(root: str | Path, split: str, class_names: list[str], out: str | Path | None = None) -> Path:
    """Write the VOC XML boxes of ``split`` as a COCO ``instances_<split>.json`` (images in JPEGImages/)."""
    dataset = VocXmlDetection(root, split, class_names, keep_difficult=True)
    images, annotations = [], []
    for image_id, sample in enumerate(dataset.samples):
        path, boxes, labels = sample.path, sample.boxes, sample.labels
        with Image.open(path) as image:  # the header is enough for the size
            width, height = image.size
        images.append({"id": image_id, "file_name": path.name, "width": width, "height": height})
        for (x0, y0, x1, y1), label in zip(boxes, labels, strict=True):
            width_, height_ = x1 - x0, y1 - y0
            annotation = {"id": len(annotations) + 1, "image_id": image_id, "category_id": label,
                          "bbox": [x0, y0, width_, height_], "area": width_ * height_, "iscrowd": 0}  # fmt: skip
            annotations.append(annotation)
    categories = [{"id": index + 1, "name": name} for index, name in enumerate(class_names)]
    out = Path(out) if out else Path(root) / "annotations" / f"instances_{split}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return out
