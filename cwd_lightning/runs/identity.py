"""When two runs are the same run, and when they train the same recipe: the one definition the tables (which
runs are done) and the report (which runs are repeats over seeds) share."""

from __future__ import annotations

import hashlib
import json
from typing import Any

#: top-level keys that name, place or group a run, or pick its seed: runs that differ only here are repeats
NAMING_KEYS = ("seed_everything", "experiment", "runs_root", "group", "ckpt_path", "config")
#: trainer keys that change where a run writes or what it prints, not what it computes
TRAINER_NAMING_KEYS = ("default_root_dir", "enable_progress_bar")
#: model keys that make up a run's distillation: all that a row of a comparison may change
DISTILLATION_KEYS = ("terms", "teacher", "teacher_checkpoint", "teachers", "teacher_checkpoints", "teacher_cache")


def run_identity(config: dict[str, Any]) -> dict[str, Any]:
    """A resolved config without its name, folder, group, seed and progress-bar settings."""
    identity = {key: value for key, value in config.items() if key not in NAMING_KEYS}
    if isinstance(identity.get("trainer"), dict):
        identity["trainer"] = {k: v for k, v in identity["trainer"].items() if k not in TRAINER_NAMING_KEYS}
    return identity


def identity_digest(config: dict[str, Any]) -> str:
    """16 hex digits of the run's identity as canonical JSON: equal digests, the same run."""
    text = json.dumps(run_identity(config), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def recipe(config: dict[str, Any]) -> dict[str, Any]:
    """The run's identity without its distillation: equal for every row of a fair comparison."""
    identity = run_identity(config)
    model = {k: v for k, v in (identity.get("model") or {}).items() if k not in DISTILLATION_KEYS}
    return {**identity, "model": model}


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "c": [{"d": 2}]}`` → ``{"a.b": 1, "c.0.d": 2}`` (an empty dict or list is a value)."""
    items = list(value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ())
    if not items:
        return {prefix.rstrip("."): value}
    flat: dict[str, Any] = {}
    for key, item in items:
        flat.update(flatten(item, f"{prefix}{key}."))
    return flat


def differing_keys(first: dict[str, Any], second: dict[str, Any]) -> list[str]:
    """The dotted keys whose values differ (or that only one side has)."""
    a, b = flatten(first), flatten(second)
    return sorted(key for key in set(a) | set(b) if a.get(key) != b.get(key))
