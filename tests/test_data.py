"""Readers on small trees written in the real VOC 2012 / Cityscapes layouts; transforms; shapes."""

from __future__ import annotations

import re
from pathlib import Path
from xml.etree import ElementTree as ET

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from cwd_lightning.data import readers
from cwd_lightning.data.datamodule import SegmentationDataModule
from cwd_lightning.data.palette import voc_palette
from cwd_lightning.data.shapes import SHAPES_CLASSES, ShapesSpec, generate_shapes
from cwd_lightning.data.transforms import train_transforms


def _palette_png(path: Path, mask: np.ndarray) -> None:
    image = Image.fromarray(mask.astype(np.uint8), mode="P")
    image.putpalette(voc_palette())
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def _jpg(path: Path, height: int, width: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path)


def _voc_tree(root: Path, masks: dict[str, np.ndarray], split: str = "train") -> Path:
    for name, mask in masks.items():
        _jpg(root / "JPEGImages" / f"{name}.jpg", *mask.shape)
        _palette_png(root / "SegmentationClass" / f"{name}.png", mask)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(masks) + "\n")
    return root


def test_voc_reader_returns_class_indices_not_colours(tmp_path):
    mask = np.zeros((20, 30), dtype=np.uint8)
    mask[2:8, 3:9] = 15  # person
    mask[10:12, :] = 255  # boundary
    root = _voc_tree(tmp_path / "VOC2012", {"2007_000001": mask})
    dataset = readers.SegmentationFiles(readers.voc_pairs(root, "train"), num_classes=21)
    image, target = dataset[0]
    assert image.shape == (3, 20, 30) and image.dtype == torch.uint8
    assert target.dtype == torch.long
    assert torch.equal(target, torch.from_numpy(mask).long())


def test_voc_trainaug_reads_segmentation_class_aug(tmp_path):
    root = tmp_path / "VOC2012"
    mask = np.full((8, 8), 3, dtype=np.uint8)
    _jpg(root / "JPEGImages" / "a.jpg", 8, 8)
    (root / "SegmentationClassAug").mkdir(parents=True)
    Image.fromarray(mask, mode="L").save(root / "SegmentationClassAug" / "a.png")
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "trainaug.txt").write_text("a\n")
    dataset = readers.SegmentationFiles(readers.voc_pairs(root, "trainaug"), num_classes=21)
    assert dataset[0][1].unique().tolist() == [3]


def test_missing_root_says_how_to_get_the_data(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist.*VOC 2012"):
        readers.voc_pairs(tmp_path / "nowhere", "train")
    with pytest.raises(FileNotFoundError, match=r"does not exist.*Cityscapes.*account"):
        readers.cityscapes_pairs(tmp_path / "nowhere", "train")
    root = _voc_tree(tmp_path / "VOC2012", {"a": np.zeros((4, 4))})
    with pytest.raises(FileNotFoundError, match=r"split file .*val.txt not found"):
        readers.voc_pairs(root, "val")


def test_listed_but_missing_files_are_named(tmp_path):
    root = _voc_tree(tmp_path / "VOC2012", {"a": np.zeros((4, 4))})
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("a\nghost\n")
    with pytest.raises(FileNotFoundError, match=r"ghost.jpg"):
        readers.voc_pairs(root, "train")


def test_mask_with_class_ids_beyond_num_classes_is_rejected(tmp_path):
    mask = np.zeros((6, 6), dtype=np.uint8)
    mask[0, 0], mask[1, 1], mask[2, 2] = 21, 40, 255
    root = _voc_tree(tmp_path / "VOC2012", {"bad": mask})
    dataset = readers.SegmentationFiles(readers.voc_pairs(root, "train"), num_classes=21)
    with pytest.raises(ValueError, match=r"bad.png has class ids \[21, 40\] ≥ num_classes=21"):
        dataset[0]


def test_image_mask_size_mismatch_names_both_files(tmp_path):
    root = _voc_tree(tmp_path / "VOC2012", {"a": np.zeros((6, 6))})
    _jpg(root / "JPEGImages" / "a.jpg", 6, 7)
    dataset = readers.SegmentationFiles(readers.voc_pairs(root, "train"), num_classes=21)
    with pytest.raises(ValueError, match=r"a.jpg is 7×6 but its mask .*a.png is 6×6"):
        dataset[0]


def test_unreadable_image_is_named(tmp_path):
    root = _voc_tree(tmp_path / "VOC2012", {"a": np.zeros((6, 6))})
    (root / "JPEGImages" / "a.jpg").write_bytes(b"not a jpeg")
    dataset = readers.SegmentationFiles(readers.voc_pairs(root, "train"), num_classes=21)
    with pytest.raises(ValueError, match=r"cannot read image .*a.jpg"):
        dataset[0]


def test_cityscapes_reader_maps_label_ids_to_train_ids(tmp_path):
    root = tmp_path / "cityscapes"
    stem = "aachen_000000_000019"
    label_ids = np.array([[7, 26, 0], [33, 1, 24]], dtype=np.uint8)  # road, car, unlabeled / bicycle, ego, person
    image = root / "leftImg8bit" / "val" / "aachen" / f"{stem}_leftImg8bit.png"
    image.parent.mkdir(parents=True)
    Image.fromarray(np.zeros((2, 3, 3), dtype=np.uint8)).save(image)
    gt = root / "gtFine" / "val" / "aachen" / f"{stem}_gtFine_labelIds.png"
    gt.parent.mkdir(parents=True)
    Image.fromarray(label_ids, mode="L").save(gt)
    pairs = readers.cityscapes_pairs(root, "val")
    assert pairs == [(image, gt)]
    dataset = readers.SegmentationFiles(pairs, 19, label_lut=readers.cityscapes_label_lut())
    assert dataset[0][1].tolist() == [[0, 13, 255], [18, 255, 11]]


def test_train_transforms_pad_masks_with_255_and_keep_labels_nearest():
    torch.manual_seed(0)
    image = tv_tensors.Image(torch.randint(0, 255, (3, 20, 24), dtype=torch.uint8))
    mask = tv_tensors.Mask(torch.randint(0, 3, (20, 24), dtype=torch.uint8))
    transform = train_transforms(crop_size=48, base_size=20, scale_range=(1.0, 1.0))
    out_image, out_mask = transform(image, mask)
    assert out_image.shape == (3, 48, 48) and out_image.dtype == torch.float32
    assert set(out_mask.unique().tolist()) <= {0, 1, 2, 255}  # nearest: no blended labels
    assert (out_mask == 255).sum() >= 48 * 48 - 20 * 24  # the padding is ignored


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


def test_datamodule_batches_from_the_embedded_dataset(tiny_shapes):
    datamodule = SegmentationDataModule(str(tiny_shapes), 11, crop_size=32, base_size=32, batch_size=4,
                                        val_batch_size=8, num_workers=0)  # fmt: skip
    datamodule.setup("fit")
    images, masks = next(iter(datamodule.train_dataloader()))
    assert images.shape == (4, 3, 32, 32) and masks.shape == (4, 32, 32)
    images, masks = next(iter(datamodule.val_dataloader()))
    assert images.shape == (8, 3, 32, 32)


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


def test_an_empty_split_or_one_smaller_than_a_batch_is_an_error(tmp_path):
    generate_shapes(tmp_path / "shapes", ShapesSpec(num_train=3, num_val=1, image_size=32, seed=1))
    val_list = tmp_path / "shapes" / "ImageSets" / "Segmentation" / "val.txt"
    val_list.write_text("\n")  # before: no validation, no best.ckpt, exit 0
    with pytest.raises(ValueError, match=r"split file .*val.txt lists no images"):
        readers.voc_pairs(tmp_path / "shapes", "val")
    datamodule = SegmentationDataModule(str(tmp_path / "shapes"), 11, crop_size=32, base_size=32, batch_size=4)
    with pytest.raises(ValueError, match=r"split 'train' has 3 image\(s\), fewer than data.init_args.batch_size = 4"):
        datamodule.setup("fit")


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
