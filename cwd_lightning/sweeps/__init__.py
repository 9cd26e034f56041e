"""Comparison tables from many runs: ``python -m cwd_lightning.sweeps experiments/tables/shapes.yaml``.

A table file (``spec.py``) names rows (an experiment YAML plus optional CLI arguments), seeds and the
arguments every row shares (e.g. a shorter schedule). ``runner.py`` runs each (row, seed) as one ``fit``
in its own process under ``runs/tables/<table>/<row>_seed<k>/`` and, when it finishes, writes a small
result file ``results/<table>/<row>/seed<k>.json`` (best and last validation metric, wall and CPU time,
hardware, commit, teacher fingerprint, digest of the resolved config; ``runs/provenance.py``). Runs whose
result exists for the same resolved config and teacher are skipped, so an interrupted sweep resumes and
a table can be filled on several machines by committing the result files. ``markdown.py`` writes
``results/<table>_table.md`` (mean ± std over seeds, Δ vs the baseline row) and a W&B table. A table with a
``budget`` compares at equal compute: every row trains for the same seconds of its training loop, and the
steps it reached are a column.
"""

from cwd_lightning.sweeps.markdown import write_markdown
from cwd_lightning.sweeps.runner import current_result, run_table, teacher_fingerprint
from cwd_lightning.sweeps.spec import Budget, Row, Table, check_same_recipe

__all__ = [
    "Budget",
    "Row",
    "Table",
    "check_same_recipe",
    "current_result",
    "run_table",
    "teacher_fingerprint",
    "write_markdown",
]
