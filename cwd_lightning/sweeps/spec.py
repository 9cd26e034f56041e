"""A comparison table as declared in ``experiments/tables/<name>.yaml``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

_ROW_KEYS = {"name", "label", "config", "args", "reuse"}


@dataclass
class Row:
    name: str
    label: str
    config: str  # an experiment YAML, relative to experiments/, without .yaml
    args: list[str] = field(default_factory=list)
    reuse: str | None = None  # "<table>/<row>": take that row's results when they are the same runs


@dataclass
class Table:
    name: str
    title: str
    seeds: list[int]
    rows: list[Row]
    args: list[str] = field(default_factory=list)  # shared by every row
    baseline: str = "baseline"
    notes: str = ""

    @classmethod
    def load(cls, path: str | Path) -> Table:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"table file {path} not found (tables live in experiments/tables/)")
        spec = yaml.safe_load(path.read_text()) or {}
        missing = [key for key in ("name", "seeds", "rows") if key not in spec]
        if missing:
            raise ValueError(f"{path}: missing key(s) {missing}")
        rows = []
        for index, row in enumerate(spec["rows"]):
            if set(row) - _ROW_KEYS or "name" not in row or "config" not in row:
                raise ValueError(f"{path}: row {index} needs name and config (may set label, args, reuse), got {row}")
            args = [str(a) for a in row.get("args", [])]
            rows.append(Row(row["name"], row.get("label", row["name"]), row["config"], args, row.get("reuse")))
        names = [row.name for row in rows]
        if len(set(names)) != len(names):
            raise ValueError(f"{path}: row names must be unique, got {names}")
        table = cls(
            name=spec["name"],
            title=spec.get("title", spec["name"]),
            seeds=list(spec["seeds"]),
            rows=rows,
            args=[str(a) for a in spec.get("args", [])],
            baseline=spec.get("baseline", "baseline"),
            notes=spec.get("notes", ""),
        )
        if table.baseline not in names:
            raise ValueError(f"{path}: baseline row {table.baseline!r} is not among the rows {names}")
        return table


#: what a row may change: its distillation (the baseline has none); everything else is the shared recipe
# how the teacher is consulted (live or from its cache) is part of the distillation being compared
_DISTILLATION_KEYS = ("terms", "teacher", "teacher_checkpoint", "teacher_cache_views", "teacher_cache_dir",
                      "teacher_cache_dtype")  # fmt: skip


def recipe(resolved: dict) -> dict:
    """A resolved config without its distillation: equal for every row of a fair table."""
    model = {k: v for k, v in (resolved.get("model") or {}).items() if k not in _DISTILLATION_KEYS}
    return {**resolved, "model": model}


def check_same_recipe(table: Table, resolved: dict[str, dict]) -> None:
    """Every row must train the same student on the same data with the same optimiser and schedule as the
    baseline; only the distillation may differ. A row that differs elsewhere is refused, naming the keys."""
    reference = _flatten(recipe(resolved[table.baseline]))
    for row in table.rows:
        flat = _flatten(recipe(resolved[row.name]))
        differing = sorted(key for key in set(reference) | set(flat) if reference.get(key) != flat.get(key))
        if differing:
            raise ValueError(
                f"table {table.name!r}: row {row.name!r} differs from {table.baseline!r} beyond its distillation "
                f"({', '.join(differing[:8])}{' …' if len(differing) > 8 else ''}); a comparison needs one recipe"
            )


def _flatten(value: object, prefix: str = "") -> dict[str, object]:
    if isinstance(value, dict):
        flat: dict[str, object] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): value}


def added_keys(old: dict, new: dict) -> list[str] | None:
    """The keys ``new`` adds to ``old`` when it only adds keys (every key of ``old`` has the same value in
    ``new``), else None. A config that only gained arguments, at their defaults, made the same run, as
    long as a new argument's default keeps the old behaviour (that is what a default must do here)."""
    before, after = _flatten(old), _flatten(new)
    if any(key not in after or after[key] != value for key, value in before.items()):
        return None
    return sorted(set(after) - set(before))
