"""Read every sample of a split once before the first step, so that a broken image or mask is found
now, all of them at once, and not at hour ten when it is first loaded.

Samples are loaded with the dataset's own ``load`` (decode, image/mask sizes, class ids), in threads.
Files that passed are remembered by path, size and modification time in a cache
(``$XDG_CACHE_HOME/cwd_lightning/preflight.json``), so a second run checks nothing it has seen.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm


def cache_file() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "cwd_lightning" / "preflight.json"


def _stamp(paths: Sequence[Path]) -> str:
    parts = []
    for path in paths:
        stat = path.stat()
        parts.append(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}")
    return "|".join(parts)


def _read_cache(path: Path) -> set[str]:
    try:
        return set(json.loads(path.read_text()))
    except (OSError, ValueError):  # no cache yet, or a damaged one: check everything again
        return set()


def _write_cache(path: Path, good: set[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(handle, "w") as out:
        json.dump(sorted(good), out)
    os.replace(temporary, path)  # several runs may check at once: each write is whole


def check_samples(files: Sequence[Sequence[Path]], load: Callable[[int], object], what: str,
                  cache: Path | None = None, skip: bool = False) -> list[int]:  # fmt: skip
    """``load(i)`` every sample whose ``files[i]`` changed since it last passed; raise one error that
    lists every failure (file and reason), or with ``skip`` warn and return the failed indices."""
    cache = cache or cache_file()
    known = _read_cache(cache)
    stamps: dict[int, str] = {}
    missing: dict[int, str] = {}
    for index, paths in enumerate(files):
        try:
            stamps[index] = _stamp(paths)
        except OSError as error:
            missing[index] = f"{error.filename}: {error.strerror}"
    pending = [index for index, stamp in stamps.items() if stamp not in known]

    def check(index: int) -> str | None:
        try:
            load(index)
        except Exception as error:  # decode errors come in many types; each is reported, none stops the scan
            return f"{', '.join(str(p) for p in files[index])}: {type(error).__name__}: {error}"
        return None

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        progress = tqdm(pool.map(check, pending), total=len(pending), desc=f"checking {what}", unit="sample",
                        disable=len(pending) < 500)  # fmt: skip
        results = list(progress)
    failed = {**missing, **{index: failure for index, failure in zip(pending, results, strict=True) if failure}}
    bad = list(failed.values())
    good = known | {stamps[index] for index, failure in zip(pending, results, strict=True) if failure is None}
    if len(good) != len(known):
        _write_cache(cache, good)
    if not bad:
        return []
    shown = "\n  ".join(bad[:20]) + (f"\n  … and {len(bad) - 20} more" if len(bad) > 20 else "")
    if skip and len(bad) < len(files):
        warnings.warn(f"{what}: skipping {len(bad)} of {len(files)} sample(s) (on_bad_sample: skip):\n  {shown}",
                      stacklevel=2)  # fmt: skip
        return sorted(failed)
    raise ValueError(
        f"{what}: {len(bad)} of {len(files)} sample(s) cannot be used (data.init_args.on_bad_sample: skip trains "
        f"without them):\n  {shown}"
    )
