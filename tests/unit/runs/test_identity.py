"""A run's identity: names, folders, groups and seeds aside; the recipe without the distillation (teachers
included); nested keys, list items included, compared one by one."""

from __future__ import annotations

import copy

from cwd_lightning.runs.identity import differing_keys, flatten, identity_digest, recipe


def _config() -> dict:
    return {
        "seed_everything": 0, "experiment": "a", "runs_root": "runs", "group": "shapes", "ckpt_path": None,
        "trainer": {"max_steps": 10, "default_root_dir": "x", "enable_progress_bar": True},
        "model": {"student": {"class_path": "S"}, "teacher": {"class_path": "T"}, "teacher_checkpoint": "t.ckpt",
                  "teachers": None, "teacher_checkpoints": None, "teacher_cache": None,
                  "terms": [{"name": "cwd", "weight": 3.0, "from_teacher": "teacher"}], "lr_schedule": "poly"},
    }  # fmt: skip


def test_flatten_descends_into_dicts_and_lists():
    assert flatten({"a": {"b": 1}, "c": [{"d": 2}, 3], "e": [], "f": {}}) == {"a.b": 1, "c.0.d": 2, "c.1": 3,
                                                                              "e": [], "f": {}}  # fmt: skip
    first, second = _config(), _config()
    second["model"]["terms"][0]["weight"] = 1.0
    assert differing_keys(first, second) == ["model.terms.0.weight"]


def test_the_digest_ignores_names_folders_groups_and_seeds_only():
    base = identity_digest(_config())
    renamed = _config()
    renamed.update(seed_everything=3, experiment="b", runs_root="elsewhere", group="other", ckpt_path="last")
    renamed["trainer"].update(default_root_dir="y", enable_progress_bar=False)
    assert identity_digest(renamed) == base and len(base) == 16
    for change in (("trainer", "max_steps", 11), ("model", "lr_schedule", "onecycle")):
        changed = _config()
        changed[change[0]][change[1]] = change[2]
        assert identity_digest(changed) != base, change


def test_the_recipe_leaves_out_every_teacher_and_term():
    taught = _config()
    taught["model"].update(teachers={"vit": {"class_path": "V"}}, teacher_checkpoints={"vit": "v.ckpt"},
                           teacher_checkpoint="other.ckpt", terms=[])  # fmt: skip
    assert recipe(taught) == recipe(_config())
    assert identity_digest(taught) != identity_digest(_config())
    student = copy.deepcopy(_config())
    student["model"]["student"] = {"class_path": "S2"}
    assert differing_keys(recipe(_config()), recipe(student)) == ["model.student.class_path"]
