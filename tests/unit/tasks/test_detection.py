"""The detection task: COCO mAP equal to pycocotools' COCOeval, FPN distillation of every level, a shared head
distilled on every level it runs on."""

from __future__ import annotations

import json
from functools import partial

import lightning as L
import pytest
import torch

from cwd_lightning.data import CocoDetection
from cwd_lightning.distill import DistillationModule, DistillTerm
from cwd_lightning.losses import ChannelWiseDivergence, CrossHeadKD
from cwd_lightning.models import build_detector
from cwd_lightning.tasks import DetectionTask
from tests.helpers import cwd_module, tiny_detection_datamodule, write_jpeg


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

    from cwd_lightning.data.transforms import detection_eval_transforms

    generator = torch.Generator().manual_seed(0)
    categories = [{"id": 2, "name": "a"}, {"id": 5, "name": "b"}, {"id": 11, "name": "c"}]
    images, annotations = [], []
    for image_id in range(1, 9):
        write_jpeg(tmp_path / "images" / f"{image_id}.jpg", 200, 200)
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


def tiny_retinanet(size: int = 32):
    """A RetinaNet-R18 (random weights) that resizes its images to ``size`` px."""
    return build_detector("retinanet", "resnet18", 10, None, min_size=size, max_size=size,
                          anchor_sizes=[8, 16, 32, 64, 128])  # fmt: skip


def saved_retinanet(path, size: int = 32):
    """A ``tiny_retinanet`` seeded with 0, saved as a state_dict file at ``path``."""
    torch.manual_seed(0)
    torch.save(tiny_retinanet(size).state_dict(), path)
    return path


def test_fpn_distillation_logs_every_level_and_keeps_the_teacher_frozen(tiny_shapes, tmp_path):
    detector, teacher_path = tiny_retinanet, saved_retinanet(tmp_path / "teacher.pt")
    levels = ["0", "1"]  # P3 4×4 and P4 2×2 at 32 px; P5-P7 are 1×1, on which CWD is refused (below)
    paths = [f"backbone.fpn/{level}" for level in levels]
    with pytest.raises(ValueError, match=r"term 'cwd_fpn'.*fpn/p7'.*1×1 map.*identically 0"):
        DistillationModule(DetectionTask(10, example_size=32), detector(), detector(), str(teacher_path),
                           [DistillTerm("cwd_fpn", [*paths, "backbone.fpn/p7"], [*paths, "backbone.fpn/p7"],
                                        ChannelWiseDivergence(1.0), 5.0)])  # fmt: skip
    module = DistillationModule(
        DetectionTask(10, example_size=32), detector(), detector(), str(teacher_path),
        [DistillTerm("cwd_fpn", paths, paths, ChannelWiseDivergence(1.0), 5.0)],
        optimizer=partial(torch.optim.AdamW, lr=1e-4),
    )  # fmt: skip
    before = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    trainer = L.Trainer(max_steps=3, limit_val_batches=1, val_check_interval=3, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False)  # fmt: skip
    trainer.fit(module, tiny_detection_datamodule(tiny_shapes.parent / "det_shapes"))
    logged = trainer.callback_metrics
    for level in levels:
        assert f"train/distill/cwd_fpn/{level}" in logged
    assert {"train/loss_task/classification", "train/loss_task/bbox_regression", "val/mAP", "val/mAP50"} <= set(logged)
    assert all(torch.equal(v, before[k]) for k, v in module.teacher.state_dict().items())
    assert not module.teacher.training


def test_a_shared_head_is_distilled_on_every_level_it_runs_on(tiny_shapes, tmp_path):
    """RetinaNet's classification head runs once per FPN level: ``calls: all`` gives one pair per level."""

    detector, teacher_path = tiny_retinanet, saved_retinanet(tmp_path / "teacher.pt")
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
    trainer.fit(module, tiny_detection_datamodule(tiny_shapes.parent / "det_shapes"))
    values = [float(trainer.callback_metrics[f"train/distill/cls/call{k}"]) for k in range(2)]
    # at 32 px, P3 is 4×4 and P4 2×2 (P5-P7 are 1×1: calls "all" is refused there, see above)
    assert values[0] > 0 and values[1] > 0 and values[0] != values[1]


class BoxesSeen(torch.nn.Module):
    """A loss that asks for the boxes and keeps what it got, per compared map size."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[tuple[int, int], list[torch.Tensor]] = {}

    def forward(self, student, teacher, boxes):
        self.seen[tuple(student.shape[-2:])] = [b.clone() for b in boxes]
        return (student - teacher.detach()).pow(2).mean()


def test_a_loss_that_asks_for_boxes_gets_them_on_each_fpn_level(tiny_shapes, tmp_path, teacher_file):
    """In eval mode the detector resizes its 32-px images to 64 (min_size 64; in training torchvision's RetinaNet
    skips its resize): the boxes are scaled as the images were, then onto each level's grid (P3 8×8: ÷ 8,
    P4 4×4: ÷ 16)."""

    def detector():
        return tiny_retinanet(size=64)

    teacher_path = saved_retinanet(tmp_path / "detector.pt", size=64)
    paths = ["backbone.fpn/0", "backbone.fpn/1"]
    module = DistillationModule(DetectionTask(10, example_size=32), detector(), detector(), str(teacher_path),
                                [DistillTerm("boxes", paths, paths, BoxesSeen(), 1.0)])  # fmt: skip
    datamodule = tiny_detection_datamodule(tiny_shapes.parent / "det_shapes")
    datamodule.prepare_data()
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    for pair in module.distiller.iter_pairs():
        pair.loss.seen.clear()  # what the probe at construction showed it
    module.eval()
    module.step_losses(batch, module.task.validation_step)
    targets = batch[1]
    assert all(image.shape[-2:] == (32, 32) for image in batch[0]) and any(len(t["boxes"]) for t in targets)
    for pair, size in zip(module.distiller.iter_pairs(), [(8, 8), (4, 4)], strict=True):
        assert list(pair.loss.seen) == [size]
        seen = pair.loss.seen[size]
        for boxes, target in zip(seen, targets, strict=True):
            torch.testing.assert_close(boxes, target["boxes"] * 2 * size[0] / 64)  # 32 → 64 px, then the grid
    with pytest.raises(ValueError, match="needs this step's teacher forward"):  # e.g. from a teacher cache
        module.task.input_boxes(([image.clone() for image in batch[0]], batch[1]))
    with pytest.raises(ValueError, match=r"BoxesSeen needs ground-truth boxes, and this task has none"):
        cwd_module(teacher_file, [DistillTerm("boxes", "segmentation_head", "segmentation_head",
                                                        BoxesSeen(), 1.0)])  # fmt: skip


def tiny_fcos():
    """An FCOS-R18 (random weights) at 32 px: its heads' GroupNorm outputs can be tapped (no inplace ReLU)."""
    return build_detector("fcos", "resnet18", 10, None, min_size=32, max_size=32)


def crosskd_terms():
    """CrossKD's two terms on every FPN level, as experiments/shapes_det_crosskd.yaml writes them."""
    cls, reg = "head.classification_head", "head.regression_head"
    rest = [f"conv.{index}" for index in (8, 9, 10, 11)]
    return [
        DistillTerm("cls", f"{cls}.conv.7", f"{cls}.conv.7",
                    CrossHeadKD([f"{cls}.{name}" for name in [*rest, "cls_logits"]]), 1.0, calls="all"),
        DistillTerm("reg", f"{reg}.conv.7", f"{reg}.conv.7",
                    CrossHeadKD([f"{reg}.{name}" for name in [*rest, "bbox_reg"]], branch="regression",
                                scores=f"{cls}.cls_logits"), 1.0, calls="all"),
    ]  # fmt: skip


def test_crosskd_runs_the_teacher_head_on_the_student_and_leaves_the_teacher_untouched(tiny_shapes, tmp_path):
    """Three training steps: every teacher parameter's .grad stays None and the teacher is bit for bit what it
    was; the cross-head loss alone sends gradient into the student's head below the tap; the teacher's modules
    are not registered in the distiller (nothing of the teacher in the checkpoint's distiller keys)."""
    torch.manual_seed(0)
    teacher_path = tmp_path / "fcos.pt"
    torch.save(tiny_fcos().state_dict(), teacher_path)
    module = DistillationModule(DetectionTask(10, example_size=32), tiny_fcos(), tiny_fcos(), str(teacher_path),
                                crosskd_terms(), optimizer=partial(torch.optim.AdamW, lr=1e-3))  # fmt: skip
    before = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    student_head = module.student.head.classification_head.conv[6].weight
    datamodule = tiny_detection_datamodule(tiny_shapes.parent / "det_shapes")
    datamodule.prepare_data()
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    losses = module.step_losses(batch, module.task.training_loss)
    losses.terms["cls"].backward()
    assert student_head.grad is not None and student_head.grad.abs().sum() > 0
    assert module.student.head.classification_head.cls_logits.weight.grad is None  # above the tap: not reached
    assert all(p.grad is None for p in module.teacher.parameters())
    assert set(losses.values) >= {f"{term}/call{k}" for term in ("cls", "reg") for k in range(5)}
    assert not any("distiller" in key for key in module.state_dict())
    module.student.zero_grad(set_to_none=True)
    trainer = L.Trainer(max_steps=3, limit_val_batches=1, val_check_interval=3, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False)  # fmt: skip
    trainer.fit(module, datamodule)
    assert float(trainer.callback_metrics["train/distill/reg"]) > 0
    assert all(p.grad is None for p in module.teacher.parameters())
    assert all(torch.equal(v, before[k]) for k, v in module.teacher.state_dict().items())


def test_a_teacher_part_is_refused_when_it_names_no_module_or_a_trainable_one(tmp_path):
    from cwd_lightning.distill.pairs import TeacherPart

    torch.manual_seed(0)
    teacher_path = tmp_path / "fcos.pt"
    torch.save(tiny_fcos().state_dict(), teacher_path)
    cls = "head.classification_head"
    term = DistillTerm("cls", f"{cls}.conv.7", f"{cls}.conv.7", CrossHeadKD([f"{cls}.conv.80", f"{cls}.cls_logits"]),
                       calls="all")  # fmt: skip
    with pytest.raises(ValueError, match=r"term 'cls': CrossHeadKD.teacher_modules: no module .*conv.80"):
        DistillationModule(DetectionTask(10, example_size=32), tiny_fcos(), tiny_fcos(), str(teacher_path), [term])
    with pytest.raises(ValueError, match=r"conv.9 require gradients: a teacher part runs frozen"):
        TeacherPart(tiny_fcos(), (f"{cls}.conv.9",), "teacher")
