"""The embedded `shapes` dataset: a complete, deterministic VOC layout, generated on first use, another spec
refused."""

from __future__ import annotations

from xml.etree import ElementTree as ET

import numpy as np
import pytest
from PIL import Image

from cwd_lightning.data import SHAPES_CLASSES, ShapesSpec, generate_shapes


def test_shapes_dataset_is_complete_voc_layout_and_deterministic(tiny_shapes, tmp_path):
    root = tiny_shapes
    train = (root / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    val = (root / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    assert len(train) == 24 and len(val) == 8 and not set(train) & set(val)
    name = train[0]
    with Image.open(root / "SegmentationClass" / f"{name}.png") as mask_image:
        assert mask_image.mode == "P"
        mask = np.array(mask_image)
    assert set(np.unique(mask)) <= set(range(len(SHAPES_CLASSES))) | {255}
    assert (mask == 255).any() and (mask == 0).any()
    objects = ET.parse(root / "Annotations" / f"{name}.xml").findall("object")
    assert objects and all(o.findtext("name") in SHAPES_CLASSES[1:] for o in objects)
    again = generate_shapes(tmp_path / "again", ShapesSpec(num_train=24, num_val=8, image_size=32, seed=1))
    assert (again / "SegmentationClass" / f"{name}.png").read_bytes() == (
        root / "SegmentationClass" / f"{name}.png"
    ).read_bytes()


def test_missing_embedded_root_is_generated_and_a_foreign_folder_is_refused(tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a complete generated shapes dataset"):
        generate_shapes(tmp_path / "busy", ShapesSpec(num_train=2, num_val=1, image_size=32))
    assert (tmp_path / "busy" / "mine.txt").read_text() == "keep me"


def test_data_generated_from_another_spec_is_refused_not_reused(tmp_path):
    generate_shapes(tmp_path / "shapes", ShapesSpec(num_train=3, num_val=1, image_size=32, seed=1))
    before = sorted(p.name for p in (tmp_path / "shapes" / "JPEGImages").iterdir())
    for changed in ({"num_train": 4}, {"seed": 2}, {"image_size": 48}):
        spec = ShapesSpec(**{"num_train": 3, "num_val": 1, "image_size": 32, "seed": 1, **changed})
        with pytest.raises(FileExistsError, match=r"generated from ShapesSpec\(num_train=3.*not the requested"):
            generate_shapes(tmp_path / "shapes", spec)
    assert sorted(p.name for p in (tmp_path / "shapes" / "JPEGImages").iterdir()) == before  # nothing deleted
    assert generate_shapes(tmp_path / "shapes", ShapesSpec(num_train=3, num_val=1, image_size=32, seed=1))
