"""The notebooks execute on tiny runs."""

from __future__ import annotations

import os

import nbformat
import pytest
from nbclient import NotebookClient

from tests.helpers import REPO

pytestmark = pytest.mark.slow  # subprocess fits of minutes: `make test-fast` leaves them out

NOTEBOOKS = REPO / "notebooks"


@pytest.mark.parametrize("name", ["01_channel_distributions.ipynb", "02_compare_runs.ipynb"])
def test_notebook_executes(name, teacher_run, cwd_run, tiny_shapes, monkeypatch):
    work, cwd_dir = cwd_run
    monkeypatch.setenv("CWD_TEACHER_RUN", str(teacher_run[1]))
    monkeypatch.setenv("CWD_STUDENT_RUN", str(cwd_dir))
    monkeypatch.setenv("CWD_RUNS", str(work / "runs"))
    monkeypatch.setenv("CWD_DATA_ROOT", str(tiny_shapes))
    monkeypatch.setenv("CWD_NUM_IMAGES", "4")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), "commit without outputs"
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}},
                   env=dict(os.environ)).execute()  # fmt: skip
    errors = [o for cell in notebook.cells for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    text = "".join(o.get("text", "") for cell in notebook.cells for o in cell.get("outputs", []))
    if name.startswith("01"):
        assert "every map sums to 1: True" in text and "KL(T‖S) =" in text
    else:
        assert "shapes_cwd" in text and "agreement with teacher" in text
