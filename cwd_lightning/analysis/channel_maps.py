"""Per-channel spatial distributions (CWD's view of a feature map): the distributions, their entropy, the
channels that differ most. Their KL is the loss's own: ``ChannelWiseDivergence.kl_per_sample_channel``."""

from __future__ import annotations

import torch
from torch import Tensor


def spatial_distributions(maps: Tensor, tau: float = 1.0) -> Tensor:
    """N×C×H×W → N×C×H×W where every (n, c) map is softmax over its H·W positions of y/τ (sums to 1)."""
    n, c, h, w = maps.shape
    return torch.softmax(maps.detach().float().reshape(n, c, h * w) / tau, dim=-1).reshape(n, c, h, w)


def channel_entropy(distributions: Tensor) -> Tensor:
    """Shannon entropy (nats) of every (sample, channel) distribution → N×C; log(H·W) is uniform."""
    p = distributions.flatten(2)
    return -(p * torch.log(p.clamp_min(1e-30))).sum(-1)


def top_k_channels(kl: Tensor, k: int) -> list[int]:
    """Indices of the k channels with the largest KL (a 1-D tensor over channels), largest first."""
    k = min(k, kl.numel())
    return torch.topk(kl, k).indices.tolist()
