"""The one markdown table writer and its number formats."""

from __future__ import annotations

import pytest

from cwd_lightning.analysis.tables import duration, format_mean_std, markdown_table, mean_std


def test_mean_and_sample_std():
    assert mean_std([0.2, 0.4]) == pytest.approx((0.3, 0.1414213562))
    assert mean_std([0.5]) == (0.5, 0.0)
    assert format_mean_std([0.2615, 0.2577, 0.2651]) == "0.2614 ± 0.0037"


def test_markdown_table_writes_cells_as_given_and_none_as_a_dash():
    assert markdown_table(["row", "mIoU"], [["cwd", 0.26], ["baseline", None]]) == [
        "| row | mIoU |", "|---|---|", "| cwd | 0.26 |", "| baseline | – |"]  # fmt: skip


def test_duration():
    assert duration(642.3) == "10 min 42 s" and duration(5) == "0 min 05 s" and duration(None) == "–"
