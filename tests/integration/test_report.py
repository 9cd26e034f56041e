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
