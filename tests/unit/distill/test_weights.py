"""A term's weight over training: schedules (the logged weight equals the formula at every step), the ratio and
gradient-share calibrations (they reach their target on a toy pair), and an exact resume of both."""

from __future__ import annotations

import math
from functools import partial

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from cwd_lightning.distill import DistillTerm
from cwd_lightning.distill.weights import Calibration, TermWeights, WeightSchedule
from cwd_lightning.losses import ChannelWiseDivergence, PixelWiseKD
from cwd_lightning.runs.record import RunRecord
from tests.helpers import cwd_module, tiny_datamodule


@pytest.mark.parametrize(
    ("schedule", "step", "progress", "expected"),
    [
        (WeightSchedule(), 5, 0.5, 1.0),
        (WeightSchedule(start=3), 2, 0.1, 0.0),
        (WeightSchedule(start=3), 3, 0.1, 1.0),
        (WeightSchedule(warmup=4), 0, 0.0, 0.25),
        (WeightSchedule(start=2, warmup=4), 3, 0.0, 0.5),
        (WeightSchedule(warmup=4), 10, 0.0, 1.0),
        (WeightSchedule(decay="linear", final=0.2), 0, 0.25, 0.8),
        (WeightSchedule(decay="cosine"), 0, 0.5, 0.5),
        (WeightSchedule(decay="cosine", final=0.1), 0, 1.0, 0.1),
        (WeightSchedule(decay="step", milestones=[4, 8], gamma=0.5), 8, 0.9, 0.25),
        (WeightSchedule(decay="step", milestones=[4, 8], gamma=0.5), 7, 0.9, 0.5),
        (WeightSchedule(stop=6), 6, 0.5, 0.0),
        (WeightSchedule(warmup=2, decay="cosine", final=0.0), 0, 1 / 3, 0.5 * 0.5 * (1 + math.cos(math.pi / 3))),
    ],
)
def test_schedule_factor(schedule, step, progress, expected):
    assert schedule.factor(step, progress) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: WeightSchedule(decay="exp"), "decay"),
        (lambda: WeightSchedule(start=5, stop=5), "stop"),
        (lambda: WeightSchedule(warmup=-1), "warmup"),
        (lambda: WeightSchedule(milestones=[3]), "milestones"),
        (lambda: Calibration(target=1.5, mode="gradient_share"), "gradient share"),
        (lambda: Calibration(target=0.0), "ratio"),
        (lambda: Calibration(target=0.1, mode="auto"), "mode"),
        (lambda: Calibration(target=0.1, every=0), "every"),
        (lambda: Calibration(target=0.1, max_change=1.0), "max_change"),
    ],
)
def test_bad_settings_are_refused(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_share_update_is_the_bounded_odds_ratio():
    term = DistillTerm("t", "a", "a", torch.nn.MSELoss(), 2.0,
                       calibration=Calibration(0.2, "gradient_share", tolerance=0.01, max_change=10))  # fmt: skip
    weights = TermWeights([term])
    assert weights.update_share("t", 1.0, 1.0) == 0.5  # odds 1 → 0.25: weight × 0.25
    assert weights.base["t"] == pytest.approx(0.5)
    weights.update_share("t", 0.205, 0.795)  # within the tolerance: unchanged
    assert weights.base["t"] == pytest.approx(0.5)
    weights.update_share("t", 1e-6, 1.0)  # far too small: bounded to × 10
    assert weights.base["t"] == pytest.approx(5.0)


class WeightLog(L.Callback):
    """What the module logged at each global step."""

    def __init__(self, keys: list[str]) -> None:
        self.keys, self.steps = keys, {}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        logged = trainer.callback_metrics
        self.steps[trainer.global_step - 1] = {key: float(logged[key]) for key in self.keys if key in logged}


def fit(module, data_root, steps: int, keys: list[str], **trainer_kwargs) -> WeightLog:
    log = WeightLog(keys)
    ckpt_path, callbacks = trainer_kwargs.pop("ckpt_path", None), trainer_kwargs.pop("callbacks", [])
    trainer = L.Trainer(max_steps=steps, limit_val_batches=0, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, callbacks=[log, *callbacks], **trainer_kwargs)  # fmt: skip
    trainer.fit(module, tiny_datamodule(data_root), ckpt_path=ckpt_path)
    return log


def test_logged_weight_follows_the_schedule(teacher_file, tiny_shapes):
    schedule = WeightSchedule(start=2, warmup=3, decay="cosine", final=0.2, stop=9)
    term = DistillTerm("cwd_logits", "segmentation_head", "segmentation_head", ChannelWiseDivergence(4.0), 3.0,
                       schedule=schedule)  # fmt: skip
    steps = 10
    log = fit(cwd_module(teacher_file, [term]), tiny_shapes, steps, ["train/weight/cwd_logits"])
    logged = {step: values["train/weight/cwd_logits"] for step, values in log.steps.items()}
    assert sorted(logged) == list(range(steps))
    for step, weight in logged.items():
        assert weight == pytest.approx(3.0 * schedule.factor(step, step / steps), rel=1e-6, abs=1e-9), step
    assert logged[0] == logged[1] == logged[9] == 0.0 and logged[4] > 0


def test_ratio_calibration_sets_the_weight_from_the_measured_means(teacher_file, tiny_shapes):
    term = DistillTerm("cwd_logits", "segmentation_head", "segmentation_head", ChannelWiseDivergence(4.0), 3.0,
                       calibration=Calibration(target=0.5, measure_steps=3))  # fmt: skip
    module = cwd_module(teacher_file, [term])
    keys = ["train/weight/cwd_logits", "train/loss_task", "train/distill/cwd_logits", "train/distill_to_task"]
    log = fit(module, tiny_shapes, 6, keys)
    measured = [log.steps[step] for step in range(3)]
    assert [values["train/weight/cwd_logits"] for values in measured] == [0.0, 0.0, 0.0]  # not applied meanwhile
    task = sum(v["train/loss_task"] for v in measured) / 3
    value = sum(v["train/distill/cwd_logits"] for v in measured) / 3
    expected = 0.5 * task / value
    for step in range(3, 6):
        assert log.steps[step]["train/weight/cwd_logits"] == pytest.approx(expected, rel=1e-5)
    # the weighted term then starts near half the task loss
    assert log.steps[3]["train/distill_to_task"] == pytest.approx(0.5, rel=0.2)


def share_terms(every: int = 1) -> list[DistillTerm]:
    return [DistillTerm("cwd_logits", "segmentation_head", "segmentation_head", ChannelWiseDivergence(4.0), 100.0,
                        calibration=Calibration(target=0.3, mode="gradient_share", every=every,
                                                layer="segmentation_head", tolerance=0.03))]  # fmt: skip


def test_gradient_share_controller_reaches_its_target(teacher_file, tiny_shapes):
    """A toy pair: one fixed batch, a small learning rate, so the gradients hold nearly still; from a weight
    100 (share 0.93) the bounded updates bring the share within its tolerance and keep it there."""
    datamodule = tiny_datamodule(tiny_shapes)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    module = cwd_module(teacher_file, share_terms())
    module.optimizer_factory = partial(torch.optim.AdamW, lr=1e-5)
    log = WeightLog(["train/weight/cwd_logits", "train/gradient_share/cwd_logits"])
    trainer = L.Trainer(max_steps=8, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                        callbacks=[log])  # fmt: skip
    trainer.fit(module, train_dataloaders=DataLoader([batch] * 8, batch_size=None))
    shares = [log.steps[step]["train/gradient_share/cwd_logits"] for step in range(8)]
    weights = [log.steps[step]["train/weight/cwd_logits"] for step in range(8)]
    assert shares[0] > 0.8  # it starts far above its target
    assert weights[1] == pytest.approx(10.0)  # the first update is bounded to ÷ max_change
    assert all(abs(share - 0.3) <= 0.03 for share in shares[-4:]), shares
    # what it measures is the share of the term's gradient norm at the layer's parameters
    student = module.student
    assert module.share_layers["cwd_logits"] == list(student.segmentation_head.parameters())


def test_gradient_share_layer_must_be_a_student_module(teacher_file):
    terms = share_terms()
    terms[0].calibration.layer = "decoder.nope"
    with pytest.raises(ValueError, match=r"'cwd_logits'.*calibration.layer 'decoder.nope' is not a module"):
        cwd_module(teacher_file, terms)


class SaveAt(L.Callback):
    def __init__(self, step: int, path) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


def test_resume_gives_the_weights_of_an_uninterrupted_run(teacher_file, tiny_shapes, tmp_path):
    """Interrupted in the middle of the ratio measurement and between two share updates."""

    def terms() -> list[DistillTerm]:
        return [DistillTerm("cwd_logits", "segmentation_head", "segmentation_head", ChannelWiseDivergence(4.0), 3.0,
                            calibration=Calibration(target=0.5, measure_steps=4),
                            schedule=WeightSchedule(warmup=2)),
                DistillTerm("kd_logits", "segmentation_head", "segmentation_head", PixelWiseKD(), 10.0,
                            calibration=Calibration(target=0.2, mode="gradient_share", every=3,
                                                    layer="segmentation_head", tolerance=0.0))]  # fmt: skip

    keys = ["train/weight/cwd_logits", "train/weight/kd_logits"]
    torch.manual_seed(0)
    whole = cwd_module(teacher_file, terms(), lr_schedule="constant")
    checkpoint = tmp_path / "step2.ckpt"
    straight = fit(whole, tiny_shapes, 7, keys, callbacks=[SaveAt(2, checkpoint), RunRecord(None)])
    torch.manual_seed(0)
    resumed_module = cwd_module(teacher_file, terms(), lr_schedule="constant")
    resumed = fit(resumed_module, tiny_shapes, 7, keys, ckpt_path=str(checkpoint), callbacks=[RunRecord(None)])
    assert sorted(resumed.steps) == [2, 3, 4, 5, 6]
    for step in resumed.steps:
        assert resumed.steps[step] == straight.steps[step], step
    assert resumed_module.term_weights.state_dict() == whole.term_weights.state_dict()
    assert whole.term_weights.calibrated == {"cwd_logits": True}
    assert straight.steps[6]["train/weight/kd_logits"] != 10.0  # the controller did move it
