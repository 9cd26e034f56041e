"""Distillation losses, one file per method: pure functions of (student, teacher) tensors, or modules
that declare what more they need (labels, modules of their own, an optimiser of their own, a preparation on the
teacher, a part of the teacher to run; see base.py)."""

from cwd_lightning.losses.afdcd import AfDCD
from cwd_lightning.losses.attention_transfer import AttentionTransfer
from cwd_lightning.losses.base import DistillationLoss
from cwd_lightning.losses.channel_mean import ChannelMeanMSE
from cwd_lightning.losses.cosine import CosineDistance
from cwd_lightning.losses.crosskd import CrossHeadKD
from cwd_lightning.losses.cwd import ChannelWiseDivergence
from cwd_lightning.losses.dist import DIST
from cwd_lightning.losses.fgd import FocalGlobalDistillation
from cwd_lightning.losses.fitnets import FitNets
from cwd_lightning.losses.holistic import HolisticAdversarial
from cwd_lightning.losses.ifvd import IntraClassFeatureVariation
from cwd_lightning.losses.local_affinity import LocalAffinity
from cwd_lightning.losses.maskd import MasKD
from cwd_lightning.losses.mgd import MaskedGenerativeDistillation
from cwd_lightning.losses.nfd import NormalizedFeatureDistillation
from cwd_lightning.losses.pairwise_affinity import PairwiseAffinity
from cwd_lightning.losses.pixel_kd import PixelWiseKD
from cwd_lightning.losses.pkd import PKD

__all__ = [
    "DIST",
    "PKD",
    "AfDCD",
    "AttentionTransfer",
    "ChannelMeanMSE",
    "ChannelWiseDivergence",
    "CosineDistance",
    "CrossHeadKD",
    "DistillationLoss",
    "FitNets",
    "FocalGlobalDistillation",
    "HolisticAdversarial",
    "IntraClassFeatureVariation",
    "LocalAffinity",
    "MasKD",
    "MaskedGenerativeDistillation",
    "NormalizedFeatureDistillation",
    "PairwiseAffinity",
    "PixelWiseKD",
]
