"""A CSV metrics log that a resumed run appends to (Lightning's CSVLogger deletes it)."""

from __future__ import annotations

import csv
import os

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


class _AppendingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        """Keep an existing metrics.csv: it holds the rows of the run being resumed."""

    def _record_new_keys(self) -> set[str]:
        if not self.metrics_keys and os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as handle:
                self.metrics_keys = list(next(csv.reader(handle), []))
        return super()._record_new_keys()


class AppendingCSVLogger(CSVLogger):
    """``metrics.csv`` in ``save_dir`` itself; rows from an earlier run of the same folder are kept and
    new columns extend the header."""

    def __init__(self, save_dir: str) -> None:
        super().__init__(save_dir=save_dir, name="", version="")

    def discard_from(self, step: int) -> int:
        """Drop the rows logged at ``step`` or later: a run resumed from the checkpoint of ``step`` logs
        them again (they were written after that checkpoint, before the run died). Returns how many."""
        path = os.path.join(self.log_dir, ExperimentWriter.NAME_METRICS_FILE)
        if not os.path.isfile(path):
            return 0
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            header, rows = reader.fieldnames or [], list(reader)
        kept = [row for row in rows if not row.get("step") or int(float(row["step"])) < step]
        if len(kept) != len(rows):
            temporary = path + ".tmp"
            with open(temporary, "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=header)
                writer.writeheader()
                writer.writerows(kept)
            os.replace(temporary, path)
        return len(rows) - len(kept)

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment
