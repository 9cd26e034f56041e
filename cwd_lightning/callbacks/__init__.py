"""Callbacks: monitors that log what distillation does to W&B (no-ops without a WandbLogger), and the
statistics a fit logs at its start."""

from cwd_lightning.callbacks.channel_distributions import ChannelDistributionMonitor
from cwd_lightning.callbacks.fixed_batch import FixedBatchCallback
from cwd_lightning.callbacks.run_statistics import RunStatistics
from cwd_lightning.callbacks.segmentation_predictions import SegmentationPredictionMonitor

__all__ = ["ChannelDistributionMonitor", "FixedBatchCallback", "RunStatistics", "SegmentationPredictionMonitor"]
