"""Segmentation data: VOC and Cityscapes readers (class indices, not colours; errors naming the file), the
transforms' 255 padding, the DataModule's batches and its refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from cwd_lightning.data import SegmentationDataModule, ShapesSpec, generate_shapes
from cwd_lightning.data import segmentation as readers
from cwd_lightning.data.palette import voc_palette
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


def test_datamodule_batches_from_the_embedded_dataset(tiny_shapes):
    datamodule = SegmentationDataModule(str(tiny_shapes), 11, crop_size=32, base_size=32, batch_size=4,
                                        val_batch_size=8, num_workers=0)  # fmt: skip
    datamodule.setup("fit")
    images, masks = next(iter(datamodule.train_dataloader()))
    assert images.shape == (4, 3, 32, 32) and masks.shape == (4, 32, 32)
    images, masks = next(iter(datamodule.val_dataloader()))
    assert images.shape == (8, 3, 32, 32)


def test_an_empty_split_or_one_smaller_than_a_batch_is_an_error(tmp_path):
    generate_shapes(tmp_path / "shapes", ShapesSpec(num_train=3, num_val=1, image_size=32, seed=1))
    val_list = tmp_path / "shapes" / "ImageSets" / "Segmentation" / "val.txt"
    val_list.write_text("\n")  # before: no validation, no best.ckpt, exit 0
    with pytest.raises(ValueError, match=r"split file .*val.txt lists no images"):
        readers.voc_pairs(tmp_path / "shapes", "val")
    datamodule = SegmentationDataModule(str(tmp_path / "shapes"), 11, crop_size=32, base_size=32, batch_size=4)
    with pytest.raises(ValueError, match=r"split 'train' has 3 image\(s\), fewer than data.init_args.batch_size = 4"):
        datamodule.setup("fit")


def test_a_seeded_sample_draws_what_torch_manual_seed_would_and_leaves_the_global_rng_alone(tmp_path):
    """The training loader augments sample ``(index, seed)`` under the CPU generator seeded with ``seed``: the
    same augmentation as ``torch.manual_seed(seed)`` gave (every committed result was drawn that way), and the
    global RNG state (dropout in the main process when there are no workers) as it was, even on an error."""
    from cwd_lightning.data.sampling import SeededAugmentation

    mask = np.zeros((40, 48), dtype=np.uint8)
    mask[5:30, 10:40] = 3
    root = _voc_tree(tmp_path / "voc", {"a": mask})
    files = readers.SegmentationFiles(readers.voc_pairs(root, "train"), 21, train_transforms(32, 40, (0.5, 2.0)))
    seeded = SeededAugmentation(files)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    draws = [seeded[(0, seed)] for seed in (7, 8, 7)]
    assert torch.equal(torch.get_rng_state(), before)
    for seed, (image, labels) in zip((7, 8, 7), draws, strict=True):
        torch.manual_seed(seed)
        expected_image, expected_labels = files[0]
        assert torch.equal(image, expected_image) and torch.equal(labels, expected_labels)
    assert not torch.equal(draws[0][1], draws[1][1]) or not torch.equal(draws[0][0], draws[1][0])

    files.pairs = [(root / "missing.jpg", root / "missing.png")]
    torch.manual_seed(123)
    with pytest.raises(Exception, match="missing"):
        seeded[(0, 7)]
    assert torch.equal(torch.get_rng_state(), before)
