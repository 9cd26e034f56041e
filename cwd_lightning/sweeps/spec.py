"""A comparison table as declared in ``experiments/tables/<name>.yaml``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cwd_lightning.runs.identity import differing_keys, recipe

_ROW_KEYS = {"name", "label", "config", "args", "reuse"}


@dataclass
class Row:
    name: str
    label: str
    config: str  # an experiment YAML, relative to experiments/, without .yaml
    args: list[str] = field(default_factory=list)
    reuse: str | None = None  # "<table>/<row>": take that row's results when they are the same runs


@dataclass
class Budget:
    """``budget`` of a table: every row trains for the same ``seconds`` of its training loop (measured by the
    run itself, ``clock`` as ``model.time_budget``) instead of the same steps; its schedules span the budget."""

    seconds: float
    clock: str = "process"

    def args(self) -> list[str]:
        return ["--model.time_budget.seconds", str(self.seconds), "--model.time_budget.clock", self.clock,
                "--trainer.max_steps", "-1", "--trainer.max_epochs", "-1"]  # fmt: skip


@dataclass
class SharedCache:
    """``teacher_cache`` of a table: every row that distils reads a teacher cache with these settings, shared by its
    seeds and by the rows that distil the same teacher tensors (``model.teacher_cache.seed`` is the table's, not the
    run's). ``views: epochs`` gives each row one view per epoch of its schedule; with ``dtype: float32`` the targets
    are then the live teacher's on the same views, bit for bit: the live protocol with another augmentation draw."""

    views: int | str = "epochs"
    dtype: str = "float32"
    seed: int | str = 0  # or "run": each seed its own draw and cache
    folder: str | None = None

    def check(self, path: Path) -> None:
        """The values a run would refuse, refused when the table is read (by the run's own options)."""
        from cwd_lightning.distill.cached_run import TeacherCacheOptions  # torch: only once a table shares a cache

        try:
            TeacherCacheOptions(self.views, self.folder, self.dtype, self.seed)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None

    def args(self) -> list[str]:
        folder = ["--model.teacher_cache.folder", self.folder] if self.folder else []
        return ["--model.teacher_cache.views", str(self.views), "--model.teacher_cache.dtype", self.dtype,
                "--model.teacher_cache.seed", str(self.seed), *folder]  # fmt: skip


@dataclass
class Table:
    name: str
    title: str
    seeds: list[int]
    rows: list[Row]
    args: list[str] = field(default_factory=list)  # shared by every row
    baseline: str = "baseline"
    notes: str = ""
    budget: Budget | None = None
    teacher_cache: SharedCache | None = None
    draft: bool = False  # may run from a tree with uncommitted changes (its results say so)

    @property
    def shared_args(self) -> list[str]:
        """The arguments every row gets: the table's, then those of its budget."""
        return [*self.args, *(self.budget.args() if self.budget is not None else [])]

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
        budget = spec.get("budget")
        if budget is not None:
            if not isinstance(budget, dict) or set(budget) - {"seconds", "clock"} or "seconds" not in budget:
                raise ValueError(f"{path}: budget needs seconds (may set clock: process|wall|auto), got {budget}")
            if any(arg in ("--trainer.max_steps", "--trainer.max_epochs") for arg in spec.get("args", [])):
                raise ValueError(f"{path}: a table with a budget ends its runs by time; drop --trainer.max_steps / "
                                 "--trainer.max_epochs from its args")  # fmt: skip
            budget = Budget(float(budget["seconds"]), str(budget.get("clock", "process")))
        cache = spec.get("teacher_cache")
        if cache is not None:
            if not isinstance(cache, dict) or set(cache) - {"views", "dtype", "seed", "folder"}:
                raise ValueError(
                    f"{path}: teacher_cache may set views (a number or 'epochs'), dtype, seed and folder, got {cache}"
                )
            if budget is not None and cache.get("views", "epochs") == "epochs":
                raise ValueError(
                    f"{path}: a table with a budget has no fixed number of epochs: give teacher_cache.views"
                )
            cache = SharedCache(**cache)
            cache.check(path)
            fixed = [row.name for row in rows if any(arg.startswith("--model.teacher_cache") for arg in row.args)]
            if fixed:
                raise ValueError(f"{path}: rows {fixed} set --model.teacher_cache themselves, which the table's "
                                 "teacher_cache would override: give such a row a table of its own")  # fmt: skip
        table = cls(
            name=spec["name"],
            title=spec.get("title", spec["name"]),
            seeds=list(spec["seeds"]),
            rows=rows,
            args=[str(a) for a in spec.get("args", [])],
            baseline=spec.get("baseline", "baseline"),
            notes=spec.get("notes", ""),
            budget=budget,
            teacher_cache=cache,
            draft=_flag(spec.get("draft", False), path, "draft"),
        )
        if table.baseline not in names:
            raise ValueError(f"{path}: baseline row {table.baseline!r} is not among the rows {names}")
        return table


def _flag(value: object, path: Path, key: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{path}: {key} must be true or false, got {value!r}")
    return value


def check_same_recipe(table: Table, resolved: dict[str, dict]) -> None:
    """Every row must train the same student on the same data with the same optimiser and schedule as the
    baseline; only the distillation may differ. A row that differs elsewhere is refused, naming the keys."""
    reference = recipe(resolved[table.baseline])
    for row in table.rows:
        differing = differing_keys(reference, recipe(resolved[row.name]))
        if differing:
            raise ValueError(
                f"table {table.name!r}: row {row.name!r} differs from {table.baseline!r} beyond its distillation "
                f"({', '.join(differing[:8])}{' …' if len(differing) > 8 else ''}); a comparison needs one recipe"
            )
