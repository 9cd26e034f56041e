"""Detection data (COCO json, VOC XML, box-aware transforms), detectors, and mAP against COCOeval."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from cwd_lightning.data.detection import (
    CocoDetection,
    VocXmlDetection,
    detection_train_transforms,
    voc_to_coco,
)
from cwd_lightning.data.detection_datamodule import DetectionDataModule
from cwd_lightning.data.shapes import SHAPES_CLASSES
from cwd_lightning.distill.module import DistillationModule
from cwd_lightning.distill.terms import DistillTerm
from cwd_lightning.losses import ChannelWiseDivergence
from cwd_lightning.tasks.detection import DetectionTask, build_detector

LEVELS = ["0", "1", "2", "p6", "p7"]  # RetinaNet/FCOS FPN outputs: P3-P5, P6, P7


def _image(path: Path, height: int = 40, width: int = 60) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((height, width, 3), 127, dtype=np.uint8)).save(path)


def _coco_tree(root: Path) -> Path:
    for name in ("a.jpg", "empty.jpg", "bad.jpg"):
        _image(root / "images" / name)
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
        _image(tmp_path / "JPEGImages" / f"{name}.jpg")
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


def test_torchmetrics_map_agrees_with_cocoeval():
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    generator = torch.Generator().manual_seed(0)
    task = DetectionTask(num_classes=3)
    gt_images, gt_annotations, detections = [], [], []
    predictions, targets = [], []
    for image_id in range(12):
        count = int(torch.randint(1, 5, (1,), generator=generator))
        xy = torch.rand(count, 2, generator=generator) * 80
        wh = torch.rand(count, 2, generator=generator) * 60 + 4
        gt = torch.cat([xy, xy + wh], 1)
        labels = torch.randint(1, 4, (count,), generator=generator)
        noisy = gt + torch.randn(gt.shape, generator=generator) * 4
        extra = torch.cat([xy[:1] + 30, xy[:1] + 50], 1)  # one false positive per image
        boxes = torch.cat([noisy, extra])
        scores = torch.rand(len(boxes), generator=generator)
        pred_labels = torch.cat([labels, labels[:1]])
        predictions.append({"boxes": boxes, "scores": scores, "labels": pred_labels})
        targets.append({"boxes": gt, "labels": labels})
        gt_images.append({"id": image_id, "width": 160, "height": 160})
        for box, label in zip(gt.tolist(), labels.tolist(), strict=True):
            gt_annotations.append({"id": len(gt_annotations) + 1, "image_id": image_id, "category_id": label,
                                   "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                                   "area": (box[2] - box[0]) * (box[3] - box[1]), "iscrowd": 0})  # fmt: skip
        for box, score, label in zip(boxes.tolist(), scores.tolist(), pred_labels.tolist(), strict=True):
            detections.append({"image_id": image_id, "category_id": label, "score": score,
                               "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]]})  # fmt: skip
    task.metric.update(predictions, targets)
    ours = task.compute_metrics()

    coco = COCO()
    coco.dataset = {"images": gt_images, "annotations": gt_annotations,
                    "categories": [{"id": i} for i in range(1, 4)]}  # fmt: skip
    coco.createIndex()
    evaluator = COCOeval(coco, coco.loadRes(detections), "bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    reference = evaluator.stats  # AP, AP50, AP75, APs, APm, APl, ...
    assert 0.05 < reference[0] < 0.95
    for index, key in enumerate(
        ["val/mAP", "val/mAP50", "val/mAP75", "val/mAP_small", "val/mAP_medium", "val/mAP_large"]
    ):
        assert ours[key].item() == pytest.approx(reference[index], abs=1e-3), key


def test_coco_metrics_equal_cocoeval_on_the_original_file(tmp_path):
    """Crowd regions, non-contiguous category ids, annotated areas unlike the boxes', images without
    objects and zero-size boxes: the reader (evaluation mode) and the task give COCOeval's numbers."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from cwd_lightning.data.detection import detection_eval_transforms

    generator = torch.Generator().manual_seed(0)
    categories = [{"id": 2, "name": "a"}, {"id": 5, "name": "b"}, {"id": 11, "name": "c"}]
    images, annotations = [], []
    for image_id in range(1, 9):
        _image(tmp_path / "images" / f"{image_id}.jpg", 200, 200)
        images.append({"id": image_id, "file_name": f"{image_id}.jpg", "width": 200, "height": 200})
        if image_id == 8:
            continue  # an image without objects
        for index in range(int(torch.randint(1, 6, (1,), generator=generator))):
            side = float([12, 50, 120][index % 3] * (0.8 + 0.4 * torch.rand(1, generator=generator)))
            x, y = (float(v) for v in torch.rand(2, generator=generator) * (200 - side))
            box = [x, y, side, side * 0.8]
            area = box[2] * box[3] * float(0.5 + 0.5 * torch.rand(1, generator=generator))  # a mask's area
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "bbox": box, "area": area,
                                "category_id": categories[int(torch.randint(0, 3, (1,), generator=generator))]["id"],
                                "iscrowd": 0})  # fmt: skip
        if image_id % 3 == 0:  # a crowd region and a zero-width box
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": 5,
                                "bbox": [100, 100, 90, 90], "area": 6000.0, "iscrowd": 1})  # fmt: skip
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": 2,
                                "bbox": [10, 10, 0, 20], "area": 0.0, "iscrowd": 0})  # fmt: skip
    annotation_file = tmp_path / "instances_val.json"
    annotation_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    dataset = CocoDetection(tmp_path / "images", annotation_file, detection_eval_transforms(), evaluation=True)

    detections, predictions, targets = [], [], []
    for index in range(len(dataset)):
        _, target = dataset[index]
        gt = target["boxes"].as_subclass(torch.Tensor)
        boxes = torch.cat([gt + torch.randn(gt.shape, generator=generator) * 3,
                           torch.tensor([[110.0, 110.0, 150.0, 150.0], [5.0, 150.0, 40.0, 190.0]])])  # fmt: skip
        labels = torch.cat([target["labels"], torch.tensor([2, 3])])
        scores = torch.rand(len(boxes), generator=generator)
        predictions.append({"boxes": boxes, "scores": scores, "labels": labels})
        targets.append({**target, "boxes": gt})
        for box, score, label in zip(boxes.tolist(), scores.tolist(), labels.tolist(), strict=True):
            detections.append({"image_id": target["image_id"], "category_id": dataset.category_id_of[label],
                               "score": score, "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]]})  # fmt: skip
    task = DetectionTask(num_classes=3)
    task.validation_step(lambda batch: predictions, ([None] * len(targets), targets))
    ours = task.compute_metrics()

    coco = COCO(str(annotation_file))
    evaluator = COCOeval(coco, coco.loadRes(detections), "bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    assert 0.05 < evaluator.stats[0] < 0.95
    for index, key in enumerate(["val/mAP", "val/mAP50", "val/mAP75", "val/mAP_small", "val/mAP_medium",
                                 "val/mAP_large"]):  # fmt: skip
        assert ours[key].item() == pytest.approx(evaluator.stats[index], abs=1e-4), key


@pytest.mark.parametrize(
    ("arch", "backbone"),
    [("retinanet", "resnet18"), ("fcos", "resnet18"), ("fasterrcnn", "resnet18"), ("retinanet", "tu-resnet10t"),
     ("fasterrcnn", "tu-resnet10t")],
)  # fmt: skip
def test_detectors_train_and_predict_at_the_configured_size(arch, backbone):
    model = build_detector(arch, backbone, num_classes=3, backbone_weights=None, min_size=64, max_size=64,
                           anchor_sizes=[8, 16, 32, 64, 128] if arch == "retinanet" else None)  # fmt: skip
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 64)]
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 30.0, 30.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]  # fmt: skip
    losses = model(images, targets)
    assert all(torch.isfinite(v) for v in losses.values()) and len(losses) >= 2
    features = DetectionTask(3).run(model, images)
    levels, stride = (["0", "1", "2", "3", "pool"], 4) if arch == "fasterrcnn" else (LEVELS, 8)
    assert list(features) == levels and features["0"].shape[-2:] == (64 // stride, 64 // stride)  # no 800-px resize
    model.eval()
    assert {"boxes", "scores", "labels"} <= set(model(images)[0])


def test_training_keeps_the_pipelines_sizes_and_evaluation_resizes_for_student_and_teacher_alike():
    """Without a crop, a detector that resized in training would undo the pipeline's scale jitter."""
    model = build_detector("fcos", "resnet18", num_classes=3, backbone_weights=None, min_size=64, max_size=64)
    task, jittered = DetectionTask(3), [torch.rand(3, 128, 96)]  # the pipeline scaled a 64×48 image by 2
    model.train()
    image_list, _ = model.transform(jittered)
    assert image_list.tensors.shape[-2:] == (128, 96)
    model.eval()  # a frozen teacher: task.run sizes its images as the student does in the task's phase
    assert task.train().run(model, jittered)["0"].shape[-2:] == (16, 12)
    assert task.eval().run(model, jittered)["0"].shape[-2:] == (8, 8)  # resized to max_size 64: 64×48, padded
    assert not model.transform.training  # the teacher's own mode is left as it was


@pytest.mark.parametrize(("arch", "setting"), [("fcos", "anchor_sizes"), ("fasterrcnn", "head_norm")])
def test_retinanet_settings_are_refused_for_other_detectors(arch, setting):
    value = [8, 16, 32, 64, 128] if setting == "anchor_sizes" else "group"
    with pytest.raises(ValueError, match=rf"{setting} configure the RetinaNet head and anchors only.*arch: {arch}"):
        build_detector(arch, "resnet18", num_classes=3, backbone_weights=None, **{setting: value})


@pytest.mark.parametrize("arch", ["retinanet", "fcos", "fasterrcnn"])
def test_anchors_and_box_outputs_stay_float32_under_bf16_autocast(arch):
    from torchvision.models.detection.image_list import ImageList

    torch.manual_seed(0)
    model = build_detector(arch, "resnet18", num_classes=3, backbone_weights=None, min_size=64, max_size=64).eval()
    generator = model.anchor_generator if arch != "fasterrcnn" else model.rpn.anchor_generator
    # at 800×1344 bf16 anchors were off by up to 8 px
    maps = [torch.zeros(1, 8, 800 // s, 1344 // s, dtype=torch.bfloat16) for s in (8, 16, 32, 64, 128)]
    maps = maps[: len(generator.sizes)]
    images = ImageList(torch.zeros(1, 3, 800, 1344, dtype=torch.bfloat16), [(800, 1344)])
    (anchors,) = generator(images, maps)
    (reference,) = generator(ImageList(images.tensors.float(), [(800, 1344)]), [m.float() for m in maps])
    assert anchors.dtype == torch.float32 and torch.equal(anchors, reference)
    layers = {n: m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in ("cls_logits", "bbox_reg", "bbox_pred")}
    outputs = []
    for layer in layers.values():
        layer.register_forward_hook(lambda module, args, output: outputs.append(output.dtype))
    images = [torch.rand(3, 64, 64)]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        (detections,) = model(images)
    assert layers and outputs and set(outputs) == {torch.float32}
    assert detections["boxes"].dtype == torch.float32
    assert set(model.state_dict()) == set(build_detector(arch, "resnet18", 3, None, 64, 64).state_dict())


def _detection_datamodule(root: Path) -> DetectionDataModule:
    from cwd_lightning.data.shapes import ShapesSpec

    return DetectionDataModule(str(root), SHAPES_CLASSES[1:], layout="coco", train_split="train", val_split="val",
                               image_dir="JPEGImages", image_size=32, batch_size=4, val_batch_size=4, num_workers=0,
                               shapes=ShapesSpec(num_train=24, num_val=8, image_size=32, seed=1))  # fmt: skip


def test_fpn_distillation_logs_every_level_and_keeps_the_teacher_frozen(tiny_shapes, tmp_path):
    def detector():
        return build_detector(
            "retinanet", "resnet18", 10, None, min_size=32, max_size=32, anchor_sizes=[8, 16, 32, 64, 128]
        )

    torch.manual_seed(0)
    teacher_path = tmp_path / "teacher.pt"
    torch.save(detector().state_dict(), teacher_path)
    levels = ["0", "1"]  # P3 4×4 and P4 2×2 at 32 px; P5-P7 are 1×1, on which CWD is refused (below)
    paths = [f"backbone.fpn[{level}]" for level in levels]
    with pytest.raises(ValueError, match=r"term 'cwd_fpn'.*fpn\[p7\]'.*1×1 map.*identically 0"):
        DistillationModule(DetectionTask(10, example_size=32), detector(), detector(), str(teacher_path),
                           [DistillTerm("cwd_fpn", [*paths, "backbone.fpn[p7]"], [*paths, "backbone.fpn[p7]"],
                                        ChannelWiseDivergence(1.0), 5.0)])  # fmt: skip
    module = DistillationModule(
        DetectionTask(10, example_size=32), detector(), detector(), str(teacher_path),
        [DistillTerm("cwd_fpn", paths, paths, ChannelWiseDivergence(1.0), 5.0)],
        optimizer=partial(torch.optim.AdamW, lr=1e-4),
    )  # fmt: skip
    before = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    trainer = L.Trainer(max_steps=3, limit_val_batches=1, val_check_interval=3, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False)  # fmt: skip
    trainer.fit(module, _detection_datamodule(tiny_shapes.parent / "det_shapes"))
    logged = trainer.callback_metrics
    for level in levels:
        assert f"train/distill/cwd_fpn/{level}" in logged
    assert {"train/loss_task/classification", "train/loss_task/bbox_regression", "val/mAP", "val/mAP50"} <= set(logged)
    assert all(torch.equal(v, before[k]) for k, v in module.teacher.state_dict().items())
    assert not module.teacher.training


def test_a_shared_head_is_distilled_on_every_level_it_runs_on(tiny_shapes, tmp_path):
    """RetinaNet's classification head runs once per FPN level: ``calls: all`` gives one pair per level."""

    def detector():
        return build_detector("retinanet", "resnet18", 10, None, min_size=32, max_size=32,
                              anchor_sizes=[8, 16, 32, 64, 128])  # fmt: skip

    torch.manual_seed(0)
    teacher_path = tmp_path / "teacher.pt"
    torch.save(detector().state_dict(), teacher_path)
    path = "head.classification_head.cls_logits"
    with pytest.raises(ValueError, match="runs 5 times per forward; say which call"):
        DistillationModule(DetectionTask(10, example_size=32), detector(), detector(), str(teacher_path),
                           [DistillTerm("cls", path, path, ChannelWiseDivergence(1.0))])  # fmt: skip
    module = DistillationModule(
        DetectionTask(10, example_size=32), detector(), detector(), str(teacher_path),
        [DistillTerm("cls", path, path, ChannelWiseDivergence(1.0), 1.0, calls=[0, 1])],
        optimizer=partial(torch.optim.AdamW, lr=1e-4),
    )  # fmt: skip
    pairs = list(module.distiller.pairs["cls"])
    assert [p.label for p in pairs] == ["call0", "call1"]
    trainer = L.Trainer(max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False)  # fmt: skip
    trainer.fit(module, _detection_datamodule(tiny_shapes.parent / "det_shapes"))
    values = [float(trainer.callback_metrics[f"train/distill/cls/call{k}"]) for k in range(2)]
    # at 32 px, P3 is 4×4 and P4 2×2 (P5-P7 are 1×1: calls "all" is refused there, see above)
    assert values[0] > 0 and values[1] > 0 and values[0] != values[1]


def test_group_norm_head_for_training_from_scratch():
    model = build_detector("retinanet", "resnet18", 3, None, min_size=64, max_size=64, head_norm="group")
    norms = [m for m in model.head.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(norms) == 8  # 4 per sub-head
    target = {"boxes": torch.tensor([[4.0, 4.0, 30.0, 30.0]]), "labels": torch.tensor([2])}
    assert torch.isfinite(sum(model([torch.rand(3, 64, 64)], [target]).values()))
