"""Which builder arguments fetch pretrained weights, so a network that a checkpoint will overwrite can be
built without them (no download just to replace the weights; rebuilds work offline)."""

from __future__ import annotations

import copy
import importlib
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
    saved config keeps them). A builder whose ``checkpoint`` also decides settings left unset (the detector's
    layout for an mmdetection file: its ``settings_from_checkpoint``) gets those settings first."""
    changed = []
    for spec in specs:
        init_args = None if spec is None else spec.get("init_args")
        if init_args is None:
            continue
        if init_args.get("checkpoint") is not None:
            module, _, name = spec["class_path"].rpartition(".")
            settings = getattr(getattr(importlib.import_module(module), name), "settings_from_checkpoint", None)
            implied = settings(init_args["checkpoint"]) if settings else {}
            changed += [(init_args, key, None) for key, value in implied.items() if init_args.get(key) is None]
            for key, value in implied.items():
                if init_args.get(key) is None:
                    init_args[key] = value
        for key in PRETRAINED_ARGUMENTS:
            if init_args.get(key) is not None:
                changed.append((init_args, key, init_args[key]))
                init_args[key] = None
    try:
        yield
    finally:
        for init_args, key, value in reversed(changed):
            init_args[key] = value
