"""The W&B monitors: normalised channel maps of the top-k channels, KL equal to the loss's, no-ops without a
logger, their own time measured."""

from __future__ import annotations

import math
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch

from cwd_lightning.analysis import channel_maps
from cwd_lightning.callbacks import ChannelDistributionMonitor, channel_distributions
from cwd_lightning.callbacks.fixed_batch import FixedBatchCallback
from cwd_lightning.losses import ChannelWiseDivergence


def _maps() -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher and student logits (1×4×3×3): channel 1 and 3 identical, 0 a little off, 2 far off."""
    teacher = torch.zeros(1, 4, 3, 3)
    teacher[0, 0, 0, 0] = 2.0
    teacher[0, 1, 1, 1] = 3.0
    teacher[0, 2, 2, 2] = 6.0
    student = teacher.clone()
    student[0, 0, 0, 0] = 1.0  # a little less mass at the teacher's peak
    student[0, 2] = 0.0
    student[0, 2, 0, 0] = 6.0  # all mass in the wrong place
    return student, teacher


def test_distributions_sum_to_one_and_top_k_picks_the_largest_kl():
    student, teacher = _maps()
    p_s, p_t = channel_maps.spatial_distributions(student), channel_maps.spatial_distributions(teacher)
    torch.testing.assert_close(p_s.sum((-2, -1)), torch.ones(1, 4))
    kl = ChannelWiseDivergence(1.0).kl_per_sample_channel(student, teacher)[0]  # the monitor's KL(T‖S)
    assert kl[1].item() == pytest.approx(0.0, abs=1e-7) and kl[3].item() == pytest.approx(0.0, abs=1e-7)
    assert kl[2] > kl[0] > 0
    assert channel_maps.top_k_channels(kl, 2) == [2, 0]
    everything = channel_maps.top_k_channels(kl, 10)  # k larger than C: all channels, largest first
    assert len(everything) == 4 and everything[:2] == [2, 0]
    entropy = channel_maps.channel_entropy(p_t)[0]
    assert entropy[3].item() == pytest.approx(math.log(9))  # a constant map is uniform over H·W
    assert entropy[2] < entropy[0] < entropy[3]  # sharper maps have lower entropy


def test_kl_matches_the_loss_up_to_tau_squared():
    student, teacher = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    tau = 2.0
    kl = ChannelWiseDivergence(tau).kl_per_sample_channel(student, teacher)
    assert kl.shape == (2, 3) and bool((kl >= 0).all())
    assert (tau**2 * kl.mean()).item() == pytest.approx(ChannelWiseDivergence(tau)(student, teacher).item(), rel=1e-5)


class _Experiment:
    def __init__(self) -> None:
        self.logged: list[dict] = []

    def log(self, payload: dict) -> None:
        self.logged.append(payload)


def test_monitor_renders_normalised_maps_of_the_top_k_channels(monkeypatch):
    student, teacher = _maps()
    rendered = {}

    def fake_grid(image, teacher_maps, student_maps, channels, names, kl, title):
        rendered.update(image=image, teacher=teacher_maps, student=student_maps, channels=channels, names=names, kl=kl)
        import matplotlib.pyplot as plt

        return plt.figure()

    monkeypatch.setattr(channel_distributions, "channel_grid", fake_grid)
    names = ["bg", "a", "b", "c"]
    monkeypatch.setattr(
        channel_distributions,
        "distillation_pairs",
        lambda module, batch: {"cwd_logits": (student, teacher, 1.0, names)},
    )
    module = SimpleNamespace(distiller=object(), task=SimpleNamespace(batch_inputs=lambda batch: batch[0]))
    trainer = SimpleNamespace(global_step=7, datamodule=None)
    logger = SimpleNamespace(experiment=_Experiment())
    monitor = ChannelDistributionMonitor(top_k=2)
    monitor.log_batch(trainer, module, logger, (torch.zeros(1, 3, 3, 3), torch.zeros(1, 3, 3)))

    assert rendered["channels"] == [2, 0] and rendered["names"] == names
    np.testing.assert_allclose(rendered["teacher"].sum((-2, -1)), np.ones(4), rtol=1e-6)
    np.testing.assert_allclose(rendered["student"].sum((-2, -1)), np.ones(4), rtol=1e-6)
    assert rendered["image"].shape == (3, 3, 3) and rendered["image"].dtype == np.uint8
    assert rendered["kl"][0] > rendered["kl"][1] > 0
    payload = logger.experiment.logged[0]
    assert payload["trainer/global_step"] == 7
    for key in ("maps", "kl_table", "kl_bar", "kl_hist", "entropy_teacher", "entropy_student"):
        assert f"channels/cwd_logits/{key}" in payload
    table = payload["channels/cwd_logits/kl_table"]
    assert [row[1] for row in table.data] == names and table.data[2][2] == pytest.approx(rendered["kl"][0], rel=1e-5)


class _Counting(FixedBatchCallback):
    def log_batch(self, trainer, module, logger, batch) -> None:
        raise AssertionError("must not run without a W&B logger")


def test_monitors_are_no_ops_without_a_logger(tiny_shapes, tmp_path):
    from functools import partial

    from cwd_lightning.data import SegmentationDataModule
    from cwd_lightning.distill import DistillationModule
    from cwd_lightning.models import build_segmentation_model
    from cwd_lightning.tasks import SegmentationTask

    module = DistillationModule(
        SegmentationTask(11, example_size=32),
        build_segmentation_model("PSPNet", "resnet18", 11, None),
        optimizer=partial(torch.optim.AdamW, lr=1e-3),
    )
    monitor = _Counting(every_n_epochs=1)
    data = SegmentationDataModule(str(tiny_shapes), 11, crop_size=32, base_size=32, batch_size=4, num_workers=0)
    trainer = L.Trainer(max_steps=2, val_check_interval=1, limit_val_batches=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, callbacks=[monitor],
                        default_root_dir=str(tmp_path))  # fmt: skip
    trainer.fit(module, data)
    assert monitor.batch is not None and monitor.validations == 2 and monitor.calls == 0
    assert not list(tmp_path.glob("*.json"))
