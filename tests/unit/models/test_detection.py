"""The detectors: train and predict at the configured size, the pipeline's sizes kept in training, RetinaNet
settings refused elsewhere, fp32 anchors and box outputs under bf16, a GroupNorm head."""

from __future__ import annotations

import pytest
import torch

from cwd_lightning.models import build_detector
from cwd_lightning.tasks import DetectionTask

LEVELS = ["0", "1", "2", "p6", "p7"]  # RetinaNet/FCOS FPN outputs: P3-P5, P6, P7


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


def test_group_norm_head_for_training_from_scratch():
    model = build_detector("retinanet", "resnet18", 3, None, min_size=64, max_size=64, head_norm="group")
    norms = [m for m in model.head.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(norms) == 8  # 4 per sub-head
    target = {"boxes": torch.tensor([[4.0, 4.0, 30.0, 30.0]]), "labels": torch.tensor([2])}
    assert torch.isfinite(sum(model([torch.rand(3, 64, 64)], [target]).values()))
