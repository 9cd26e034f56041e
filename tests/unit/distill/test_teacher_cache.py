"""The teacher cache: targets equal to the live teacher's, the float16 error bounded, keyed by teacher and data,
truncated files refilled, the disk space checked, the teacher never run from the cache."""

from __future__ import annotations

import csv
import json
import shutil

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from cwd_lightning.data.sampling import view_seed
from cwd_lightning.distill import CachedTeacher, TeacherCacheOptions
from tests.helpers import cwd_module, tiny_datamodule


def _fit(teacher_file, data_root, cache_dir, steps=3, dtype="float32", views=2, **options):
    module = cwd_module(teacher_file, teacher_cache=TeacherCacheOptions(views, str(cache_dir), dtype, **options))
    data = tiny_datamodule(data_root)
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        limit_val_batches=0, enable_model_summary=False)  # fmt: skip
    trainer.fit(module, data)
    return module, data


def _cache(module):
    """The cache the module's training steps read (a cached run's teacher-output source)."""
    assert module.training_outputs.cached
    (source,) = module.training_outputs.sources
    assert isinstance(source, CachedTeacher) and source.name == "teacher"
    return module.teacher_caches["teacher"]


def _array(cache):
    return np.load(next(cache.folder.glob("*.npy")), mmap_mode="r")


def _live_and_cached(module, data, batches=3):
    """For training batches (images, masks, cache entry): the live teacher's tensors and those the loader brought
    with the batch from the cache (in the stored dtype)."""
    pairs = []
    for batch, _ in zip(data.train_dataloader(), range(batches), strict=False):
        live = module.live_teachers["teacher"].outputs(batch[:2])
        pairs.append((live, batch[-1]["teacher"]["teacher"], batch[-1]["keys"]))
    return pairs


def test_cached_targets_equal_the_live_teacher_on_the_same_views(teacher_file, tiny_shapes, tmp_path):
    module, data = _fit(teacher_file, tiny_shapes, tmp_path / "cache")
    cache = _cache(module)
    assert cache is not None and (cache.folder / "cache.json").is_file()
    assert _array(cache).shape == (24, 2, 11, 32, 32)
    for epoch in (0, 1, 2):  # views 0, 1, 0: every epoch replays a stored view
        loader = data.train_dataloader()
        loader.sampler.set_epoch(epoch)
        for batch, _ in zip(loader, range(2), strict=False):
            entry = batch[-1]
            assert set(entry["keys"][:, 1].tolist()) == {epoch % 2}
            live = module.live_teachers["teacher"].outputs(batch[:2])["segmentation_head"][0]
            cached = entry["teacher"]["teacher"]["segmentation_head"][0]
            assert torch.equal(live, cached)  # float32: bit for bit


def test_float16_cache_error_is_bounded(teacher_file, tiny_shapes, tmp_path):
    module, data = _fit(teacher_file, tiny_shapes, tmp_path / "cache", dtype="float16")
    for live, cached, _ in _live_and_cached(module, data):
        live, cached = live["segmentation_head"][0], cached["segmentation_head"][0]
        assert cached.dtype == torch.float16  # the loader brings the stored dtype; the step upcasts on its device
        cached = cached.float()
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
    assert _array(_cache(module)).shape[:2] == (24, 2)
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


def test_the_views_are_the_cache_seeds_so_runs_of_every_seed_share_one_cache(
    teacher_file, tiny_shapes, tmp_path, monkeypatch
):
    """The run seed orders the data; the cache seed alone draws the views: a second seed reads the first one's cache
    (not filled again) and sees the same augmented view of an image in another order."""
    first, first_data = _fit(teacher_file, tiny_shapes, tmp_path / "cache")
    stamp = (_cache(first).folder / "cache.json").stat().st_mtime_ns
    monkeypatch.setenv("PL_GLOBAL_SEED", "1")
    second, second_data = _fit(teacher_file, tiny_shapes, tmp_path / "cache")
    assert _cache(second).folder == _cache(first).folder
    assert (_cache(second).folder / "cache.json").stat().st_mtime_ns == stamp
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")
    images = {}
    for seed, data in (("0", first_data), ("1", second_data)):
        monkeypatch.setenv("PL_GLOBAL_SEED", seed)
        batch = next(iter(data.train_dataloader()))
        images[seed] = {tuple(key.tolist()): image for key, image in zip(batch[-1]["keys"], batch[0], strict=True)}
    assert list(images["0"]) != list(images["1"])  # another order
    first_loader = first_data.train_dataloader()
    for key, image in images["1"].items():  # the same view of an image is the same augmented image
        index, view = key
        item = (index, view_seed(0, index, view), view)
        assert torch.equal(first_loader.dataset[item][0], image)
    other_seed, _ = _fit(teacher_file, tiny_shapes, tmp_path / "cache", seed=5)  # another cache seed: other views
    assert _cache(other_seed).folder != _cache(first).folder
    per_run = {}  # seed: run, each run seed its own draw and its own cache (seed 0's equals the cache seed 0)
    for seed in ("0", "1"):
        monkeypatch.setenv("PL_GLOBAL_SEED", seed)
        per_run[seed] = _cache(_fit(teacher_file, tiny_shapes, tmp_path / "cache", seed="run")[0]).folder
    assert per_run["0"] == _cache(first).folder and per_run["1"] not in (
        _cache(first).folder,
        _cache(other_seed).folder,
    )


def test_views_epochs_is_one_view_per_epoch_of_the_schedule(teacher_file, tiny_shapes, tmp_path):
    module, _ = _fit(teacher_file, tiny_shapes, tmp_path / "cache", steps=8, views="epochs")
    assert _array(_cache(module)).shape[:2] == (24, 2)  # 24 images / batch 4 = 6 steps an epoch: 8 steps, 2 epochs
    with pytest.raises(ValueError, match=r"views must be a number ≥ 1 or 'epochs', got 'all'"):
        TeacherCacheOptions("all")


def test_two_runs_that_need_one_cache_fill_it_once(tmp_path):
    """Rows of a sweep side by side (two threads here, each with its own lock handle, as two processes have): the
    second waits on the lock, then reads what the first wrote."""
    import threading
    import time

    from cwd_lightning.distill.cached_run import fill_once
    from cwd_lightning.distill.teacher_cache import TeacherCache

    folder = tmp_path / "cache" / "digest"
    outputs = {"head": [torch.arange(6.0).reshape(2, 3)]}
    keys = torch.tensor([[0, 0], [1, 0]])
    filled = []

    def fill(cache):
        time.sleep(0.3)  # long enough for the other thread to reach the lock
        cache.fill(lambda _: outputs, [(None, {"keys": keys})], identity={"test": 1})

    def run():
        cache = TeacherCache(folder, {"head": [[3]]}, images=2, views=1, dtype="float32")
        filled.append(fill_once(cache, lambda: fill(cache)))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(filled) == [False, True]
    cache = TeacherCache(folder, {"head": [[3]]}, images=2, views=1, dtype="float32")
    assert torch.equal(cache.read(1, 0)["head"][0], torch.tensor([3.0, 4.0, 5.0]))


def test_a_cached_step_refuses_a_batch_without_the_teachers_tensors(teacher_file):
    source = CachedTeacher("teacher", cwd_module(teacher_file).live_teachers["teacher"].recorder)
    with pytest.raises(RuntimeError, match=r"carries no cached tensors of teacher 'teacher'"):
        source.record((torch.zeros(1, 3, 8, 8), torch.zeros(1, 8, 8), {"keys": torch.zeros(1, 2)}))


@pytest.mark.parametrize(
    ("every", "batches", "monitor_every", "expected"),
    [(2, 1, None, [(2, 0), (4, 0)]), (None, None, None, []), (None, None, 3, [(3, 0), (3, 1)]), (1, None, None,
     [(v, b) for v in (1, 2, 3, 4) for b in (0, 1)])],
)  # fmt: skip
def test_a_cached_fit_validates_with_the_teacher_only_when_asked(
    teacher_file, tiny_shapes, tmp_path, every, batches, monitor_every, expected
):
    """Every ``validation_every``-th validation (default: the channel monitor's cadence, never without one), its
    first ``validation_batches``; the student's metrics at every validation."""
    from cwd_lightning.callbacks import ChannelDistributionMonitor

    options = TeacherCacheOptions(2, str(tmp_path / "cache"), validation_every=every, validation_batches=batches)
    module = cwd_module(teacher_file, teacher_cache=options)
    calls, batch_index = [], [None]
    watcher = L.Callback()
    watcher.on_validation_batch_start = lambda trainer, module, batch, index, *_: batch_index.__setitem__(0, index)
    module.teacher.register_forward_hook(
        lambda *args: calls.append((module.validations_run, batch_index[0])) if module.trainer.validating else None
    )
    callbacks = [watcher, *([ChannelDistributionMonitor(every_n_epochs=monitor_every)] if monitor_every else [])]
    logger = CSVLogger(tmp_path / "logs", name="", version="")
    trainer = L.Trainer(max_steps=4, val_check_interval=1, limit_val_batches=2, num_sanity_val_steps=0, logger=logger,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=callbacks)  # fmt: skip
    data = tiny_datamodule(tiny_shapes)
    data.val_batch_size = 4  # two validation batches of the 8 images
    trainer.fit(module, data)
    assert calls == expected
    with open(tmp_path / "logs" / "metrics.csv", newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("val/mIoU")]
    assert len(rows) == 4  # the student's metrics at every validation
    with_distill = [index + 1 for index, row in enumerate(rows) if row.get("val/distill/cwd_logits")]
    assert with_distill == sorted({validation for validation, _ in expected})


def test_a_loader_worker_reads_the_cache_and_a_pickled_cache_maps_its_files_anew(teacher_file, tiny_shapes, tmp_path):
    """The tensors come from a worker process, equal to the live teacher's; a cache sent to a worker is sent
    without its memory maps (each process maps the files itself)."""
    import pickle

    module = cwd_module(teacher_file, teacher_cache=TeacherCacheOptions(2, str(tmp_path / "cache"), "float32"))
    data = tiny_datamodule(tiny_shapes)
    data.num_workers = 1
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        limit_val_batches=0, enable_model_summary=False)  # fmt: skip
    trainer.fit(module, data)
    loader = data.train_dataloader()
    assert loader.num_workers == 1
    batch = next(iter(loader))
    live = module.live_teachers["teacher"].outputs(batch[:2])["segmentation_head"][0]
    assert torch.equal(batch[-1]["teacher"]["teacher"]["segmentation_head"][0], live)
    cache = _cache(module)
    cache.read(0, 1)  # maps the files in this process
    assert cache.arrays and pickle.loads(pickle.dumps(cache)).arrays == {}
    copy = pickle.loads(pickle.dumps(cache))
    assert torch.equal(copy.read(3, 1)["segmentation_head"][0], cache.read(3, 1)["segmentation_head"][0])


def test_a_cached_run_under_mixed_precision_reads_the_targets_its_live_teacher_gives(teacher_file, tiny_shapes,
                                                                                      tmp_path):  # fmt: skip
    """teacher_precision auto: the cache is filled under the trainer's precision, as the live steps run the
    teacher (bf16 autocast here), and that precision is part of its identity."""
    module = cwd_module(teacher_file, teacher_cache=TeacherCacheOptions(2, str(tmp_path / "cache"), "float32"))
    data = tiny_datamodule(tiny_shapes)
    trainer = L.Trainer(max_steps=1, precision="bf16-mixed", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, limit_val_batches=0, enable_model_summary=False)  # fmt: skip
    trainer.fit(module, data)
    assert json.loads((_cache(module).folder / "cache.json").read_text())["teacher_precision"] == "bf16-mixed"
    batch = next(iter(data.train_dataloader()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        live = module.live_teachers["teacher"].outputs(batch[:2])["segmentation_head"][0]
    cached = batch[-1]["teacher"]["teacher"]["segmentation_head"][0]
    assert live.dtype == torch.bfloat16 and torch.equal(cached, live.float())
