"""The committed result files are the runs their tables describe at the current code: `make table` starts no
run for them (given the teacher they were made with), and every result's recorded config is its row's
resolved config."""

from __future__ import annotations

import json

import pytest

from cwd_lightning.runs.identity import identity_digest
from cwd_lightning.sweeps import runner
from cwd_lightning.sweeps.spec import Table
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
    assert "to run" not in printed
    assert printed.count(": done (") == len(table.rows) * len(table.seeds) == len(recorded)
    for result in recorded.values():
        assert result["config_digest"] == identity_digest(result["resolved_config"])
        assert "config_migrations" not in result  # no shim: the files were migrated (scripts/migrate_results.py)
