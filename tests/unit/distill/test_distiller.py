"""The distiller: calls of a shared module, distinct labels, what a loss asks for (labels at the maps' size,
the step), the build-time checks, the losses' own modules and optimisers."""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cwd_lightning.data import SegmentationDataModule
from cwd_lightning.distill import DistillationModule, DistillTerm
from cwd_lightning.distill.distiller import StepContext
from cwd_lightning.losses import (
    ChannelWiseDivergence,
    DistillationLoss,
    FitNets,
    HolisticAdversarial,
    IntraClassFeatureVariation,
    MaskedGenerativeDistillation,
)
from cwd_lightning.tasks import SegmentationTask

CLASSES = 11


class Pyramid(nn.Module):
    """A stem, a ``body`` and an ``fpn`` that both return tuples, and a ``shared`` head run once per level."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.body = nn.ModuleList([nn.Conv2d(width, width, 1), nn.Conv2d(width, width, 1)])
        self.fpn = nn.ModuleList([nn.Conv2d(width, width, 1), nn.Conv2d(width, width, 1)])
        self.body_out = _TupleOf(self.body)
        self.fpn_out = _TupleOf(self.fpn)
        self.shared = nn.Conv2d(width, CLASSES, 1)

    def forward(self, images: Tensor) -> Tensor:
        features = F.relu(self.stem(images))
        body = self.body_out(features)
        levels = self.fpn_out(body[1])
        outputs = [self.shared(F.avg_pool2d(levels[0], scale)) for scale in (1, 2, 4)]
        return sum(F.interpolate(o, size=images.shape[-2:], mode="nearest") for o in outputs)


class _TupleOf(nn.Module):
    def __init__(self, layers: nn.ModuleList) -> None:
        super().__init__()
        self.layers = layers

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.layers[0](x), self.layers[1](x)


@pytest.fixture()
def pyramid_teacher_file(tmp_path):
    """The teacher of these tests (a Pyramid of width 8, seed 0) as a state_dict file."""
    torch.manual_seed(0)
    path = tmp_path / "teacher.pt"
    torch.save(Pyramid(8).state_dict(), path)
    return path


def _module(pyramid_teacher_file, terms, **kwargs) -> DistillationModule:
    torch.manual_seed(1)
    return DistillationModule(
        task=SegmentationTask(CLASSES, example_size=32),
        student=Pyramid(4),
        teacher=Pyramid(8),
        teacher_checkpoint=str(pyramid_teacher_file),
        terms=terms,
        optimizer=partial(torch.optim.SGD, lr=0.1),
        **kwargs,
    )


def _fit(module, data_root, steps: int = 2, **trainer_args) -> L.Trainer:
    trainer = L.Trainer(max_steps=steps, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, **trainer_args)  # fmt: skip
    data = SegmentationDataModule(str(data_root), CLASSES, crop_size=32, base_size=32, batch_size=4, num_workers=0)
    trainer.fit(module, data)
    return trainer


# ---------------------------------------------------------------- repeated calls, labels of pairs
def test_a_module_called_per_level_is_distilled_on_the_named_calls(pyramid_teacher_file):
    loss = ChannelWiseDivergence(2.0)
    with pytest.raises(ValueError, match=r"'shared'/'shared' runs 3 times per forward; say which call"):
        _module(pyramid_teacher_file, [DistillTerm("head", "shared", "shared", loss)])
    module = _module(pyramid_teacher_file, [DistillTerm("head", "shared", "shared", loss, calls=[0, 2])])
    pairs = list(module.distiller.pairs["head"])
    assert [(p.key, p.call) for p in pairs] == [("head/call0", 0), ("head/call2", 2)]

    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), module.distiller.recording():
        module.student(images)
        module.teacher(images)
        recorded_student = module.distiller.student_recorder.calls("shared")
        recorded_teacher = module.distiller.teacher_recorders["teacher"].calls("shared")
        total, values, _ = module.distiller.compute(StepContext())
    assert recorded_student[2].shape[-1] == 8  # the third call runs on the 4×-pooled level
    for pair, call in zip(pairs, (0, 2), strict=True):
        assert values[pair.key] == pytest.approx(float(loss(recorded_student[call], recorded_teacher[call])), rel=1e-6)
    assert float(total) == pytest.approx(float(values["head/call0"] + values["head/call2"]), rel=1e-6)

    every = _module(pyramid_teacher_file, [DistillTerm("head", "shared", "shared", loss, calls="all")])
    assert [p.label for p in every.distiller.pairs["head"]] == ["call0", "call1", "call2"]


def test_alike_selectors_get_distinct_connectors_and_log_keys(pyramid_teacher_file, tiny_shapes):
    term = DistillTerm("feat", ["body_out/0", "fpn_out/0"], ["body_out/0", "fpn_out/0"],
                       ChannelWiseDivergence(1.0), connector="conv")  # fmt: skip
    module = _module(pyramid_teacher_file, [term])
    body, fpn = module.distiller.pairs["feat"]
    assert (body.key, fpn.key) == ("feat/body_out_0", "feat/fpn_out_0")
    assert body.connector is not fpn.connector
    assert body.connector[0].in_channels == 4 and body.connector[0].out_channels == 8
    state = module.state_dict()
    assert {"distiller.pairs.feat.0.connector.0.weight", "distiller.pairs.feat.1.connector.0.weight"} <= set(state)
    trainer = _fit(module, tiny_shapes, steps=1)
    logged = trainer.callback_metrics
    assert {"train/distill/feat/body_out_0", "train/distill/feat/fpn_out_0", "train/distill/feat"} <= set(logged)
    assert logged["train/distill/feat/body_out_0"] != logged["train/distill/feat/fpn_out_0"]


# ---------------------------------------------------------------- context: labels and step
class _Spy(nn.Module):
    """Records what the engine passes; needs labels and the step."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[Tensor, int, int]] = []

    def forward(self, student: Tensor, teacher: Tensor, labels: Tensor, step: int, ignore_index: int = -1) -> Tensor:
        self.seen.append((labels.clone(), step, ignore_index))
        return (student - teacher).pow(2).mean()


def test_a_loss_receives_labels_at_the_maps_size_and_the_step(pyramid_teacher_file, tiny_shapes):
    module = _module(pyramid_teacher_file, [DistillTerm("spy", "fpn_out/0", "fpn_out/0", _Spy(), connector="conv")])
    spy = module.distiller.pairs["spy"][0].loss
    spy.seen.clear()  # the probe at build time called it once
    _fit(module, tiny_shapes, steps=2)
    assert [step for _, step, _ in spy.seen] == [0, 1]
    labels, _, ignore_index = spy.seen[0]
    assert labels.shape == (4, 32, 32) and labels.dtype == torch.long and ignore_index == 255
    assert set(labels.unique().tolist()) <= set(range(CLASSES)) | {255}


def test_labels_reach_a_loss_at_the_size_of_the_maps_it_compares(pyramid_teacher_file, tiny_shapes):
    module = _module(pyramid_teacher_file, [DistillTerm("spy", "shared", "shared", _Spy(), calls=1)])  # the /2 level
    spy = module.distiller.pairs["spy"][0].loss
    seen_batches = _Batches()
    _fit(module, tiny_shapes, steps=1, callbacks=[seen_batches])
    labels = spy.seen[-1][0]
    full = seen_batches.masks[0]
    assert full.shape == (4, 32, 32) and labels.shape == (4, 16, 16)
    assert torch.equal(labels, full[:, ::2, ::2])  # nearest: the top-left pixel of each 2×2 cell


class _Batches(L.Callback):
    def __init__(self) -> None:
        self.masks: list[Tensor] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.masks.append(batch[1].clone())


def test_labels_are_nearest_resized_and_keep_the_ignore_index():
    labels = torch.tensor([[[1, 1, 255, 255], [1, 1, 255, 255], [2, 2, 3, 3], [2, 2, 3, 3]]])
    resized = StepContext(labels, 255).labels_at(torch.Size([2, 2]))
    assert resized.tolist() == [[[1, 255], [2, 3]]]
    assert StepContext(labels, 255).labels_at(torch.Size([4, 4])) is labels


def test_what_a_loss_asks_for_is_checked_when_the_term_is_built(pyramid_teacher_file):
    class NeedsAnchors(nn.Module):
        def forward(self, student: Tensor, teacher: Tensor, anchors: Tensor) -> Tensor:
            return student.sum()

    with pytest.raises(TypeError, match=r"NeedsAnchors.forward needs 'anchors'.*labels, ignore_index, step"):
        _module(pyramid_teacher_file, [DistillTerm("x", "shared", "shared", NeedsAnchors(), calls=0)])
    task = SegmentationTask(CLASSES, example_size=32)
    task.has_dense_labels = False  # as a detection task
    with pytest.raises(ValueError, match="IntraClassFeatureVariation needs ground-truth labels, and this task has no"):
        DistillationModule(task, Pyramid(4), Pyramid(8), str(pyramid_teacher_file),
                           [DistillTerm("ifv", "stem", "stem", IntraClassFeatureVariation())])  # fmt: skip


def test_a_shape_the_loss_cannot_compare_fails_at_build_naming_the_fix(pyramid_teacher_file):
    with pytest.raises(ValueError, match=r"student 'stem' gives \(4, 32, 32\) and teacher 'stem' gives \(8, 32, 32\)"
                                         r".*ChannelWiseDivergence refuses.*connector"):  # fmt: skip
        _module(pyramid_teacher_file, [DistillTerm("x", "stem", "stem", ChannelWiseDivergence())])


# ---------------------------------------------------------------- a loss's own modules
def test_a_loss_own_modules_are_built_trained_checkpointed_and_not_exported(
    pyramid_teacher_file, tiny_shapes, tmp_path
):
    terms = [
        DistillTerm("fit", "stem", "stem", FitNets(), weight=10.0),
        DistillTerm("mgd", "fpn_out/1", "fpn_out/1", MaskedGenerativeDistillation(0.5), weight=1e-3),
    ]
    module = _module(pyramid_teacher_file, terms)
    regressor = module.distiller.pairs["fit"][0].loss.regressor
    generator = module.distiller.pairs["mgd"][0].loss.generator
    align = module.distiller.pairs["mgd"][0].loss.align
    assert (regressor.in_channels, regressor.out_channels) == (4, 8) and align.out_channels == 8
    optimised = {id(p) for p in module.trainable_parameters()}
    owned = [*regressor.parameters(), *generator.parameters(), *align.parameters()]
    assert all(id(p) in optimised for p in owned)
    assert not any(id(p) in optimised for p in module.teacher.parameters())
    before = [p.detach().clone() for p in owned]
    trainer = _fit(module, tiny_shapes, steps=1)
    assert all(not torch.equal(p, b) for p, b in zip(owned, before, strict=True))  # one optimiser step moved them

    path = tmp_path / "distilled.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)["state_dict"]
    assert torch.equal(saved["distiller.pairs.fit.0.loss.regressor.weight"], regressor.weight)
    assert not any(key.startswith("teacher.") for key in saved)
    restored = _module(pyramid_teacher_file, terms)
    restored.on_load_checkpoint({"state_dict": saved, "teacher_fingerprint": module.teacher_fingerprint})
    restored.load_state_dict(saved)
    assert torch.equal(restored.distiller.pairs["fit"][0].loss.regressor.weight, regressor.weight)

    from cwd_lightning.analysis.runs import load_student

    config = {"model": {"student": {"class_path": f"{__name__}.Pyramid", "init_args": {"width": 4}}}}
    student = load_student(SimpleNamespace(config=config, checkpoint=lambda name: path), "best")
    assert set(student.state_dict()) == set(module.student.state_dict())  # the export holds the student only


# ---------------------------------------------------------------- a loss's own optimiser
def test_an_adversarial_loss_trains_its_discriminator_with_its_own_optimiser(tiny_shapes, tmp_path):
    from cwd_lightning.models import build_segmentation_model

    torch.manual_seed(0)
    net = partial(build_segmentation_model, "PSPNet", "resnet18", CLASSES, None)
    teacher_path = tmp_path / "t.pt"
    torch.save(net().state_dict(), teacher_path)
    module = DistillationModule(
        SegmentationTask(CLASSES, example_size=64), net(), net(), str(teacher_path),
        [DistillTerm("ho", "segmentation_head", "segmentation_head", HolisticAdversarial(), weight=1e-3)],
        optimizer=partial(torch.optim.SGD, lr=0.01),
    )  # fmt: skip
    assert not module.automatic_optimization
    discriminator = module.distiller.pairs["ho"][0].loss.discriminator
    optimised = {id(p) for p in module.trainable_parameters()}
    assert not any(id(p) in optimised for p in discriminator.parameters())
    d_before = [p.detach().clone() for p in discriminator.parameters()]
    s_before = [p.detach().clone() for p in module.student.parameters()]
    data = SegmentationDataModule(str(tiny_shapes), CLASSES, crop_size=64, base_size=64, batch_size=2, num_workers=0)
    trainer = L.Trainer(max_steps=2, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False)  # fmt: skip
    trainer.fit(module, data)
    assert trainer.global_step == 2  # student updates only: the discriminator's steps do not count
    assert trainer.fit_loop.epoch_loop.batch_progress.current.completed == 2
    assert sum(not torch.equal(p, b) for p, b in zip(discriminator.parameters(), d_before, strict=True)) > 10
    assert any(not torch.equal(p, b) for p, b in zip(module.student.parameters(), s_before, strict=True))
    assert {"train/auxiliary/ho", "train/distill/ho"} <= set(trainer.callback_metrics)
    assert len(trainer.optimizers) == 2 and isinstance(trainer.optimizers[1], torch.optim.Adam)
    assert trainer.optimizers[1].param_groups[0]["lr"] == 4e-4
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 2  # the student's schedule stepped per batch
    path = tmp_path / "ho.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    assert len(checkpoint["optimizer_states"]) == 2 and checkpoint["optimizer_states"][1]["state"]

    # resume: the discriminator, its Adam state, the student's schedule and the step count continue
    resumed = DistillationModule(
        SegmentationTask(CLASSES, example_size=64), net(), net(), str(teacher_path),
        [DistillTerm("ho", "segmentation_head", "segmentation_head", HolisticAdversarial(), weight=1e-3)],
        optimizer=partial(torch.optim.SGD, lr=0.01),
    )  # fmt: skip
    seen = _AtTrainStart()
    trainer = L.Trainer(max_steps=3, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, callbacks=[seen])  # fmt: skip
    trainer.fit(resumed, data, ckpt_path=path)
    key = "distiller.pairs.ho.0.loss.discriminator.last.weight"
    assert torch.equal(seen.state[key], checkpoint["state_dict"][key])
    assert seen.adam_steps == [2.0] and trainer.global_step == 3
    adam = trainer.optimizers[1]
    assert {float(state["step"]) for state in adam.state.values()} == {3.0}
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 3


class _AtTrainStart(L.Callback):
    def on_train_start(self, trainer, module) -> None:
        self.state = {k: v.clone() for k, v in module.state_dict().items()}
        self.adam_steps = sorted({float(s["step"]) for s in trainer.optimizers[1].state.values()})


def test_a_loss_with_its_own_optimiser_must_say_what_it_trains(pyramid_teacher_file):
    class Incomplete(ChannelWiseDivergence):
        auxiliary_optimizer = staticmethod(torch.optim.Adam)

    with pytest.raises(TypeError, match="sets auxiliary_optimizer but has no auxiliary_loss"):
        _module(pyramid_teacher_file, [DistillTerm("x", "fpn_out/0", "fpn_out/0", Incomplete(), connector="conv")])

    class NoLoss(DistillationLoss):  # the base class's auxiliary_loss only raises
        auxiliary_optimizer = staticmethod(torch.optim.Adam)

        def __init__(self) -> None:
            super().__init__()
            self.critic = nn.Linear(1, 1)

        def auxiliary_parameters(self) -> list[nn.Parameter]:
            return list(self.critic.parameters())

        def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
            return (student - teacher).pow(2).mean()

    with pytest.raises(TypeError, match="NoLoss sets auxiliary_optimizer but has no auxiliary_loss"):
        _module(pyramid_teacher_file, [DistillTerm("x", "fpn_out/0", "fpn_out/0", NoLoss(), connector="conv")])


class _LearningRates(L.Callback):
    def __init__(self) -> None:
        self.rates: list[float] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.rates.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_the_module_steps_its_schedule_once_per_training_step(pyramid_teacher_file, tiny_shapes):
    term = DistillTerm("x", "fpn_out/0", "fpn_out/0", ChannelWiseDivergence(), calls=None, connector="conv")
    module = _module(pyramid_teacher_file, [term], lr_schedule="poly", poly_power=0.9)
    rates = _LearningRates()
    _fit(module, tiny_shapes, steps=4, callbacks=[rates])
    assert rates.rates == pytest.approx([0.1 * (1 - k / 4) ** 0.9 for k in range(4)], rel=1e-9)
