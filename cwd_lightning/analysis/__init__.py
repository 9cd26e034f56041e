"""Looking at runs: per-channel spatial distributions, figures, reading finished runs, results tables."""

from cwd_lightning.analysis.channel_maps import channel_entropy, spatial_distributions, top_k_channels
from cwd_lightning.analysis.runs import Run, find_runs, load_run, load_student, validation_batch
from cwd_lightning.analysis.tables import markdown_table, mean_std

__all__ = [
    "Run",
    "channel_entropy",
    "find_runs",
    "load_run",
    "load_student",
    "markdown_table",
    "mean_std",
    "spatial_distributions",
    "top_k_channels",
    "validation_batch",
]
