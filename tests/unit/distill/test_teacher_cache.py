"""The teacher cache: targets equal to the live teacher's, the float16 error bounded, keyed by teacher and data,
truncated files refilled, the disk space checked, the teacher never run from the cache."""

from __future__ import annotations

import json
import shutil

import lightning as L
import numpy as np
import pytest
import torch

from cwd_lightning.distill import CachedTeacher, TeacherCacheOptions
from tests.helpers import cwd_module, tiny_datamodule


def _fit(teacher_file, data_root, cache_dir, steps=3, dtype="float32", views=2):
    module = cwd_module(teacher_file, teacher_cache=TeacherCacheOptions(views, str(cache_dir), dtype))
    data = tiny_datamodule(data_root)
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        limit_val_batches=0, enable_model_summary=False)  # fmt: skip
    trainer.fit(module, data)
    return module, data


def _cache(module):
    """The cache the module's training steps read (a cached run's teacher-output source)."""
    assert module.training_outputs.cached
    (source,) = module.training_outputs.sources
    assert isinstance(source, CachedTeacher)
    return source.cache


def _live_and_cached(module, data, batches=3):
    """For training batches (images, masks, keys): the live teacher's tensors and the cache's."""
    pairs = []
    for batch, _ in zip(data.train_dataloader(), range(batches), strict=False):
        live = module.live_teachers["teacher"].outputs(batch[:2])
        cached = _cache(module).lookup(batch[2], torch.device("cpu"))
        pairs.append((live, cached, batch[2]))
    return pairs


def test_cached_targets_equal_the_live_teacher_on_the_same_views(teacher_file, tiny_shapes, tmp_path):
    module, data = _fit(teacher_file, tiny_shapes, tmp_path / "cache")
    cache = _cache(module)
    assert cache is not None and (cache.folder / "cache.json").is_file()
    assert cache.arrays["segmentation_head"][0].shape == (24, 2, 11, 32, 32)
    for epoch in (0, 1, 2):  # views 0, 1, 0: every epoch replays a stored view
        data.train_dataloader().sampler.set_epoch(epoch)
        loader = data.train_dataloader()
        loader.sampler.set_epoch(epoch)
        for batch, _ in zip(loader, range(2), strict=False):
            assert set(batch[2][:, 1].tolist()) == {epoch % 2}
            live = module.live_teachers["teacher"].outputs(batch[:2])["segmentation_head"][0]
            cached = cache.lookup(batch[2], torch.device("cpu"))["segmentation_head"][0]
            assert torch.equal(live, cached)  # float32: bit for bit


def test_float16_cache_error_is_bounded(teacher_file, tiny_shapes, tmp_path):
    module, data = _fit(teacher_file, tiny_shapes, tmp_path / "cache", dtype="float16")
    for live, cached, _ in _live_and_cached(module, data):
        live, cached = live["segmentation_head"][0], cached["segmentation_head"][0]
        # float16 keeps 11 significant bits: relative error ≤ 2^-11 of each value (plus subnormals)
        assert (live - cached).abs().max() <= live.abs().max() * 2**-10
        loss = module.distiller.terms[0].loss
        kl = float(loss(cached, live))  # CWD between the replayed and the live map: ~0
        assert kl < 1e-4


def test_the_cache_is_reused_and_keyed_by_teacher_and_data(teacher_file, tiny_shapes, tmp_path):
    root = tmp_path / "cache"
    first, _ = _fit(teacher_file, tiny_shapes, root)
    stamp = (_cache(first).folder / "cache.json").stat().st_mtime_ns
    again, _ = _fit(teacher_file, tiny_shapes, root)
    assert _cache(again).folder == _cache(first).folder
    assert (_cache(again).folder / "cache.json").stat().st_mtime_ns == stamp  # read, not filled again

    other_teacher = tmp_path / "other.pt"
    state = torch.load(teacher_file, weights_only=True)
    torch.save({k: v * 1.01 if v.is_floating_point() else v for k, v in state.items()}, other_teacher)
    changed_teacher, _ = _fit(other_teacher, tiny_shapes, root)
    assert _cache(changed_teacher).folder != _cache(first).folder

    data = tmp_path / "shapes"
    shutil.copytree(tiny_shapes, data)
    name = (data / "ImageSets" / "Segmentation" / "train.txt").read_text().split()[0]
    image = data / "JPEGImages" / f"{name}.jpg"
    image.write_bytes(image.read_bytes())  # same pixels, a new modification time: another dataset state
    changed_data, _ = _fit(teacher_file, data, root)
    assert _cache(changed_data).folder not in (_cache(first).folder, _cache(changed_teacher).folder)
    assert len([p for p in root.iterdir() if p.is_dir()]) == 3


def test_a_truncated_cache_file_is_refilled_never_read(teacher_file, tiny_shapes, tmp_path):
    first, _ = _fit(teacher_file, tiny_shapes, tmp_path / "cache")
    folder = _cache(first).folder
    array_file = next(folder.glob("*.npy"))
    array_file.write_bytes(array_file.read_bytes()[: array_file.stat().st_size // 2])  # a crash mid-write
    again, data = _fit(teacher_file, tiny_shapes, tmp_path / "cache")
    assert _cache(again).folder == folder and _cache(again).is_complete()
    recorded = json.loads((folder / "cache.json").read_text())["files"]
    assert array_file.stat().st_size == recorded[array_file.name]
    for live, cached, _ in _live_and_cached(again, data, batches=1):
        assert torch.equal(live["segmentation_head"][0], cached["segmentation_head"][0])


def test_a_cache_larger_than_the_free_disk_is_refused(teacher_file, tiny_shapes, tmp_path, monkeypatch):
    import collections

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(OSError, match=r"the teacher cache needs 0\.00 GiB .* but only 0\.00 GiB are free"):
        _fit(teacher_file, tiny_shapes, tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*/cache.json")) if (tmp_path / "cache").exists() else True


def test_training_from_the_cache_never_runs_the_teacher(teacher_file, tiny_shapes, tmp_path):
    calls = []
    module = cwd_module(teacher_file, teacher_cache=TeacherCacheOptions(2, str(tmp_path / "cache")))
    module.teacher.register_forward_hook(lambda *args: calls.append(module.trainer.global_step))
    trainer = L.Trainer(max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        limit_val_batches=0, enable_model_summary=False)  # fmt: skip
    trainer.fit(module, tiny_datamodule(tiny_shapes))
    assert np.load(next(_cache(module).folder.glob("*.npy")), mmap_mode="r").shape[:2] == (24, 2)
    # one forward for the tensors' shapes, 12 batches of 4 to fill 24 images × 2 views, none in the 4 steps
    assert trainer.global_step == 4 and calls == [0] * 13


def test_design_b_replay_equals_live_for_a_teacher_that_commutes_with_the_augmentation():
    """The replay of design (b) (make bench's replay_error) resizes, crops and flips the un-augmented map as
    the image: for a pointwise linear teacher (a 1×1 convolution) that is exactly the live output, so what
    replay_error measures for a real teacher is the approximation, not the geometry."""
    import random

    from cwd_lightning.bench.replay_error import _augment, _draw

    torch.manual_seed(0)
    teacher = torch.nn.Conv2d(3, 5, 1)
    image = torch.rand(3, 40, 56)
    rng = random.Random(1)
    for _ in range(5):
        params = _draw(40, 56, 30, 60, 32, rng)
        with torch.no_grad():
            live = teacher(_augment(image, **params)[None])[0]
            replay = _augment(teacher(image[None])[0], **params)
        valid = _augment(torch.ones(1, 40, 56), **params)[0] > 0.5
        assert torch.allclose(live[:, valid], replay[:, valid], atol=1e-5)
