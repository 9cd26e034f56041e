"""Every method YAML builds through the CLI path and takes optimiser steps: the engine carries each loss
with no per-method code. Also the table runner on a tiny table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from cwd_lightning import losses
from cwd_lightning.cli import DistillCLI
from tests.conftest import REPO, tiny_overrides

METHOD_FILES = [
    *sorted((REPO / "experiments" / "methods").glob("shapes_*.yaml")),
    REPO / "experiments" / "shapes_cwd.yaml",
]
CITYSCAPES_FILES = sorted((REPO / "experiments" / "methods").glob("cityscapes_*.yaml"))


@pytest.fixture(scope="module")
def unet_teacher(tmp_path_factory) -> Path:
    """A U-Net-R18 teacher (the `shapes` teacher network, random weights) as a state_dict file."""
    from cwd_lightning.tasks.segmentation import build_segmentation_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teachers") / "unet.pt"
    torch.save(build_segmentation_model("Unet", "resnet18", 11, None).state_dict(), path)
    return path


def _tiny_cli(config: Path, teacher: Path, data_root: Path, *extra: str) -> DistillCLI:
    """The experiment with its own teacher and student networks (the teacher's weights from ``teacher``),
    shrunk to 2 steps on the tiny data."""
    args = ["--config", str(config), "--runs_root", str(teacher.parent / "method_runs"), "--experiment", config.stem,
            "--model.teacher_checkpoint", str(teacher), *tiny_overrides(data_root, 2),
            "--trainer.logger", "false", "--trainer.callbacks", "[]", "--trainer.enable_checkpointing", "false",
            "--trainer.limit_val_batches", "0", *extra]  # fmt: skip
    return DistillCLI(args=args, run=False)


def test_every_method_file_is_listed_in_a_table():
    listed = set()
    for table in (REPO / "experiments" / "tables").glob("*.yaml"):
        listed |= {row["config"] for row in yaml.safe_load(table.read_text())["rows"]}
    assert {f"methods/{path.stem}" for path in METHOD_FILES if path.parent.name == "methods"} <= listed


@pytest.mark.parametrize("config", METHOD_FILES, ids=lambda path: path.stem)
def test_each_method_builds_from_its_yaml_and_trains(config, unet_teacher, tiny_shapes):
    spec = yaml.safe_load(config.read_text())["model"]["terms"]
    cli = _tiny_cli(config, unet_teacher, tiny_shapes)
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
    adversary = [p for pair in pairs for p in pair.loss.parameters() if id(p) in auxiliary]
    adversary_before = [p.detach().clone() for p in adversary]
    cli.trainer.fit(module, datamodule=cli.datamodule)

    assert cli.trainer.global_step == 2
    logged = cli.trainer.callback_metrics
    for term in spec:
        value = logged[f"train/distill/{term['name']}"]
        assert torch.isfinite(value)
    assert all(torch.equal(v, teacher_before[k]) for k, v in module.teacher.state_dict().items())
    assert all(not torch.equal(p, b) for p, b in zip(owned, owned_before, strict=True))  # own modules trained
    if adversary:  # trained by its own optimiser; a bias that cancels in D(S) − D(T) gets no gradient
        moved = [not torch.equal(p, b) for p, b in zip(adversary, adversary_before, strict=True)]
        assert sum(moved) >= 0.9 * len(moved)


def test_every_loss_has_a_method_file():
    used = {term["loss"]["class_path"].rsplit(".", 1)[-1]
            for path in METHOD_FILES for term in yaml.safe_load(path.read_text())["model"]["terms"]}  # fmt: skip
    assert set(losses.__all__) - {"DistillationLoss"} <= used


@pytest.fixture(scope="module")
def cityscapes_teacher(tmp_path_factory) -> Path:
    from cwd_lightning.models.dilated import build_dilated_segmentor

    path = tmp_path_factory.mktemp("teachers") / "pspnet_r101_d8.pt"
    torch.save(build_dilated_segmentor("psp", "resnet101", 19, None).state_dict(), path)
    return path


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


def test_term_hyperparameters_are_set_per_term_from_the_command_line(unet_teacher, tiny_shapes):
    config = REPO / "experiments" / "shapes_cwd.yaml"
    cli = _tiny_cli(config, unet_teacher, tiny_shapes, "--model.terms.cwd_logits.loss.init_args.tau", "2",
                    "--model.terms[0].weight=5", "--model.terms.0.loss.init_args.normalize", "spatial")  # fmt: skip
    (pair,) = cli.model.distiller.iter_pairs()
    assert (pair.loss.tau, pair.weight, pair.loss.normalize) == (2.0, 5.0, "spatial")
    with pytest.raises(SystemExit, match=r"no term named or numbered 'loss' \(terms: 0=cwd_logits\)"):
        _tiny_cli(config, unet_teacher, tiny_shapes, "--model.terms.loss.init_args.tau", "2")
    with pytest.raises(SystemExit, match=r"--model.terms.cwd_logits.weight: 'abc' is not a number \(it is 3.0 now\)"):
        _tiny_cli(config, unet_teacher, tiny_shapes, "--model.terms.cwd_logits.weight", "abc")
    with pytest.raises(SystemExit, match=r"term 'cwd_logits' has no 'loss.init_args.temperature'"):
        _tiny_cli(config, unet_teacher, tiny_shapes, "--model.terms.cwd_logits.loss.init_args.temperature", "2")


def test_a_top_level_optimizer_is_refused(unet_teacher, tiny_shapes, capsys):
    with pytest.raises(SystemExit):
        _tiny_cli(REPO / "experiments" / "shapes_student.yaml", unet_teacher, tiny_shapes,
                  "--optimizer", "torch.optim.SGD")  # fmt: skip
    assert "unrecognized arguments: --optimizer" in capsys.readouterr().err


def test_the_table_runner_writes_results_skips_them_and_aggregates(teacher_run, tiny_shapes, tmp_path):
    from cwd_lightning.sweeps.runner import run_table
    from cwd_lightning.sweeps.spec import Table

    _, teacher_dir, _, _ = teacher_run
    table_file = tmp_path / "tiny.yaml"
    shared = ["--model.teacher", str(REPO / "experiments" / "common" / "shapes_student_net.yaml"),
              "--model.teacher_checkpoint", str(teacher_dir / "best.ckpt"), *tiny_overrides(tiny_shapes, 2),
              "--trainer.callbacks", "[]"]  # fmt: skip
    table_file.write_text(yaml.safe_dump({
        "name": "tiny", "title": "tiny table", "seeds": [0, 1], "args": shared, "baseline": "cwd",
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


def test_report_takes_runs_that_differ_only_by_seed_together(tmp_path):
    from cwd_lightning.report import write_report

    def run(folder: str, seed: int, tau: float, best: float) -> None:
        path = tmp_path / "runs" / folder
        path.mkdir(parents=True)
        term = {
            "name": "cwd",
            "student": "head",
            "teacher": "head",
            "weight": 3.0,
            "loss": {"class_path": "cwd_lightning.losses.ChannelWiseDivergence", "init_args": {"tau": tau}},
        }
        config = {"seed_everything": seed, "experiment": folder.rsplit("/", 1)[-1], "runs_root": "runs",
                  "trainer": {"max_steps": 10, "default_root_dir": str(path)}, "model": {"terms": [term]}}  # fmt: skip
        (path / "config.yaml").write_text(yaml.safe_dump(config))
        (path / "metrics.csv").write_text(f"step,val/mIoU\n4,{best / 2}\n9,{best}\n")

    run("tables/t/cwd_seed0", 0, 4.0, 0.30)
    run("tables/t/cwd_seed1", 1, 4.0, 0.34)
    run("tables/t/cwd_seed2", 2, 4.0, 0.32)
    run("tau1", 0, 1.0, 0.25)
    run("tables/t/cwd_seed0.interrupted1", 0, 4.0, 0.05)  # set aside by the sweep: not a seed
    unfinished = tmp_path / "runs" / "tables" / "t" / "cwd_seed3"
    run("tables/t/cwd_seed3", 3, 4.0, 0.9)
    (unfinished / "metrics.csv").write_text("step,val/mIoU\n4,0.9\n")  # still running: 5 of 10 steps
    text = write_report(tmp_path / "runs", tmp_path / "reports").read_text()
    section = text[text.index("## Over seeds") :]
    assert "| ChannelWiseDivergence | 3 | 4 | @head | 0, 1, 2 | 0.3200 ± 0.0200 (val/mIoU) |" in section
    assert "| ChannelWiseDivergence | 3 | 1 | @head | 0 | 0.2500 ± 0.0000 (val/mIoU) |" in section


def test_a_result_whose_config_only_gained_keys_is_kept_and_any_other_change_reruns(tmp_path):
    from cwd_lightning.sweeps.runner import current_result

    path = tmp_path / "seed0.json"
    config = {"model": {"task": {"num_classes": 11}}, "trainer": {"max_steps": 1000}}
    path.write_text(json.dumps({"best": 0.3, "config_digest": "d1", "teacher_fingerprint": "t"}))
    assert current_result(path, "d1", "t", set_aside=True, config=config)["best"] == 0.3
    assert json.loads(path.read_text())["resolved_config"] == config  # an older file gets its config added

    grown = {"model": {"task": {"num_classes": 11, "aux_weight": 0.4}}, "trainer": {"max_steps": 1000}}
    assert current_result(path, "d2", "t", set_aside=True, config=grown)["best"] == 0.3
    saved = json.loads(path.read_text())
    assert saved["config_digest"] == "d2"
    assert saved["config_migrations"] == [{"from": "d1", "added": ["model.task.aux_weight"]}]

    changed = {"model": {"task": {"num_classes": 11, "aux_weight": 0.4}}, "trainer": {"max_steps": 500}}
    assert current_result(path, "d3", "t", set_aside=True, config=changed) is None
    assert not path.exists() and len(list((tmp_path / "stale").glob("seed0.*.json"))) == 1  # kept, not lost
