"""What several test modules use: the repository root, the CLI in a fresh process, shrinking an experiment to
a few steps on the tiny data, tiny files in the real formats and seeded random maps."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

REPO = Path(__file__).resolve().parents[1]
#: every experiment file (the presets a user runs)
EXPERIMENTS = sorted((REPO / "experiments").glob("*.yaml"))
#: the loss tests' batch and map size
N, H, W = 2, 5, 4


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m cwd_lightning ...`` in a fresh process, W&B offline, no hub access."""
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    # a W&B service started by this pytest process (in-process fits) must not be shared with the command,
    # as a user's shell would not: a killed run's id would stay "in use" in it and its resume be refused
    env.pop("WANDB_SERVICE", None)
    return subprocess.run([sys.executable, "-m", "cwd_lightning", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip


def tiny_overrides(data_root: Path, steps: int) -> list[str]:
    """Shrink an experiment to a few steps on the tiny dataset (32×32, batch 4)."""
    return [
        "--trainer.max_steps", str(steps), "--trainer.val_check_interval", "2",
        "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
        "--data.init_args.root", str(data_root), "--data.init_args.shapes", "null",
        "--data.init_args.crop_size", "32", "--data.init_args.base_size", "32",
        "--data.init_args.batch_size", "4", "--data.init_args.num_workers", "0",
        "--model.task.init_args.example_size", "32",
    ]  # fmt: skip


def tiny_cwd_fit(teacher_run, data_root: Path, runs: Path, experiment: str, steps: int) -> list[str]:
    """``fit`` of shapes_cwd shrunk by ``tiny_overrides``, distilled from ``teacher_run`` (poly schedule, so
    a resume may extend it), into ``runs/<experiment>``."""
    _, teacher_dir, _, _ = teacher_run
    return [
        "fit", "--config", str(REPO / "experiments" / "shapes_cwd.yaml"), "--experiment", experiment,
        "--runs_root", str(runs), "--model.teacher", str(REPO / "experiments" / "common" / "shapes_student_net.yaml"),
        "--model.teacher_checkpoint", str(teacher_dir / "best.ckpt"), "--model.lr_schedule", "poly",
        *tiny_overrides(data_root, steps),
    ]  # fmt: skip


def tiny_cli(config: Path, teacher: Path, data_root: Path, *extra: str):
    """The experiment with its own teacher and student networks (the teacher's weights from ``teacher``),
    shrunk to 2 steps on the tiny data, built in this process (``run=False``)."""
    from cwd_lightning.cli import DistillCLI

    args = ["--config", str(config), "--runs_root", str(teacher.parent / "method_runs"), "--experiment", config.stem,
            "--model.teacher_checkpoint", str(teacher), *tiny_overrides(data_root, 2),
            "--trainer.logger", "false", "--trainer.callbacks", "[]", "--trainer.enable_checkpointing", "false",
            "--trainer.limit_val_batches", "0", *extra]  # fmt: skip
    return DistillCLI(args=args, run=False)


def tiny_segmenter(arch: str = "PSPNet", encoder: str = "resnet18", classes: int = 11):
    """A randomly initialised smp network of the `shapes` size (no pretrained weights)."""
    from cwd_lightning.models import build_segmentation_model

    return build_segmentation_model(arch, encoder, classes, None)


def write_jpeg(path: Path, height: int = 40, width: int = 60, noise: bool = False) -> None:
    """A JPEG of the given size: mid grey, or seeded noise."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = (np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8) if noise
              else np.full((height, width, 3), 127, dtype=np.uint8))  # fmt: skip
    Image.fromarray(pixels).save(path)


def random_maps(*shape: int, seed: int, scale: float = 1.0) -> Tensor:
    """Seeded standard-normal maps of ``shape``, times ``scale``."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator) * scale


def cwd_module(teacher_file: Path, terms=None, **kwargs):
    """PSPNet-R18 distilled from the FPN-R18 in ``teacher_file`` (the ``teacher_file`` fixture) with CWD on
    the logits (w=3, τ=4), unless ``terms`` says otherwise; ``kwargs`` go to the module."""
    from functools import partial

    from cwd_lightning.distill import DistillationModule, DistillTerm
    from cwd_lightning.losses import ChannelWiseDivergence
    from cwd_lightning.tasks import SegmentationTask

    terms = terms if terms is not None else [
        DistillTerm("cwd_logits", "segmentation_head", "segmentation_head", ChannelWiseDivergence(4.0), 3.0)
    ]  # fmt: skip
    return DistillationModule(task=SegmentationTask(11, example_size=32), student=tiny_segmenter(),
                              teacher=tiny_segmenter("FPN", "resnet18"), teacher_checkpoint=str(teacher_file),
                              terms=terms, optimizer=partial(torch.optim.AdamW, lr=1e-3), **kwargs)  # fmt: skip


def tiny_datamodule(root: Path):
    """The tiny `shapes` data at 32×32, batch 4, in this process (no workers)."""
    from cwd_lightning.data import SegmentationDataModule

    return SegmentationDataModule(str(root), 11, crop_size=32, base_size=32, batch_size=4, val_batch_size=8,
                                  num_workers=0)  # fmt: skip


def tiny_detection_datamodule(root: Path):
    """The tiny `shapes` data as COCO detection data (generated into ``root`` on first use), 32×32, batch 4."""
    from cwd_lightning.data import SHAPES_CLASSES, DetectionDataModule, ShapesSpec

    return DetectionDataModule(str(root), SHAPES_CLASSES[1:], layout="coco", train_split="train", val_split="val",
                               image_dir="JPEGImages", image_size=32, batch_size=4, val_batch_size=4, num_workers=0,
                               shapes=ShapesSpec(num_train=24, num_val=8, image_size=32, seed=1))  # fmt: skip


def seeded_state(shapes: dict[str, list[int]]) -> dict[str, Tensor]:
    """Weights for a state_dict of these key names and shapes, each a function of its key alone (seeded by the
    key's CRC-32), so that a fixture written by another framework's model is rebuilt here without it: conv and
    linear weights ~ N(0, 1/fan_in), 1-D weights (norm scales) ~ 1 + N(0, 0.1²), biases and running means
    ~ N(0, 0.1²), running variances ~ U(0.5, 1.5), batch counters 0."""
    import zlib

    state = {}
    for key, shape in shapes.items():
        generator = torch.Generator().manual_seed(zlib.crc32(key.encode()))
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(0)
        elif key.endswith("running_var"):
            state[key] = 0.5 + torch.rand(shape, generator=generator)
        elif len(shape) >= 2:
            fan_in = int(torch.tensor(shape[1:]).prod())
            state[key] = torch.randn(shape, generator=generator) / fan_in**0.5
        elif key.endswith("weight"):
            state[key] = 1 + 0.1 * torch.randn(shape, generator=generator)
        else:
            state[key] = 0.1 * torch.randn(shape, generator=generator)
    return state


def fixture_input(batch: int = 1, size: int = 64) -> Tensor:
    """The fixed input the framework fixtures were computed on."""
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def tiny_segformer(folder: Path, classes: int = 11) -> Path:
    """A tiny random SegFormer (four stages of width 8–32, 58k parameters) saved with ``save_pretrained``."""
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    torch.manual_seed(0)
    config = SegformerConfig(num_labels=classes, depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 24, 32],
                             num_attention_heads=[1, 1, 1, 1], decoder_hidden_size=32)  # fmt: skip
    SegformerForSemanticSegmentation(config).save_pretrained(folder)
    return folder


#: the wheels of registry packages that ship real annotated images, downloaded by `make test` (Makefile TEST_DATA)
TEST_DATA = REPO / ".venv" / "testdata"


def wheel_member(package: str, member: str) -> bytes:
    """A data file shipped in ``package``'s wheel under ``.venv/testdata/`` (read from the wheel, not installed)."""
    import zipfile

    wheels = sorted(TEST_DATA.glob(f"{package}-*.whl"))
    if not wheels:
        raise FileNotFoundError(f"no {package} wheel in {TEST_DATA}: `make test` and `make test-fast` download the "
                                "test data (Makefile TEST_DATA) before they run pytest")  # fmt: skip
    with zipfile.ZipFile(wheels[-1]) as wheel:
        return wheel.read(member)
