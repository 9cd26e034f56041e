"""ViT tokens as maps: the class, register and distillation tokens dropped, the patch tokens on their grid;
other image sizes refused or padded; CWD and the cosine distance distil a ViT teacher's maps into a CNN."""

from __future__ import annotations

from functools import partial

import lightning as L
import pytest
import torch

from cwd_lightning.distill import DistillationModule, DistillTerm
from cwd_lightning.losses import ChannelWiseDivergence, CosineDistance
from cwd_lightning.models import VitFeatureMaps, tokens_to_map, vit_features
from cwd_lightning.tasks import SegmentationTask
from tests.helpers import tiny_datamodule, tiny_segmenter

#: a ViT small enough for a test: 32×32 images, 8×8 patches, 2 blocks of width 32, a class and 2 register tokens
TINY = {
    "name": "vit_tiny_patch16_224",
    "timm_args": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "reg_tokens": 2},
}


def test_tokens_become_the_patch_grid_without_the_prefix_tokens():
    grid = (2, 3)
    patches = torch.arange(2 * 6 * 4, dtype=torch.float32).reshape(2, 6, 4)  # N=2, 6 patch tokens, C=4
    prefix = torch.full((2, 3, 4), -1.0)  # class + 2 register tokens
    maps = tokens_to_map(torch.cat([prefix, patches], dim=1), 3, grid)
    assert maps.shape == (2, 4, 2, 3) and not (maps == -1).any()
    assert torch.equal(maps[1, :, 1, 2], patches[1, 5])  # row 1, column 2: the sixth patch token
    with pytest.raises(ValueError, match="9 tokens minus 3 prefix tokens is 6, not the 2×2 patch grid"):
        tokens_to_map(torch.cat([prefix, patches], dim=1)[:1], 3, (2, 2))


def test_a_vit_gives_its_final_and_block_maps_and_refuses_or_pads_other_sizes():
    torch.manual_seed(0)
    model = vit_features(blocks=[0, -1], **TINY).eval()
    assert model.vit.num_prefix_tokens == 3
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        maps = model(images)
        tokens = model.vit.forward_features(images)
    assert set(maps) == {"features", "block0", "block1"} and maps["features"].shape == (2, 32, 4, 4)
    assert torch.equal(maps["features"], tokens[:, 3:].transpose(1, 2).reshape(2, 32, 4, 4))
    with pytest.raises(ValueError, match=r"image of 36×32 is not a multiple of the ViT's 8×8 patch.*pad: true"):
        model(torch.randn(1, 3, 36, 32))
    padded = vit_features(pad=True, **TINY).eval()
    with torch.no_grad():
        assert padded(torch.randn(1, 3, 36, 30))["features"].shape == (1, 32, 5, 4)  # padded to 40×32
    with pytest.raises(ValueError, match="needs a timm ViT"):
        VitFeatureMaps(torch.nn.Conv2d(3, 3, 1))


def test_cwd_and_the_cosine_distance_distil_a_vit_teachers_maps_into_a_cnn(tmp_path, tiny_shapes):
    torch.manual_seed(0)
    torch.save(vit_features(**TINY).state_dict(), tmp_path / "vit.pt")
    terms = [
        DistillTerm("cosine_features", "decoder", "/features", CosineDistance(), 1.0, connector="conv",
                    resize="teacher_to_student"),
        DistillTerm("cwd_features", "decoder", "/features", ChannelWiseDivergence(4.0), 50.0, connector="conv_bn",
                    resize="teacher_to_student"),
    ]  # fmt: skip
    optimizer = partial(torch.optim.AdamW, lr=1e-3)
    module = DistillationModule(SegmentationTask(11, example_size=32), tiny_segmenter(), vit_features(**TINY),
                                str(tmp_path / "vit.pt"), terms, optimizer=optimizer)  # fmt: skip
    pairs = {term: pair for term, (pair,) in module.distiller.pairs.items()}
    assert pairs["cosine_features"].connector[0].weight.shape == (32, 512, 1, 1)  # student 512 → teacher 32 channels
    trainer = L.Trainer(max_steps=2, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(module, tiny_datamodule(tiny_shapes))
    logged = trainer.callback_metrics
    assert 0 < float(logged["train/distill/cosine_features"]) <= 2 and float(logged["train/distill/cwd_features"]) > 0
