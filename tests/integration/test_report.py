"""`make report`: the results table and plots of the runs, runs that differ only by seed taken together."""

from __future__ import annotations

import yaml
from PIL import Image


def test_report_tables_and_plots_the_runs(cwd_run, tmp_path):
    from cwd_lightning.report import write_report

    work, _ = cwd_run
    report = write_report(work / "runs", tmp_path / "reports")
    text = report.read_text()
    # one group, from the runs' configs (shapes_student.yaml, shapes_cwd.yaml); the teacher is the run distilled from
    assert "## shapes" in text and "| tiny_teacher | teacher | PSPNet-resnet18 |" in text
    assert "| shapes_cwd | distilled | PSPNet-resnet18 |" in text and "best val/mIoU" in text
    for name in ("shapes_curves.png", "shapes_per_class.png", "shapes_cwd_channels.png"):
        with Image.open(tmp_path / "reports" / name) as image:
            assert image.format == "PNG" and min(image.size) > 200


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
        task = {"class_path": "cwd_lightning.tasks.SegmentationTask", "init_args": {"num_classes": 2}}
        config = {"seed_everything": seed, "experiment": folder.rsplit("/", 1)[-1], "runs_root": "runs",
                  "trainer": {"max_steps": 10, "default_root_dir": str(path)},
                  "model": {"task": task, "terms": [term]}}  # fmt: skip
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


def test_a_run_its_early_stopping_ended_counts_as_finished(teacher_run, tiny_shapes, tmp_path):
    """A run ended by Lightning's ``EarlyStopping`` is finished (its curve flattened), though short of its
    ``max_steps``: the callback's state in ``last.ckpt`` says so. A run that reached ``max_steps`` is finished
    without it."""
    from cwd_lightning.analysis.runs import load_run
    from tests.helpers import REPO, run_cli, tiny_overrides

    # improving by 1.0 mIoU is impossible: the second validation (step 4) is one without improvement, patience 1
    early_stopping = ["--trainer.callbacks+=lightning.pytorch.callbacks.EarlyStopping",
                      "--trainer.callbacks.monitor", "val/mIoU", "--trainer.callbacks.mode", "max",
                      "--trainer.callbacks.patience", "1", "--trainer.callbacks.min_delta", "1.0"]  # fmt: skip
    result = run_cli("fit", "--config", str(REPO / "experiments" / "shapes_student.yaml"), "--experiment", "stopped",
                     "--runs_root", str(tmp_path / "runs"), "--model.lr_schedule", "poly",
                     *tiny_overrides(tiny_shapes, 40), *early_stopping, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    stopped = load_run(tmp_path / "runs" / "stopped")
    steps, _ = stopped.series("val/mIoU")
    assert steps == [1, 3] and stopped.stopped_early and stopped.finished
    _, teacher_dir, _, _ = teacher_run
    teacher = load_run(teacher_dir)
    assert teacher.finished and not teacher.stopped_early
    (tmp_path / "runs" / "stopped" / "metrics.csv").write_text("step,val/mIoU\n1,0.1\n")  # as if it were still going
    (tmp_path / "runs" / "stopped" / "last.ckpt").unlink()
    assert not load_run(tmp_path / "runs" / "stopped").finished
