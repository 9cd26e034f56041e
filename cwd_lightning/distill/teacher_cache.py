"""A dense teacher-output cache: the teacher's recorded tensors for K fixed augmented views of every
training image, computed once and replayed, so that a distillation step costs the student's step.

Design (a), exact replay: the training loader shows, in epoch e, view e mod K of each image, augmented
from a seed fixed per (run seed, image, view) (``data/sampling.py``), so the cached teacher output is
the teacher's output on exactly the image the student sees: the targets are the live ones (bit for bit
in float32, within float16 rounding in float16). What changes against a live teacher is the
augmentation diversity: K views per image instead of a new one every epoch.

On disk: one ``.npy`` per recorded teacher tensor (images × K × C × H × W, memory-mapped) and
``cache.json``, written last, with the identity and every file's size. The folder is named by a hash of
the identity (teacher fingerprint, training files with sizes and times, transforms, seed, K, dtype,
tensor shapes), so a changed teacher or dataset is never served stale tensors; a file whose size is not
the recorded one (a truncated write) makes the cache be filled again, never read.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from cwd_lightning.distill.teacher import CachedTeacher, LiveTeacher, TeacherOutputs

FORMAT = 1
DTYPES = {"float16": np.float16, "float32": np.float32}
_INDEX = "cache.json"


@dataclass
class TeacherCacheOptions:
    """``model.teacher_cache``: train from the teacher's recorded tensors for ``views`` fixed augmented views
    of every training image, filled once into ``folder`` (default ``~/.cache/cwd_lightning/teacher_cache``),
    stored as ``dtype`` (float32: the live targets bit for bit)."""

    views: int
    folder: str | None = None
    dtype: Literal["float16", "float32"] = "float16"

    def __post_init__(self) -> None:
        if self.views < 1:
            raise ValueError(f"model.teacher_cache.views must be ≥ 1, got {self.views}")
        if self.dtype not in DTYPES:
            raise ValueError(f"model.teacher_cache.dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")


def default_root() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "cwd_lightning" / "teacher_cache"


def _file_name(path: str, call: int) -> str:
    return f"{path.replace('/', '_')}.call{call}.npy"


class TeacherCache:
    """Open (or fill, then open) the cache of ``module``'s teacher over ``datamodule``'s training views."""

    def __init__(self, folder: Path, shapes: dict[str, list[list[int]]], images: int, views: int, dtype: str) -> None:
        self.folder, self.shapes, self.images, self.views, self.dtype = folder, shapes, images, views, dtype
        self.arrays: dict[str, list[np.ndarray]] = {}
        self.fill_seconds: float | None = None

    # ---------------------------------------------------------------- identity and size
    @staticmethod
    def identity(teacher: str, datamodule: Any, views: int, dtype: str, shapes: dict[str, list[list[int]]]) -> dict:
        return {
            "format": FORMAT,
            "teacher": teacher,
            "data": datamodule.cache_identity(),
            "seed": int(os.environ.get("PL_GLOBAL_SEED", 0)),
            "views": views,
            "dtype": dtype,
            "tensors": shapes,
        }

    def file_bytes(self, path: str, call: int) -> int:
        """The data of one tensor's file (its .npy header adds about 128 bytes)."""
        shape = self.shapes[path][call]
        return self.images * self.views * int(np.prod(shape)) * np.dtype(DTYPES[self.dtype]).itemsize

    def recorded_fill_seconds(self) -> float:
        """How long the fill that wrote this cache took (from ``cache.json``; any run that filled it)."""
        return float(json.loads((self.folder / _INDEX).read_text())["fill_seconds"])

    @property
    def size_bytes(self) -> int:
        return sum(self.file_bytes(path, call) for path, calls in self.shapes.items() for call in range(len(calls)))

    # ---------------------------------------------------------------- open
    def is_complete(self) -> bool:
        """``cache.json`` present and every file of the recorded size: else (an interrupted fill, a
        truncated or removed file) the cache is filled again."""
        index = self.folder / _INDEX
        if not index.is_file():
            return False
        try:
            recorded = json.loads(index.read_text())["files"]
        except (OSError, ValueError, KeyError):
            return False
        for name, size in recorded.items():
            file = self.folder / name
            if not file.is_file() or file.stat().st_size != size:
                return False
        return len(recorded) == sum(len(calls) for calls in self.shapes.values())

    def open(self) -> None:
        self.arrays = {
            path: [np.load(self.folder / _file_name(path, call), mmap_mode="r") for call in range(len(calls))]
            for path, calls in self.shapes.items()
        }

    def lookup(self, keys: Tensor, device: torch.device) -> dict[str, list[Tensor]]:
        """The recorded teacher outputs for a batch's ``[index, view]`` keys, as float32 on ``device``."""
        index, view = keys[:, 0].cpu().numpy(), keys[:, 1].cpu().numpy()
        return {
            path: [torch.from_numpy(np.ascontiguousarray(array[index, view])).to(device).float() for array in arrays]
            for path, arrays in self.arrays.items()
        }

    # ---------------------------------------------------------------- fill
    def fill(self, run_teacher, loader, identity: dict) -> None:
        """Run the teacher over every view once (``run_teacher(batch) -> {path: [tensor per call]}``) and
        write the arrays, then ``cache.json``. Refuses when the disk cannot hold the cache."""
        free = shutil.disk_usage(self.folder.parent if self.folder.parent.exists() else Path.cwd()).free
        if self.size_bytes > free:
            raise OSError(
                f"the teacher cache needs {self.size_bytes / 2**30:.2f} GiB in {self.folder} but only "
                f"{free / 2**30:.2f} GiB are free: free space, set model.teacher_cache.folder to another disk, "
                "use fewer views (model.teacher_cache.views) or float16"
            )
        if self.folder.exists():
            shutil.rmtree(self.folder)  # an incomplete or damaged cache: never read, filled again
        self.folder.mkdir(parents=True)
        start = time.perf_counter()
        arrays = {
            path: [
                np.lib.format.open_memmap(
                    self.folder / _file_name(path, call),
                    mode="w+",
                    dtype=DTYPES[self.dtype],
                    shape=(self.images, self.views, *shape),
                )
                for call, shape in enumerate(calls)
            ]
            for path, calls in self.shapes.items()
        }
        for batch in tqdm(loader, desc=f"filling the teacher cache ({self.size_bytes / 2**20:.0f} MiB)", unit="batch"):
            keys = batch[-1]
            outputs = run_teacher(batch)
            index, view = keys[:, 0].numpy(), keys[:, 1].numpy()
            for path, tensors in outputs.items():
                for array, tensor in zip(arrays[path], tensors, strict=True):
                    array[index, view] = tensor.detach().float().cpu().numpy().astype(DTYPES[self.dtype])
        files = {}
        for path, calls in arrays.items():
            for call, array in enumerate(calls):
                array.flush()
                del array
                name = _file_name(path, call)
                files[name] = (self.folder / name).stat().st_size
        self.fill_seconds = time.perf_counter() - start
        record = {**identity, "files": files, "fill_seconds": self.fill_seconds}
        temporary = self.folder / (_INDEX + ".tmp")
        temporary.write_text(json.dumps(record, indent=1))
        os.replace(temporary, self.folder / _INDEX)  # the cache exists only once everything is written


def cache_folder(root: Path, identity: dict) -> Path:
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]
    return root / digest


def open_cache(options: TeacherCacheOptions, live: Any, fingerprint: str, trainer: Any, device: Any) -> TeacherCache:
    """The cache of this teacher (``live``: a ``LiveTeacher``), data and views: found, or filled on rank 0 when
    missing or damaged (the other ranks wait, then read the same files), and opened."""
    data = trainer.datamodule
    loader = data.views_loader(batch_size=data.batch_size)
    first = next(iter(loader))
    first = (first[0].to(device), *first[1:])
    shapes = {path: [list(t.shape[1:]) for t in calls] for path, calls in live.outputs(first).items()}
    identity = TeacherCache.identity(fingerprint, data, options.views, options.dtype, shapes)
    root = Path(options.folder) if options.folder else default_root()
    cache = TeacherCache(cache_folder(root, identity), shapes, len(data.train_set), options.views, options.dtype)
    if trainer.is_global_zero and not cache.is_complete():
        cache.fill(lambda batch: live.outputs((batch[0].to(device), *batch[1:])), loader, identity)
    trainer.strategy.barrier("teacher_cache")
    if not cache.is_complete():
        raise RuntimeError(f"the teacher cache {cache.folder} is incomplete after filling it")
    cache.open()
    return cache


def cached_teacher_outputs(options: TeacherCacheOptions, live_teachers: dict[str, LiveTeacher],
                           fingerprints: dict[str, str], trainer: Any, device: Any) -> TeacherOutputs:  # fmt: skip
    """Each teacher's cache, on its own (``open_cache``: keyed by that teacher's fingerprint), as the source of
    the training steps' teacher tensors; the caches' folders, size and fill time logged."""
    caches = {name: open_cache(options, live, fingerprints[name], trainer, device)
              for name, live in live_teachers.items()}  # fmt: skip
    log_caches(trainer.loggers, caches)
    sources = [CachedTeacher(cache, live_teachers[name].recorder) for name, cache in caches.items()]
    return TeacherOutputs(sources, cached=True)


def log_caches(loggers: list[Any], caches: dict[str, TeacherCache]) -> None:
    """The caches' folders (config), their total size and fill time (``teacher_cache/*`` at step 0)."""
    folders = {"teacher_cache/folder" + ("" if name == "teacher" else f"/{name}"): str(cache.folder)
               for name, cache in caches.items()}  # fmt: skip
    size = sum(cache.size_bytes for cache in caches.values()) / 2**20
    fill = sum(cache.recorded_fill_seconds() for cache in caches.values())
    for logger in loggers:
        logger.log_hyperparams(folders)
        logger.log_metrics({"teacher_cache/size_mib": size, "teacher_cache/fill_seconds": fill}, step=0)


def serve_cache_views(options: TeacherCacheOptions, datamodule: Any) -> None:
    """Have the training data serve the cache's fixed augmented views, each batch with its cache keys."""
    if not hasattr(datamodule, "use_teacher_views"):
        raise ValueError(f"model.teacher_cache needs a data module that serves fixed augmented views "
                         f"(SegmentationDataModule); {type(datamodule).__name__} does not")  # fmt: skip
    datamodule.use_teacher_views(options.views)
