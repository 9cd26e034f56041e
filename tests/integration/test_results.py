"""The committed result files are the runs their tables describe at the current code: `make table` starts no
run for them (given the teacher they were made with; none at all for a complete table, the missing runs of a table
still being filled), and every result's recorded config is its row's resolved config."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from cwd_lightning.analysis.runs import load_run
from cwd_lightning.runs.identity import identity_digest
from cwd_lightning.sweeps import runner
from cwd_lightning.sweeps.spec import Table
from scripts.record_teacher import flattened
from tests.helpers import REPO

TABLES = sorted((REPO / "experiments" / "tables").glob("*.yaml"))
WITH_RESULTS = [path for path in TABLES if any((REPO / "results" / Table.load(path).name).glob("*/seed*.json"))]


@pytest.mark.parametrize("table_file", WITH_RESULTS, ids=lambda path: path.stem)
def test_make_table_starts_no_run_for_the_committed_results(table_file, monkeypatch, capsys, tmp_path):
    table = Table.load(table_file)
    results = REPO / "results"
    recorded = {path: json.loads(path.read_text()) for path in (results / table.name).glob("*/seed*.json")}
    (teacher,) = {result["teacher_fingerprint"] for result in recorded.values()} - {None}
    # the runs' teacher checkpoint is not in the repository: the fingerprint it had, as the runs recorded it
    monkeypatch.setattr(runner, "teacher_fingerprint",
                        lambda config: teacher if config["model"].get("teacher_checkpoint") else None)  # fmt: skip
    runner.run_table(table, REPO / "experiments", tmp_path / "runs", results, dry_run=True)
    printed = capsys.readouterr().out
    assert printed.count(": done (") == len(recorded)  # no committed result would be run again
    if len(recorded) == len(table.rows) * len(table.seeds):  # a complete table starts no run at all
        assert "to run" not in printed
    for result in recorded.values():
        assert result["config_digest"] == identity_digest(result["resolved_config"])
        assert "config_migrations" not in result  # no shim: the files were migrated (scripts/migrate_results.py)


QUOTED_PAIR = re.compile(r"(\d\.\d+) ± (\d\.\d+)")
QUOTED_SEEDS = re.compile(r"\d\.\d{4}(?:, \d\.\d{4}){2,}")


def _table_cells() -> tuple[list[tuple[float, float]], set[str]]:
    """Every ``mean ± std`` and every per-seed cell of the tables that `python -m cwd_lightning.sweeps` wrote."""
    pairs, seeds = [], set()
    for table in (REPO / "results").rglob("*_table.md"):
        for line in table.read_text().splitlines():
            if not line.startswith("|"):
                continue
            for cell in (cell.strip().strip("*") for cell in line.strip("|").split("|")):
                if match := QUOTED_PAIR.fullmatch(cell):
                    pairs.append((float(match[1]), float(match[2])))
                elif re.fullmatch(r"\d\.\d{4}(, \d\.\d{4})+", cell):
                    seeds.add(cell)
    return pairs, seeds


@pytest.mark.parametrize("page", ["README.md", "docs/results.md"])
def test_every_result_the_docs_quote_is_in_a_result_table(page):
    """A mean ± std quoted in the page (at whatever precision) rounds from a row of a table under results/, and
    a list of three per-seed values is one of those tables' cells: the docs cannot drift from the result files."""
    pairs, seeds = _table_cells()
    assert pairs and seeds, "no result tables found under results/"
    text = (REPO / page).read_text().replace("\n", " ")
    for match in QUOTED_PAIR.finditer(text):
        mean, std = match[1], match[2]
        decimals = len(mean.split(".")[1]), len(std.split(".")[1])
        assert any(f"{m:.{decimals[0]}f}" == mean and f"{s:.{decimals[1]}f}" == std for m, s in pairs), (
            f"{page}: '{match[0]}' is in no table under results/"
        )
    for match in QUOTED_SEEDS.finditer(text):
        if match[0].count(",") != 2:
            continue  # a validation curve, not three seeds
        assert match[0] in seeds, f"{page}: per-seed values '{match[0]}' are in no table under results/"


def test_every_result_table_is_what_its_result_files_give(tmp_path):
    """The committed markdown of a table equals the one its result files write now."""
    from cwd_lightning.sweeps.markdown import write_markdown

    for table_file in WITH_RESULTS:
        table = Table.load(table_file)
        committed = (REPO / "results" / f"{table.name}_table.md").read_text()
        copy = tmp_path / table.name
        shutil.copytree(REPO / "results" / table.name, copy / table.name)
        assert write_markdown(table, copy).read_text() == committed, f"results/{table.name}_table.md is out of date"


TEACHER_RECORDS = sorted((REPO / "results" / "teachers").glob("*/teacher.json"))


@pytest.mark.parametrize("record", TEACHER_RECORDS, ids=lambda path: path.parent.name)
def test_a_teacher_record_is_the_teacher_of_its_results_and_the_docs_quote_its_curve(record):
    """``results/teachers/<exp>/`` keeps the run the tables' teacher came from (its config.yaml and metrics.csv, as
    the run wrote them): every result distilled from ``runs/<exp>/best.ckpt`` recorded its fingerprint, and
    docs/results.md quotes its whole validation curve as the metrics give it."""
    teacher = json.loads(record.read_text())
    steps, values = load_run(record.parent).series(teacher["metric"])
    assert (max(values), steps[-1] + 1) == (teacher["best"], teacher["steps"])
    checkpoint = f"runs/{teacher['experiment']}/best.ckpt"
    results = [json.loads(path.read_text()) for path in (REPO / "results").glob("*/*/seed*.json")]
    fingerprints = {result["teacher_fingerprint"] for result in results
                    if result["resolved_config"]["model"].get("teacher_checkpoint") == checkpoint}  # fmt: skip
    assert fingerprints <= {teacher["fingerprint"]}, f"{record}: results made from another {checkpoint}"
    if "flattened" in teacher:  # the criterion recorded with the run, recomputed from its metrics
        criterion = teacher["flattened"]
        assert flattened(values, criterion["last_validations"], criterion["below"]) == criterion
    curve = ", ".join(f"{value:.4f}" for value in values)
    assert curve in (REPO / "docs" / "results.md").read_text().replace("\n", " "), f"docs/results.md: no {curve}"


def test_the_flattening_criterion_compares_the_last_validations_with_the_best_before_them():
    curve = [0.10, 0.20, 0.30, 0.31, 0.305]
    assert flattened(curve, 2, 0.02) == {
        "last_validations": 2,
        "below": 0.02,
        "gain": pytest.approx(0.01),
        "flat": True,
    }
    assert not flattened(curve, 2, 0.005)["flat"]
    assert not flattened(curve, 3, 0.05)["flat"]  # 0.31 against 0.20: still rising
    with pytest.raises(ValueError, match="5 validations"):
        flattened(curve, 5, 0.01)


def test_the_stopped_one_cycle_detection_teacher_could_no_longer_meet_the_criterion():
    """The first detection teacher (one-cycle over 8000 steps) was stopped after 14 of its 16 validations: the
    criterion at step 8000 compares the best of validations 13–16 with the best of 1–12, and validation 14 already
    exceeds that by more than the 0.005 allowed. docs/results.md quotes the curve."""
    archived = load_run(REPO / "results" / "archive" / "det_teacher_onecycle_8000")
    steps, values = archived.series("val/mAP")
    assert (len(values), steps[-1] + 1, archived.config["trainer"]["max_steps"]) == (14, 7000, 8000)
    assert max(values[12:]) - max(values[:12]) >= 0.005
    curve = ", ".join(f"{value:.4f}" for value in values)
    assert curve in (REPO / "docs" / "results.md").read_text().replace("\n", " "), f"docs/results.md: no {curve}"
