"""The segmentation task: the auxiliary head's loss in training only, with its weight."""

from __future__ import annotations

import pytest
import torch

from cwd_lightning.models import build_dilated_segmentor
from cwd_lightning.tasks import SegmentationTask


def test_the_auxiliary_loss_enters_with_its_weight_in_training_only():
    torch.manual_seed(0)
    model = build_dilated_segmentor("psp", "resnet18", 5, encoder_weights=None)
    task = SegmentationTask(5, aux_weight=0.4)
    images, masks = torch.randn(2, 3, 64, 64), torch.randint(0, 5, (2, 64, 64))
    masks[:, :4] = 255
    loss, parts = task.training_loss(model, (images, masks))
    assert set(parts) == {"ce", "aux_ce"}
    assert float(loss) == pytest.approx(float(parts["ce"] + 0.4 * parts["aux_ce"]), rel=1e-5)
    model.eval()
    with torch.no_grad():
        predicted = task.predict(model, images)
        validation_loss, _ = task.validation_step(model, (images, masks))
    assert predicted.shape == (2, 64, 64)  # stride-8 logits upsampled before the argmax
    assert float(validation_loss) > 0 and "mIoU" in {k.split("/")[-1] for k in task.compute_metrics()}
