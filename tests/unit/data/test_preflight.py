"""The pre-flight read of every sample: all broken files reported at once, what passed cached."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from cwd_lightning.data import ShapesSpec, generate_shapes
from cwd_lightning.data import segmentation as readers


def test_preflight_reports_every_broken_sample_at_once_and_caches_what_passed(tmp_path):
    from cwd_lightning.data.preflight import check_samples

    root = generate_shapes(tmp_path / "shapes", ShapesSpec(num_train=6, num_val=1, image_size=32, seed=1))
    pairs = readers.voc_pairs(root, "train")
    pairs[0][0].write_bytes(b"not a jpeg")  # a truncated download
    mask = np.array(Image.open(pairs[1][1]))
    mask[0, 0] = 40  # a class id the task does not have
    Image.fromarray(mask).save(pairs[1][1])
    Image.open(pairs[2][1]).resize((16, 16)).save(pairs[2][1])  # a mask of another size
    dataset = readers.SegmentationFiles(pairs, 11)
    cache = tmp_path / "cache.json"
    with pytest.raises(ValueError, match=r"split 'train': 3 of 6 sample\(s\) cannot be used") as error:
        check_samples(dataset.pairs, dataset.load, "split 'train'", cache)
    for fragment in (pairs[0][0].name, f"{pairs[1][1].name}.*class ids \\[40\\]", f"{pairs[2][1].name}.*16×16"):
        assert re.search(fragment, str(error.value)), fragment

    loads = []

    def counting(index):
        loads.append(index)
        return dataset.load(index)

    for index in range(3):  # repaired
        dataset.pairs[index] = readers.voc_pairs(generate_shapes(tmp_path / "fresh", ShapesSpec(
            num_train=6, num_val=1, image_size=32, seed=1)), "train")[index]  # fmt: skip
    check_samples(dataset.pairs, counting, "split 'train'", cache)
    assert sorted(loads) == [0, 1, 2]  # the three good ones were remembered, not read again
    loads.clear()
    check_samples(dataset.pairs, counting, "split 'train'", cache)
    assert loads == []  # a second run reads nothing
