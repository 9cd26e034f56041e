"""Hugging Face segmentation models as networks here: from a save_pretrained folder, with their weights or at
random init, logits at their own stride, modules reachable by path; a missing model says what to fetch."""

from __future__ import annotations

import pytest
import torch

from cwd_lightning.models import huggingface_model
from cwd_lightning.tasks import SegmentationTask
from tests.helpers import tiny_segformer


def test_a_saved_segformer_loads_with_its_weights_or_at_random_init(tmp_path):
    folder = tiny_segformer(tmp_path / "segformer")
    teacher = huggingface_model(str(folder)).eval()
    assert teacher.pretrained_source == f"transformers {folder}"
    with torch.no_grad():
        logits = teacher(torch.zeros(2, 3, 32, 32))
    assert logits.shape == (2, 11, 8, 8)  # SegFormer's logits at 1/4
    assert dict(teacher.named_modules())["model.decode_head.classifier"].out_channels == 11
    assert SegmentationTask(11, example_size=32).output_classes(teacher) == 11
    from transformers import SegformerForSemanticSegmentation

    saved = SegformerForSemanticSegmentation.from_pretrained(folder).state_dict()  # the library's own loading
    state = teacher.model.state_dict()
    assert sorted(state) == sorted(saved) and all(torch.equal(state[key], saved[key]) for key in saved)
    random = huggingface_model(str(folder), pretrained=False)
    assert not hasattr(random, "pretrained_source")
    assert not torch.equal(random.model.decode_head.classifier.weight, teacher.model.decode_head.classifier.weight)
    relabelled = huggingface_model(str(folder), num_labels=5)
    assert relabelled.model.decode_head.classifier.out_channels == 5


def test_a_missing_model_names_what_to_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match=r"hub repository 'nobody/no-such-segformer'.*huggingface-cli download"):
        huggingface_model("nobody/no-such-segformer")
