"""The experiment's own DistillationModule, datamodule and one fixed training batch, built through the CLI."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device

from cwd_lightning.analysis.runs import build
from cwd_lightning.cli import DistillCLI
from cwd_lightning.distill.module import DistillationModule
from cwd_lightning.models.pretrained import without_pretrained

RANDOM_TEACHER = "random (checkpoint missing)"


class BenchCLI(DistillCLI):
    """``DistillCLI`` (run=False), except that a teacher checkpoint that does not exist is replaced by a
    state_dict of the freshly built teacher: step times do not depend on the weights' values, so the
    harness runs before the teacher has been trained."""

    def __init__(self, args: list[str], scratch: Path) -> None:
        self.scratch = scratch
        self.teacher_weights = "checkpoint"
        super().__init__(args=args, run=False)

    def before_instantiate_classes(self) -> None:
        super().before_instantiate_classes()
        model = self.config["model"]
        checkpoint = model.get("teacher_checkpoint")
        if model.get("teacher") is None or checkpoint is None or Path(checkpoint).is_file():
            self.teacher_weights = f"checkpoint {checkpoint}" if checkpoint else "as built (no teacher_checkpoint)"
            return
        spec = {key: value for key, value in model["teacher"].as_dict().items() if key in ("class_path", "init_args")}
        path = self.scratch / "random_teacher.pt"
        torch.save(build(without_pretrained(spec)).state_dict(), path)  # no download of weights we replace
        model["teacher_checkpoint"] = str(path)
        self.teacher_weights = RANDOM_TEACHER


@dataclass
class Built:
    """What the harness measures: the module, its data, one fixed batch, and where the teacher's weights came from."""

    module: DistillationModule
    datamodule: Any
    batch: Any
    teacher_weights: str


def build_experiment(config: Path, extra_args: list[str], device: torch.device, seed: int = 0) -> Built:
    """Module and data exactly as ``python -m cwd_lightning fit --config <config> <extra_args>`` would
    build them, and the first training batch (at the experiment's batch size) moved to ``device``."""
    with tempfile.TemporaryDirectory(prefix="cwd_bench_") as scratch:
        cli = BenchCLI(["--config", str(config), *extra_args], Path(scratch))
    datamodule = cli.datamodule
    datamodule.prepare_data()  # the embedded shapes dataset is generated on first use
    datamodule.setup("fit")
    torch.manual_seed(seed)  # the same crops and flips in every run
    batch = next(iter(datamodule.train_dataloader()))
    module = cli.model.to(device)
    return Built(module, datamodule, move_data_to_device(batch, device), cli.teacher_weights)
