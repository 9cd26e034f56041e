"""A dense teacher-output cache: the teacher's recorded tensors for K fixed augmented views of every
training image, computed once and replayed, so that a distillation step costs the student's step.

Design (a), exact replay: the training loader shows, in epoch e, view e mod K of each image, augmented
from a seed fixed per (cache seed, image, view) (``data/sampling.py``), so the cached teacher output is
the teacher's output on exactly the image the student sees: the targets are the live ones (bit for bit
in float32, within float16 rounding in float16). What changes against a live teacher is the
augmentation diversity: K views per image instead of a new one every epoch. The cache seed is not the
run's: every run and seed of a sweep that distils the same teacher tensors reads one cache.

On disk: one ``.npy`` per recorded teacher tensor (images × K × C × H × W, memory-mapped) and
``cache.json``, written last, with the identity and every file's size. The folder is named by a hash of
the identity (teacher fingerprint, training files with sizes and times, transforms, seed, K, dtype,
tensor shapes), so a changed teacher or dataset is never served stale tensors; a file whose size is not
the recorded one (a truncated write) makes the cache be filled again, never read. A view's tensors are read
in the training loader's workers (``read``), each process opening the memory maps once.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

FORMAT = 1
DTYPES = {"float16": np.float16, "float32": np.float32}
_INDEX = "cache.json"


def default_root() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "cwd_lightning" / "teacher_cache"


def _file_name(path: str, call: int) -> str:
    return f"{path.replace('/', '_')}.call{call}.npy"


class TeacherCache:
    """One teacher's cache folder: the shapes of its arrays, its size, whether it is complete, its fill and the
    reads of one view."""

    def __init__(self, folder: Path, shapes: dict[str, list[list[int]]], images: int, views: int, dtype: str) -> None:
        self.folder, self.shapes, self.images, self.views, self.dtype = folder, shapes, images, views, dtype
        self.arrays: dict[str, list[np.ndarray]] = {}
        self.fill_seconds: float | None = None

    # ---------------------------------------------------------------- identity and size
    @staticmethod
    def identity(teacher: str, datamodule: Any, views: int, dtype: str, shapes: dict[str, list[list[int]]],
                 seed: int = 0, precision: str = "32") -> dict:  # fmt: skip
        """What decides the cached values: the teacher (its fingerprint and the precision it runs in), the data and
        its augmentations, the views' seed, K, the dtype and the tensors."""
        return {
            "format": FORMAT,
            "teacher": teacher,
            "teacher_precision": precision,
            "data": datamodule.cache_identity(),
            "seed": seed,
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
        """Memory-map the arrays (in each process that reads: a loader worker opens its own)."""
        self.arrays = {
            path: [np.load(self.folder / _file_name(path, call), mmap_mode="r") for call in range(len(calls))]
            for path, calls in self.shapes.items()
        }

    def read(self, index: int, view: int) -> dict[str, list[Tensor]]:
        """The recorded teacher tensors of one view of one image, in the stored dtype (copied out of the maps)."""
        if not self.arrays:
            self.open()
        return {path: [torch.from_numpy(np.array(array[index, view])) for array in arrays]
                for path, arrays in self.arrays.items()}  # fmt: skip

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "arrays": {}}  # a loader worker maps the files itself, never a pickled copy

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
            keys = batch[-1]["keys"]
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
