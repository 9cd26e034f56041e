"""Several teachers: each term reads the teacher it names, every teacher stays frozen and out of the checkpoints,
a changed one is named on resume, a cached run caches each, and misdeclared teachers fail naming the key."""

from __future__ import annotations

from functools import partial

import lightning as L
import pytest
import torch

from cwd_lightning.distill import CachedTeacher, DistillationModule, DistillTerm, StepContext, TeacherCacheOptions
from cwd_lightning.distill.teacher import combined_fingerprint, fingerprint
from cwd_lightning.losses import ChannelWiseDivergence, CosineDistance
from cwd_lightning.tasks import SegmentationTask
from tests.helpers import tiny_datamodule, tiny_segmenter


def _terms():
    return [
        DistillTerm("cwd_logits", "segmentation_head", "segmentation_head", ChannelWiseDivergence(4.0), 3.0),
        DistillTerm("unet_logits", "segmentation_head", "segmentation_head", ChannelWiseDivergence(1.0), 1.0,
                    from_teacher="unet"),
        DistillTerm("unet_features", "decoder", "decoder", CosineDistance(), 1.0, connector="conv",
                    resize="student_to_teacher", from_teacher="unet"),
    ]  # fmt: skip


def _module(teacher_file, unet_file, terms=None, teachers=None, checkpoints=None, **kwargs) -> DistillationModule:
    """PSPNet-R18 taught by the FPN-R18 in ``teacher_file`` (model.teacher) and the U-Net-R18 in ``unet_file``."""
    return DistillationModule(
        task=SegmentationTask(11, example_size=32), student=tiny_segmenter(),
        teacher=tiny_segmenter("FPN", "resnet18"), teacher_checkpoint=str(teacher_file),
        teachers=teachers if teachers is not None else {"unet": tiny_segmenter("Unet", "resnet18")},
        teacher_checkpoints=checkpoints if checkpoints is not None else {"unet": str(unet_file)},
        terms=terms if terms is not None else _terms(), optimizer=partial(torch.optim.AdamW, lr=1e-3), **kwargs,
    )  # fmt: skip


def _trainer(steps: int = 2, **kwargs) -> L.Trainer:
    return L.Trainer(max_steps=steps, limit_val_batches=0, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, **kwargs)  # fmt: skip


def test_each_term_reads_the_teacher_it_names(teacher_file, unet_teacher):
    module = _module(teacher_file, unet_teacher)
    unet = module.teachers["unet"]
    assert sorted(module.all_teachers()) == ["teacher", "unet"]
    assert {pair.key: pair.teacher_name for pair in module.distiller.iter_pairs()} == {
        "cwd_logits": "teacher", "unet_logits": "unet", "unet_features": "unet"}  # fmt: skip
    assert module.distiller.pairs["unet_features"][0].connector[0].out_channels == 16  # the U-Net decoder's width
    assert torch.equal(unet.state_dict()["segmentation_head.0.weight"],
                       torch.load(unet_teacher)["segmentation_head.0.weight"])  # fmt: skip

    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), module.distiller.recording():
        student, fpn, unet_logits = module.student(images), module.teacher(images), unet(images)
        _, values, _ = module.distiller.compute(StepContext())
    assert float(values["cwd_logits"]) == pytest.approx(float(ChannelWiseDivergence(4.0)(student, fpn)), rel=1e-6)
    assert float(values["unet_logits"]) == pytest.approx(float(ChannelWiseDivergence(1.0)(student, unet_logits)),
                                                         rel=1e-6)  # fmt: skip
    assert float(values["cwd_logits"]) != pytest.approx(float(ChannelWiseDivergence(4.0)(student, unet_logits)))


def test_every_teacher_stays_frozen_and_out_of_the_checkpoints(teacher_file, unet_teacher, tiny_shapes):
    module = _module(teacher_file, unet_teacher)
    before = {name: {k: v.clone() for k, v in teacher.state_dict().items()}
              for name, teacher in module.all_teachers().items()}  # fmt: skip
    _trainer(3).fit(module, tiny_datamodule(tiny_shapes))
    for name, teacher in module.all_teachers().items():
        assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
        assert all(torch.equal(v, before[name][k]) for k, v in teacher.state_dict().items()), name  # BN stats too
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert any(k.startswith("student.") for k in checkpoint["state_dict"])
    assert not any(k.startswith(("teacher.", "teachers.")) for k in checkpoint["state_dict"])
    fingerprints = {"teacher": fingerprint(module.teacher), "unet": fingerprint(module.teachers["unet"])}
    assert checkpoint["teacher_fingerprints"] == fingerprints
    assert checkpoint["teacher_fingerprint"] == combined_fingerprint(fingerprints) not in fingerprints.values()

    module.on_load_checkpoint(checkpoint)  # same teachers: both restored for a strict load
    assert module.load_state_dict(checkpoint["state_dict"]) is not None
    assert any(k.startswith("teachers.unet.") for k in checkpoint["state_dict"])


def test_resume_refuses_a_changed_second_teacher_and_names_it(teacher_file, unet_teacher, tmp_path):
    saved = {"state_dict": {}}
    _module(teacher_file, unet_teacher).on_save_checkpoint(saved)
    torch.manual_seed(7)
    other = tmp_path / "other_unet.pt"
    torch.save(tiny_segmenter("Unet", "resnet18").state_dict(), other)
    with pytest.raises(ValueError, match=r"teacher does not match .* \(teacher 'unet'\)"):
        _module(teacher_file, other).on_load_checkpoint(dict(saved))
    with pytest.raises(ValueError, match=r"\(teacher 'unet'\)"):  # removed: a different set of teachers
        _module(teacher_file, unet_teacher, terms=_terms()[:1], teachers={}, checkpoints={}).on_load_checkpoint(
            dict(saved))  # fmt: skip


def test_a_cached_run_caches_each_teacher_on_its_own(teacher_file, unet_teacher, tiny_shapes, tmp_path):
    options = TeacherCacheOptions(1, str(tmp_path / "cache"), "float32")
    module = _module(teacher_file, unet_teacher, teacher_cache=options)
    data = tiny_datamodule(tiny_shapes)
    _trainer(2).fit(module, data)
    sources = module.training_outputs.sources
    assert module.training_outputs.cached and all(isinstance(source, CachedTeacher) for source in sources)
    assert [source.name for source in sources] == list(module.live_teachers) == ["teacher", "unet"]
    folders = {cache.folder for cache in module.teacher_caches.values()}
    assert len(folders) == 2 and all((folder / "cache.json").is_file() for folder in folders)
    batch = next(iter(data.train_dataloader()))
    for name in module.live_teachers:
        live = module.live_teachers[name].outputs(batch[:2])
        cached = batch[-1]["teacher"][name]  # read by the loader with each image
        assert sorted(live) == sorted(cached)
        assert all(torch.equal(live[path][0], cached[path][0]) for path in live), name  # float32: bit for bit


def test_misdeclared_teachers_fail_naming_the_key(teacher_file, unet_teacher):
    term = DistillTerm("x", "segmentation_head", "segmentation_head", ChannelWiseDivergence(1.0), from_teacher="vit")
    with pytest.raises(ValueError, match=r"term 'x': from_teacher 'vit' is not a teacher of this run "
                                         r"\(teachers: teacher, unet\)"):  # fmt: skip
        _module(teacher_file, unet_teacher, terms=[term])
    with pytest.raises(ValueError, match=r"model.teachers.unet: read by no term"):
        _module(teacher_file, unet_teacher, terms=_terms()[:1])
    with pytest.raises(ValueError, match=r"^model.teacher: read by no term"):
        _module(teacher_file, unet_teacher, terms=_terms()[1:])
    with pytest.raises(ValueError, match=r"model.teachers are set but model.terms are not"):
        _module(teacher_file, unet_teacher, terms=[])
    with pytest.raises(ValueError, match=r"model.teacher_checkpoints: model.teacher's weights go in"):
        _module(teacher_file, unet_teacher, checkpoints={"unet": str(unet_teacher), "teacher": str(teacher_file)})
    with pytest.raises(ValueError, match=r"model.teacher_checkpoints: vit names no teacher"):
        _module(teacher_file, unet_teacher, checkpoints={"unet": str(unet_teacher), "vit": str(unet_teacher)})
    with pytest.raises(ValueError, match=r"model.teachers.unet is set but model.teacher_checkpoints.unet is not"):
        _module(teacher_file, unet_teacher, checkpoints={})
    with pytest.raises(ValueError, match=r"the name 'teacher' is model.teacher's"):
        _module(teacher_file, unet_teacher, teachers={"teacher": tiny_segmenter("Unet", "resnet18")})
