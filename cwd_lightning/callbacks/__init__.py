"""Monitors that log what distillation does to W&B (no-ops without a WandbLogger)."""

from cwd_lightning.callbacks.channel_distributions import ChannelDistributionMonitor
from cwd_lightning.callbacks.segmentation_predictions import SegmentationPredictionMonitor

__all__ = ["ChannelDistributionMonitor", "SegmentationPredictionMonitor"]
