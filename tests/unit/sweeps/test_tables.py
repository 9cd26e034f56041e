"""A table's declaration, its one-recipe check, which result files are current and the teacher fingerprint a
resolved config names (one teacher or several)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from cwd_lightning.distill.teacher import combined_fingerprint, fingerprint_file
from cwd_lightning.sweeps import Table, check_same_recipe, current_result, teacher_fingerprint
from cwd_lightning.sweeps.runner import check_clean_tree


def _write(tmp_path, spec) -> str:
    path = tmp_path / "table.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


ROWS = [{"name": "baseline", "config": "shapes_student"}, {"name": "cwd", "config": "shapes_cwd", "args": [1]}]


def test_a_table_file_loads_and_bad_ones_name_the_fault(tmp_path):
    table = Table.load(_write(tmp_path, {"name": "t", "seeds": [0, 1], "rows": ROWS}))
    assert [row.name for row in table.rows] == ["baseline", "cwd"] and table.rows[1].args == ["1"]
    assert table.title == "t" and table.baseline == "baseline"
    bad = [({"name": "t", "rows": ROWS}, r"missing key\(s\) \['seeds'\]"),
           ({"name": "t", "seeds": [0], "rows": [{"name": "a"}]}, r"row 0 needs name and config"),
           ({"name": "t", "seeds": [0], "rows": [*ROWS, ROWS[1]]}, r"row names must be unique"),
           ({"name": "t", "seeds": [0], "rows": ROWS[1:]}, r"baseline row 'baseline' is not among the rows"),
           ({"name": "t", "seeds": [0], "rows": ROWS, "draft": "yes"}, r"draft must be true or false, got 'yes'"),
           ]  # fmt: skip
    for spec, message in bad:
        with pytest.raises(ValueError, match=message):
            Table.load(_write(tmp_path, spec))
    with pytest.raises(FileNotFoundError, match="tables live in experiments/tables/"):
        Table.load(tmp_path / "none.yaml")


def test_a_table_runs_only_from_committed_code_unless_it_is_a_draft(tmp_path):
    table = Table.load(_write(tmp_path, {"name": "t", "seeds": [0], "rows": ROWS}))
    assert table.draft is False
    check_clean_tree(table, "0123456789")  # a clean checkout
    for version, state in (("0123456789+dirty", "has uncommitted changes"), ("unknown", "is not a git checkout")):
        message = rf"table 't': the code {state} \({version.replace('+', '[+]')}\).*draft: true"
        with pytest.raises(RuntimeError, match=message):
            check_clean_tree(table, version)
    draft = Table.load(_write(tmp_path, {"name": "t", "seeds": [0], "rows": ROWS, "draft": True}))
    check_clean_tree(draft, "0123456789+dirty")


def test_a_budget_table_gives_every_row_the_budget_and_no_step_limit(tmp_path):
    spec = {"name": "t", "seeds": [0], "rows": ROWS, "budget": {"seconds": 90}, "args": ["--trainer.callbacks", "[]"]}
    table = Table.load(_write(tmp_path, spec))
    assert table.budget.seconds == 90.0 and table.budget.clock == "process"
    assert table.shared_args == ["--trainer.callbacks", "[]", "--model.time_budget.seconds", "90.0",
                                 "--model.time_budget.clock", "process", "--trainer.max_steps", "-1",
                                 "--trainer.max_epochs", "-1"]  # fmt: skip
    assert Table.load(_write(tmp_path, {**spec, "budget": None})).shared_args == spec["args"]
    for budget, args, message in [({"minutes": 3}, [], "budget needs seconds"),
                                  ({"seconds": 9}, ["--trainer.max_steps", "9"], "ends its runs by time")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            Table.load(_write(tmp_path, {**spec, "budget": budget, "args": args}))


def test_rows_must_share_one_recipe(tmp_path):
    table = Table.load(_write(tmp_path, {"name": "t", "seeds": [0], "rows": ROWS}))
    baseline = {"trainer": {"max_steps": 10}, "model": {"student": "S", "terms": None}}
    distilled = {"trainer": {"max_steps": 10}, "model": {"student": "S", "terms": [{"name": "cwd"}],
                                                         "teachers": {"vit": "V"}}}  # fmt: skip
    check_same_recipe(table, {"baseline": baseline, "cwd": distilled})
    longer = {**distilled, "trainer": {"max_steps": 20}}
    with pytest.raises(ValueError, match=r"row 'cwd' differs from 'baseline' beyond its distillation "
                                         r"\(trainer.max_steps\)"):  # fmt: skip
        check_same_recipe(table, {"baseline": baseline, "cwd": longer})


def test_an_outdated_result_is_set_aside_not_overwritten(tmp_path):
    path = tmp_path / "cwd" / "seed0.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"config_digest": "d1", "teacher_fingerprint": "t1", "finished": "2026-12-01 10:00"}))
    assert current_result(path, "d1", "t1", set_aside=True)["config_digest"] == "d1"
    assert current_result(path, "d1", "t2", set_aside=False) is None and path.is_file()  # a dry run moves nothing
    assert current_result(path, "d2", "t1", set_aside=True) is None
    assert not path.exists()
    (kept,) = (tmp_path / "cwd" / "stale").iterdir()
    assert json.loads(kept.read_text())["config_digest"] == "d1"


def test_the_teacher_fingerprint_of_one_teacher_or_several(tmp_path):
    files = {}
    for name, seed in (("teacher", 0), ("vit", 1)):
        torch.manual_seed(seed)
        files[name] = tmp_path / f"{name}.pt"
        torch.save({"w": torch.randn(3)}, files[name])
    one = {"model": {"teacher": {"class_path": "T"}, "teacher_checkpoint": str(files["teacher"])}}
    assert teacher_fingerprint(one) == fingerprint_file(files["teacher"])
    two = {"model": {**one["model"], "teachers": {"vit": {"class_path": "V"}},
                     "teacher_checkpoints": {"vit": str(files["vit"])}}}  # fmt: skip
    expected = combined_fingerprint({name: fingerprint_file(path) for name, path in files.items()})
    assert teacher_fingerprint(two) == expected != teacher_fingerprint(one)
    missing = {"model": {**two["model"], "teacher_checkpoints": {"vit": str(tmp_path / "none.pt")}}}
    assert teacher_fingerprint(missing) is None  # not readable now: the result cannot be checked against it
    assert teacher_fingerprint({"model": {"teacher": None}}) is None


def test_a_table_may_share_a_teacher_cache_among_its_distilled_rows(tmp_path):
    spec = {"name": "t", "seeds": [0], "rows": ROWS, "teacher_cache": {"dtype": "float16", "seed": 3}}
    cache = Table.load(_write(tmp_path, spec)).teacher_cache
    assert cache.args() == ["--model.teacher_cache.views", "epochs", "--model.teacher_cache.dtype", "float16",
                            "--model.teacher_cache.seed", "3"]  # fmt: skip
    assert Table.load(_write(tmp_path, {**spec, "teacher_cache": {"views": 4}})).teacher_cache.views == 4
    with pytest.raises(ValueError, match=r"teacher_cache may set views .* got \{'K': 4\}"):
        Table.load(_write(tmp_path, {**spec, "teacher_cache": {"K": 4}}))
    with pytest.raises(ValueError, match=r"a table with a budget has no fixed number of epochs"):
        Table.load(_write(tmp_path, {**spec, "budget": {"seconds": 9}}))
    for cache, match in [({"views": 0}, "views must be a number ≥ 1 or 'epochs', got 0"),
                         ({"dtype": "bfloat16"}, "dtype must be float16 or float32"),
                         ({"seed": "each"}, "seed must be a number or 'run'")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            Table.load(_write(tmp_path, {**spec, "teacher_cache": cache}))
    own = [*ROWS, {"name": "k2", "config": "shapes_cwd", "args": ["--model.teacher_cache.views", "2"]}]
    with pytest.raises(ValueError, match=r"rows \['k2'\] set --model.teacher_cache themselves"):
        Table.load(_write(tmp_path, {**spec, "rows": own}))


def test_a_shared_cache_reaches_only_the_rows_that_distil(tmp_path):
    from cwd_lightning.sweeps.runner import with_shared_cache

    spec = {"name": "t", "seeds": [0], "rows": ROWS, "teacher_cache": {"views": 2}}
    table = Table.load(_write(tmp_path, spec))
    resolved = {"baseline": {"model": {"terms": None}}, "cwd": {"model": {"terms": [{"name": "cwd"}]}}}
    cached, configs = with_shared_cache(table, resolved, lambda row, table: {"args": row.args})
    assert cached.rows[0].args == [] and configs["baseline"] is resolved["baseline"]  # the baseline runs as it is
    assert cached.rows[1].args == ["1", "--model.teacher_cache.views", "2", "--model.teacher_cache.dtype", "float32",
                                   "--model.teacher_cache.seed", "0"]  # fmt: skip
    assert configs["cwd"] == {"args": cached.rows[1].args}  # resolved again, with the cache
    plain = Table.load(_write(tmp_path, {**spec, "teacher_cache": None}))
    assert with_shared_cache(plain, resolved, None) == (plain, resolved)
