"""Which builder arguments fetch pretrained weights, so a network that a checkpoint will overwrite can be
built without them (no download just to replace the weights; rebuilds work offline)."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

#: smp/timm encoders (``encoder_weights``), our detectors (``backbone_weights``), torchvision (``weights``), timm
#: (``pretrained``), a builder's own weights file (``checkpoint``)
PRETRAINED_ARGUMENTS = ("encoder_weights", "backbone_weights", "weights", "pretrained", "checkpoint")


def without_pretrained(spec: dict[str, Any]) -> dict[str, Any]:
    """A ``{class_path, init_args}`` spec with its pretrained-weights arguments set to None."""
    spec = copy.deepcopy(spec)
    init_args = spec.get("init_args") or {}
    for key in PRETRAINED_ARGUMENTS:
        if init_args.get(key) is not None:
            init_args[key] = None
    return spec


@contextmanager
def built_without_pretrained(specs: list[Any]) -> Iterator[None]:
    """Inside the block, the pretrained-weights arguments of the network ``specs`` (parsed ``{class_path,
    init_args}`` values of a ``model`` section; None skipped) are None, so those networks are built without
    fetching weights that a checkpoint will replace; afterwards the config holds the values as written (the
    saved config keeps them)."""
    changed = [
        (spec["init_args"], key, spec["init_args"][key])
        for spec in specs
        if spec is not None and spec.get("init_args") is not None
        for key in PRETRAINED_ARGUMENTS
        if spec["init_args"].get(key) is not None
    ]
    for init_args, key, _ in changed:
        init_args[key] = None
    try:
        yield
    finally:
        for init_args, key, value in changed:
            init_args[key] = value
