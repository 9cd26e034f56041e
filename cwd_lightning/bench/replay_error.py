"""How far design (b) of a teacher cache would be from the live teacher, measured: cache the teacher's
logits of the un-augmented image and apply the training augmentation (scale, crop, flip) to that map
instead of running the teacher on the augmented image.

``python -m cwd_lightning.bench.replay_error experiments/shapes_cwd.yaml [--images 200]`` draws, for each
training image, the random scale, crop and flip of the experiment's training transform; the live target
is the teacher's logits of the augmented image, the replayed one the un-augmented logits resized, cropped
and flipped alike (padding excluded). It reports the CWD divergence between them (τ = 4 and 1, per
channel as the loss sees it), the pixels whose class differs, and, for scale, the same divergence
between two different augmentations of an image. Design (a) (``model.teacher_cache``) replays the
live targets exactly, so it needs no such measurement. Writes ``benchmarks/replay_error-<exp>.json``.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from cwd_lightning.bench.build import build_experiment
from cwd_lightning.losses.cwd import ChannelWiseDivergence
from cwd_lightning.models.segmentation import main_logits
from cwd_lightning.runs.provenance import hardware


def _augment(image: torch.Tensor, size: int, crop: int, flip: bool, top: int, left: int) -> torch.Tensor:
    """Resize (shorter side ``size``), pad to ``crop`` with zeros where needed, crop, flip: C×H×W."""
    resized = TF.resize(image, [size], antialias=True)
    pad_h, pad_w = max(0, crop - resized.shape[-2]), max(0, crop - resized.shape[-1])
    padded = F.pad(resized, (0, pad_w, 0, pad_h))
    out = padded[..., top : top + crop, left : left + crop]
    return out.flip(-1) if flip else out


def _draw(height: int, width: int, low: int, high: int, crop: int, rng: random.Random) -> dict:
    size = rng.randint(low, high)
    scale = size / min(height, width)
    h, w = max(round(height * scale), crop), max(round(width * scale), crop)
    return {"size": size, "crop": crop, "flip": rng.random() < 0.5,
            "top": rng.randint(0, h - crop), "left": rng.randint(0, w - crop)}  # fmt: skip


def measure(config: Path, images: int, extra: list[str]) -> dict:
    built = build_experiment(config, extra, torch.device("cpu"))
    module, data = built.module, built.datamodule
    teacher = module.teacher.eval()
    transform = data.train_tf.transforms
    low, high = transform[0].min_size, transform[0].max_size - 1
    crop = transform[1].size[0]
    normalize = transform[-1]
    rng = random.Random(0)
    cwd = {tau: ChannelWiseDivergence(tau) for tau in (4.0, 1.0)}
    rows = []
    with torch.no_grad():
        for index in range(min(images, len(data.train_set))):
            raw, _ = data.train_set.load(index)
            image = torch.from_numpy(raw).permute(2, 0, 1).float() / 255
            height, width = image.shape[-2:]

            def logits(x: torch.Tensor) -> torch.Tensor:
                return main_logits(teacher(normalize(x)[None]))[0]

            params = _draw(height, width, low, high, crop, rng)
            live = logits(_augment(image, **params))
            replay = _augment(logits(image), **params)  # resize the map as the image (bilinear), crop, flip
            valid = _augment(torch.ones(1, height, width), **params)[0] > 0.5  # excludes the zero padding
            other = logits(_augment(image, **_draw(height, width, low, high, crop, rng)))
            mask = valid[None, None].float()
            # compare inside the valid region only: positions outside get equal (very low) logits on both sides
            live_m, replay_m, other_m = ((t[None] * mask) + (1 - mask) * -1e4 for t in (live, replay, other))
            rows.append({
                "kl_tau4": float(cwd[4.0](replay_m, live_m)), "kl_tau1": float(cwd[1.0](replay_m, live_m)),
                "kl_tau4_other_view": float(cwd[4.0](other_m, live_m)),
                "class_disagreement": float((replay.argmax(0) != live.argmax(0))[valid].float().mean()),
            })  # fmt: skip
    mean = {key: sum(row[key] for row in rows) / len(rows) for key in rows[0]}
    return {
        "experiment": config.stem,
        "hardware": hardware(torch.device("cpu")),
        "teacher_weights": built.teacher_weights,
        "images": len(rows),
        "augmentation": {"shorter_side": [low, high], "crop": crop, "flip": 0.5},
        "mean": mean,
        "what": "design (b): the un-augmented teacher logits, resized/cropped/flipped as the image, vs the live "
        "teacher on the augmented image; CWD divergence (per channel, ·τ²) inside the valid region; "
        "'other_view': live vs the live logits of another augmentation of the same image (scale)",
    }


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("benchmarks"))
    args, extra = parser.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    record = measure(args.config, args.images, extra)
    path = args.out / f"replay_error-{args.config.stem}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps(record["mean"], indent=1))
    return path


if __name__ == "__main__":
    main()
