"""Shared fixtures: tiny models and tiny data in the real formats; nothing is downloaded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("WANDB_SILENT", "true")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_shapes(tmp_path_factory) -> Path:
    """A small generated `shapes` dataset (VOC layout), shared by the tests of a session."""
    from cwd_lightning.data.shapes import ShapesSpec, generate_shapes

    root = tmp_path_factory.mktemp("data") / "shapes"
    return generate_shapes(root, ShapesSpec(num_train=24, num_val=8, image_size=32, seed=1))
