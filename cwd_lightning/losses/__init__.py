"""Distillation losses: pure functions of (student, teacher) tensors, one file per method."""

from cwd_lightning.losses.cwd import ChannelWiseDivergence

__all__ = ["ChannelWiseDivergence"]
