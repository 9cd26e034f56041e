"""Which builder arguments fetch pretrained weights, so a network that a checkpoint will overwrite can be
built without them (no download just to replace the weights; rebuilds work offline)."""

from __future__ import annotations

import copy
from typing import Any

#: smp/timm encoders (``encoder_weights``), our detectors (``backbone_weights``), torchvision (``weights``)
PRETRAINED_ARGUMENTS = ("encoder_weights", "backbone_weights", "weights")


def without_pretrained(spec: dict[str, Any]) -> dict[str, Any]:
    """A ``{class_path, init_args}`` spec with its pretrained-weights arguments set to None."""
    spec = copy.deepcopy(spec)
    init_args = spec.get("init_args") or {}
    for key in PRETRAINED_ARGUMENTS:
        if init_args.get(key) is not None:
            init_args[key] = None
    return spec
