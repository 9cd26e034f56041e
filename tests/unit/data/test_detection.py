"""Box annotations: COCO and VOC XML readers (empty images kept, degenerate boxes dropped, errors naming the
file), box-aware training transforms."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torchvision import tv_tensors

from cwd_lightning.data import CocoDetection, VocXmlDetection, voc_to_coco
from cwd_lightning.data.transforms import detection_train_transforms
from tests.helpers import write_jpeg


def _coco_tree(root: Path) -> Path:
    for name in ("a.jpg", "empty.jpg", "bad.jpg"):
        write_jpeg(root / "images" / name)
    data = {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 60, "height": 40},
                   {"id": 2, "file_name": "empty.jpg", "width": 60, "height": 40},
                   {"id": 3, "file_name": "bad.jpg", "width": 60, "height": 40}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [5, 6, 10, 20], "iscrowd": 0},
                        {"id": 2, "image_id": 1, "category_id": 3, "bbox": [30, 5, 8, 8], "iscrowd": 0},
                        {"id": 3, "image_id": 1, "category_id": 3, "bbox": [0, 0, 60, 40], "iscrowd": 1},
                        {"id": 4, "image_id": 3, "category_id": 3, "bbox": [10, 10, 0, 5], "iscrowd": 0}],
        "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}],
    }  # fmt: skip
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "instances_val.json").write_text(json.dumps(data))
    return root / "annotations" / "instances_val.json"


def test_coco_reader_keeps_empty_images_and_drops_degenerate_boxes(tmp_path):
    annotations = _coco_tree(tmp_path)
    with pytest.warns(UserWarning, match=r"dropped 1 degenerate box.*bad.jpg"):
        dataset = CocoDetection(tmp_path / "images", annotations)
    assert dataset.class_names == ["cat", "dog"] and len(dataset) == 3
    image, target = dataset[0]
    assert image.shape == (3, 40, 60)
    assert target["boxes"].tolist() == [[5, 6, 15, 26], [30, 5, 38, 13]]  # xywh → xyxy, crowd skipped
    assert target["labels"].tolist() == [2, 1]  # category ids 7, 3 → labels in id order, 0 is background
    assert dataset[1][1]["boxes"].shape == (0, 4) and dataset[2][1]["labels"].numel() == 0


def test_coco_annotations_of_unknown_images_are_an_error(tmp_path):
    annotations = _coco_tree(tmp_path)
    data = json.loads(annotations.read_text())
    data["annotations"].append({"id": 9, "image_id": 42, "category_id": 3, "bbox": [1, 1, 5, 5], "iscrowd": 0})
    annotations.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"instances_val.json: annotations for image id\(s\) \[42\] that are not"):
        CocoDetection(tmp_path / "images", annotations)


def test_coco_reader_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"instances_x\.json not found"):
        CocoDetection(tmp_path, tmp_path / "instances_x.json")
    (tmp_path / "bad.json").write_text('{"images": []}')
    with pytest.raises(ValueError, match=r"bad.json has no 'annotations'"):
        CocoDetection(tmp_path, tmp_path / "bad.json")


def _voc_xml(path: Path, objects: list[tuple[str, list[int]]]) -> None:
    body = "".join(
        f"<object><name>{name}</name><difficult>0</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
        f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for name, b in objects
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"<annotation><size><width>60</width><height>40</height></size>{body}</annotation>")


def test_voc_xml_reader_converts_to_zero_based_and_drops_degenerate(tmp_path):
    for name in ("a", "b", "c"):
        write_jpeg(tmp_path / "JPEGImages" / f"{name}.jpg")
    # VOC pixel indices are inclusive: xmax = xmin - 1 is a box of zero width
    _voc_xml(tmp_path / "Annotations" / "a.xml", [("dog", [1, 1, 10, 20]), ("cat", [5, 5, 4, 9])])
    _voc_xml(tmp_path / "Annotations" / "b.xml", [])
    _voc_xml(tmp_path / "Annotations" / "c.xml", [("cat", [20, 10, 30, 30])])
    (tmp_path / "ImageSets" / "Main").mkdir(parents=True)
    (tmp_path / "ImageSets" / "Main" / "val.txt").write_text("a\nb\nc\n")
    with pytest.warns(UserWarning, match="dropped 1 degenerate"):
        dataset = VocXmlDetection(tmp_path, "val", ["cat", "dog"])
    assert dataset[0][1]["boxes"].tolist() == [[0, 0, 10, 20]] and dataset[0][1]["labels"].tolist() == [2]
    assert dataset[1][1]["boxes"].shape == (0, 4)
    coco = json.loads(voc_to_coco(tmp_path, "val", ["cat", "dog"]).read_text())
    assert [a["bbox"] for a in coco["annotations"]] == [[0, 0, 10, 20], [19, 9, 11, 21]]
    _voc_xml(tmp_path / "Annotations" / "b.xml", [("horse", [1, 1, 5, 5])])
    with pytest.raises(ValueError, match=r"b.xml: object class 'horse' is not one of"):
        VocXmlDetection(tmp_path, "val", ["cat", "dog"])


def test_train_transforms_clip_boxes_and_drop_empty_ones():
    torch.manual_seed(0)
    image = tv_tensors.Image(torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8))
    boxes = tv_tensors.BoundingBoxes(
        [[0, 0, 20, 20], [50, 50, 64, 64], [30, 2, 34, 60]], format="XYXY", canvas_size=(64, 64)
    )
    transform = detection_train_transforms(32, scale_range=(1.0, 1.0))
    for _ in range(20):
        out_image, out = transform(image, {"boxes": boxes, "labels": torch.tensor([1, 2, 3])})
        assert out_image.shape == (3, 32, 32) and out_image.dtype == torch.float32
        b = out["boxes"]
        assert len(b) == len(out["labels"])
        assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
        assert (b >= 0).all() and (b <= 32).all()
