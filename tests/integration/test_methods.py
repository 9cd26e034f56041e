"""Every method YAML builds through the CLI and trains; every loss has a method file; the paper's Table 2 files
build; a comparison table runs, skips what is done and aggregates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from cwd_lightning import losses
from cwd_lightning.cli import DistillCLI
from tests.helpers import REPO, tiny_cli, tiny_overrides

SEGMENTATION_METHODS = [p for p in sorted((REPO / "experiments" / "methods").glob("shapes_*.yaml"))
                        if not p.stem.startswith("shapes_det_")]  # fmt: skip
DETECTION_METHODS = sorted((REPO / "experiments" / "methods").glob("shapes_det_*.yaml"))  # trained in test_cli
METHOD_FILES = [
    *SEGMENTATION_METHODS,
    *sorted((REPO / "experiments" / "recipes").glob("shapes_*.yaml")),
    REPO / "experiments" / "shapes_cwd.yaml",
]


CITYSCAPES_FILES = sorted((REPO / "experiments" / "methods").glob("cityscapes_*.yaml"))


def test_every_method_file_is_listed_in_a_table():
    listed = set()
    for table in (REPO / "experiments" / "tables").glob("*.yaml"):
        listed |= {row["config"] for row in yaml.safe_load(table.read_text())["rows"]}
    files = {f"{path.parent.name}/{path.stem}" for path in [*METHOD_FILES, *DETECTION_METHODS]
             if path.parent.name in ("methods", "recipes")}  # fmt: skip
    assert files <= listed


@pytest.mark.slow
@pytest.mark.parametrize("config", METHOD_FILES, ids=lambda path: path.stem)
def test_each_method_builds_from_its_yaml_and_trains(config, shapes_teacher, tiny_shapes):
    spec = yaml.safe_load(config.read_text())["model"]["terms"]
    cli = tiny_cli(config, shapes_teacher, tiny_shapes)
    module = cli.model
    pairs = list(module.distiller.iter_pairs())
    assert [p.term_name for p in pairs] == [term["name"] for term in spec]
    for pair, term in zip(pairs, spec, strict=True):
        assert type(pair.loss).__name__ == term["loss"]["class_path"].rsplit(".", 1)[-1]
        assert pair.weight == pytest.approx(float(term["weight"]))
    teacher_before = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    auxiliary = {id(p) for pair in pairs for p in getattr(pair.loss, "auxiliary_parameters", list)()}
    owned = [p for pair in pairs for p in pair.loss.parameters() if id(p) not in auxiliary]
    owned_before = [p.detach().clone() for p in owned]
    # the discriminator's parameters that its maths leaves without a gradient: an attention key's bias (a softmax
    # is invariant to one constant added to all its logits) and the last bias (it cancels between D(T) and D(S))
    no_gradient = ("key.bias", "last.bias")
    adversary = [p for pair in pairs for name, p in pair.loss.named_parameters()
                 if id(p) in auxiliary and not name.endswith(no_gradient)]  # fmt: skip
    adversary_before = [p.detach().clone() for p in adversary]
    cli.trainer.fit(module, datamodule=cli.datamodule)

    assert cli.trainer.global_step == 2
    logged = cli.trainer.callback_metrics
    for term in spec:
        value = logged[f"train/distill/{term['name']}"]
        assert torch.isfinite(value)
    assert all(torch.equal(v, teacher_before[k]) for k, v in module.teacher.state_dict().items())
    assert all(not torch.equal(p, b) for p, b in zip(owned, owned_before, strict=True))  # own modules trained
    if adversary:  # trained by its own optimiser
        assert all(not torch.equal(p, b) for p, b in zip(adversary, adversary_before, strict=True))


def test_every_loss_has_a_method_file():
    files = [*METHOD_FILES, *DETECTION_METHODS, *sorted((REPO / "experiments").glob("shapes_det_*.yaml"))]
    used = {term["loss"]["class_path"].rsplit(".", 1)[-1] for path in files
            for term in yaml.safe_load(path.read_text())["model"].get("terms") or []}  # fmt: skip
    assert set(losses.__all__) - {"DistillationLoss"} <= used


@pytest.fixture(scope="module")
def cityscapes_teacher(tmp_path_factory) -> Path:
    from cwd_lightning.models import build_dilated_segmentor

    path = tmp_path_factory.mktemp("teachers") / "pspnet_r101_d8.pt"
    torch.save(build_dilated_segmentor("psp", "resnet101", 19, None).state_dict(), path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("config", CITYSCAPES_FILES, ids=lambda path: path.stem)
def test_cityscapes_table2_files_build(config, cityscapes_teacher):
    """The paper's Table 2 rows build with their own networks (no data or pretrained weights here: random
    weights, a random teacher file), so a wrong path or shape fails in CI, not on a cluster."""
    cli = DistillCLI(args=["--config", str(config), "--model.teacher_checkpoint", str(cityscapes_teacher),
                           "--model.teacher.init_args.encoder_weights", "null",
                           "--model.student.init_args.encoder_weights", "null",
                           "--model.task.init_args.example_size", "128", "--trainer.logger", "false",
                           "--runs_root", str(cityscapes_teacher.parent / "runs")], run=False)  # fmt: skip
    (term,) = yaml.safe_load(config.read_text())["model"]["terms"]
    (pair,) = cli.model.distiller.iter_pairs()
    assert type(pair.loss).__name__ == term["loss"]["class_path"].rsplit(".", 1)[-1]
    assert cli.trainer.max_steps == 40000 and cli.datamodule.batch_size == 8


@pytest.mark.slow
def test_the_table_runner_writes_results_skips_them_and_aggregates(teacher_run, tiny_shapes, tmp_path):
    from cwd_lightning.sweeps.runner import reproduce, run_table
    from cwd_lightning.sweeps.spec import Table

    _, teacher_dir, _, _ = teacher_run
    table_file = tmp_path / "tiny.yaml"
    shared = ["--model.teacher", str(REPO / "experiments" / "common" / "shapes_student_net.yaml"),
              "--model.teacher_checkpoint", str(teacher_dir / "best.ckpt"), *tiny_overrides(tiny_shapes, 2),
              "--trainer.callbacks", "[]"]  # fmt: skip
    table_file.write_text(yaml.safe_dump({
        "name": "tiny", "title": "tiny table", "draft": True, "seeds": [0, 1], "args": shared, "baseline": "cwd",
        "rows": [{"name": "cwd", "config": "shapes_cwd"},
                 {"name": "tau2", "config": "shapes_cwd", "args": ["--model.terms.0.loss.init_args.tau", "2"]}],
    }))  # fmt: skip
    results, runs = tmp_path / "results", tmp_path / "runs"
    table = Table.load(table_file)
    with pytest.raises(ValueError, match=r"no row\(s\) \['nope'\]"):
        run_table(table, REPO / "experiments", runs, results, rows=["nope"])
    run_table(table, REPO / "experiments", runs, results, seeds=[0], rows=["tau2"])  # a part of the table first
    assert [p.relative_to(results).as_posix() for p in results.rglob("seed*.json")] == ["tiny/tau2/seed0.json"]
    report = run_table(table, REPO / "experiments", runs, results)

    files = sorted(p.relative_to(results).as_posix() for p in results.rglob("seed*.json"))
    assert files == ["tiny/cwd/seed0.json", "tiny/cwd/seed1.json", "tiny/tau2/seed0.json", "tiny/tau2/seed1.json"]
    first = json.loads((results / "tiny/cwd/seed0.json").read_text())
    assert first["steps"] == 2 and 0 <= first["best"] <= 1 and first["wall_s"] > 0
    assert first["teacher_fingerprint"] and first["hardware"] and first["commit"]
    tau2 = json.loads((results / "tiny/tau2/seed0.json").read_text())
    assert tau2["config_digest"] != first["config_digest"]
    text = report.read_text()
    assert "| cwd | 2 |" in text and "4 of 4 runs done" in text

    mean = sum(json.loads((results / f"tiny/cwd/seed{k}.json").read_text())["best"] for k in (0, 1)) / 2
    assert f"{mean:.4f} ±" in text

    stamps = {p: p.stat().st_mtime_ns for p in results.rglob("seed*.json")}
    run_table(table, REPO / "experiments", runs, results)  # everything done: nothing re-runs
    assert {p: p.stat().st_mtime_ns for p in results.rglob("seed*.json")} == stamps
    assert len(list((runs / "tables" / "tiny").glob("*_seed*.log"))) == 4

    # a committed result runs again bit for bit (same commit, same machine); a tampered file is caught
    outcome = reproduce(table, REPO / "experiments", results, "cwd", 1)
    assert outcome["equal"] and outcome["same_commit"], outcome
    assert outcome["rerun"]["best"] == json.loads((results / "tiny/cwd/seed1.json").read_text())["best"]
    assert {p: p.stat().st_mtime_ns for p in results.rglob("seed*.json")} == stamps  # only read
    tampered = {**json.loads((results / "tiny/cwd/seed1.json").read_text())}
    tampered["best"] = tampered["best"] + 1e-9
    (results / "tiny/cwd/seed1.json").write_text(json.dumps(tampered))
    assert not reproduce(table, REPO / "experiments", results, "cwd", 1)["equal"]
    with pytest.raises(ValueError, match="has no seed 7"):
        reproduce(table, REPO / "experiments", results, "cwd", 7)


@pytest.mark.slow
def test_a_table_at_equal_compute_gives_every_row_its_budget(teacher_run, tiny_shapes, tmp_path):
    from cwd_lightning.sweeps.runner import run_table
    from cwd_lightning.sweeps.spec import Table

    _, teacher_dir, _, _ = teacher_run
    shared = ["--model.teacher", str(REPO / "experiments" / "common" / "shapes_student_net.yaml"),
              "--model.teacher_checkpoint", str(teacher_dir / "best.ckpt"), *tiny_overrides(tiny_shapes, 2),
              "--trainer.callbacks", "[]"]  # fmt: skip
    limit = shared.index("--trainer.max_steps")
    del shared[limit : limit + 2]  # the budget ends the runs
    table_file = tmp_path / "budget.yaml"
    table_file.write_text(yaml.safe_dump({
        "name": "budget", "draft": True, "seeds": [0], "args": shared, "baseline": "baseline", "budget": {"seconds": 3},
        "rows": [{"name": "baseline", "config": "shapes_student"}, {"name": "cwd", "config": "shapes_cwd"}],
    }))  # fmt: skip
    results = tmp_path / "results"
    report = run_table(Table.load(table_file), REPO / "experiments", tmp_path / "runs", results)
    found = {row: json.loads((results / f"budget/{row}/seed0.json").read_text()) for row in ("baseline", "cwd")}
    for result in found.values():
        assert result["train_s"] >= 3.0 and result["steps"] >= 1
        assert "--model.time_budget.seconds" in result["args"]
    text = report.read_text()
    assert "steps reached" in text and "training time / step" in text and "every row trains for 3 s" in text


@pytest.mark.slow
def test_a_table_with_a_shared_cache_fills_it_once_for_every_distilled_row_and_seed(teacher_run, tiny_shapes, tmp_path):
    """Two rows that distil the same teacher tensors × two seeds, two runs side by side: one cache, filled once (the
    run that finds another filling waits on its lock); the table says which rows read it (that a row without terms
    runs without one: test_tables)."""
    from cwd_lightning.sweeps.runner import run_table
    from cwd_lightning.sweeps.spec import Table

    _, teacher_dir, _, _ = teacher_run
    shared = ["--model.teacher", str(REPO / "experiments" / "common" / "shapes_student_net.yaml"),
              "--model.teacher_checkpoint", str(teacher_dir / "best.ckpt"), *tiny_overrides(tiny_shapes, 8),
              "--trainer.callbacks", "[]"]  # fmt: skip
    cache = tmp_path / "cache"
    table_file = tmp_path / "cached.yaml"
    table_file.write_text(yaml.safe_dump({
        "name": "cached", "draft": True, "seeds": [0, 1], "args": shared, "teacher_cache": {"folder": str(cache)},
        "baseline": "cwd", "rows": [{"name": "cwd", "config": "shapes_cwd"},
                                    {"name": "tau2", "config": "shapes_cwd",
                                     "args": ["--model.terms.0.loss.init_args.tau", "2"]}],
    }))  # fmt: skip
    results, runs = tmp_path / "results", tmp_path / "runs"
    report = run_table(Table.load(table_file), REPO / "experiments", runs, results, jobs=2)
    (folder,) = [p for p in cache.iterdir() if p.is_dir()]
    index = json.loads((folder / "cache.json").read_text())
    assert index["views"] == 2 and index["dtype"] == "float32" and index["seed"] == 0  # 8 steps of 6: 2 epochs
    logs = {p.stem: p.read_text() for p in (runs / "tables" / "cached").glob("*_seed*.log")}
    assert sorted(name for name, text in logs.items() if "filling the teacher cache" in text) in (
        ["cwd_seed0"], ["tau2_seed0"], ["cwd_seed1"], ["tau2_seed1"])  # fmt: skip
    for row in ("cwd", "tau2"):
        for seed in (0, 1):
            result = json.loads((results / f"cached/{row}/seed{seed}.json").read_text())
            assert result["resolved_config"]["model"]["teacher_cache"]["views"] == "epochs"
    text = report.read_text()
    assert "teacher cache: rows `cwd`, `tau2` read" in text and "bit for bit" in text
