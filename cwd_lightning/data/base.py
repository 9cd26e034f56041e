"""What both data modules share: each split built once (the CLI checks the data before a run, then Lightning
sets it up again), every sample read once before the first step (``preflight``), bad samples refused or left
out, and a training split that fills at least one batch."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Protocol

import lightning as L

from cwd_lightning.data.preflight import check_samples


class CheckedDataset(Protocol):
    """A dataset whose samples can be checked before training: their files, a decode of one, and a way to
    leave some out."""

    def __len__(self) -> int: ...
    def sample_files(self) -> list[list[Path]]: ...
    def load(self, index: int) -> Any: ...
    def drop(self, indices: set[int]) -> None: ...


class CheckedDataModule(L.LightningDataModule):
    """Subclasses say how a split is read (``dataset``); this class builds, checks and keeps them."""

    root: Path
    train_split: str
    val_split: str
    batch_size: int

    def __init__(self, on_bad_sample: Literal["error", "skip"] = "error") -> None:
        super().__init__()
        self.on_bad_sample = on_bad_sample
        self.skipped_samples: dict[str, int] = {}  # split → samples left out (on_bad_sample: skip), logged

    def dataset(self, split: str, training: bool) -> CheckedDataset:
        """The split's dataset with the training or the evaluation transforms."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and not hasattr(self, "train_set"):
            self.train_set = self.dataset(self.train_split, training=True)
            self._keep_readable(self.train_set, self.train_split)
            check_enough_for_a_batch(len(self.train_set), self.batch_size, self.train_split)
        if not hasattr(self, "val_set"):
            self.val_set = self.dataset(self.val_split, training=False)
            self._keep_readable(self.val_set, self.val_split)

    def pins_memory(self) -> bool:
        """Page-locked training batches when the run trains on a GPU: their copy to it then overlaps compute."""
        trainer = getattr(self, "trainer", None)
        return trainer is not None and trainer.strategy.root_device.type == "cuda"

    def _keep_readable(self, dataset: CheckedDataset, split: str) -> None:
        bad = set(check_samples(dataset.sample_files(), dataset.load, f"{self.root} split {split!r}",
                                skip=self.on_bad_sample == "skip"))  # fmt: skip
        self.skipped_samples[split] = len(bad)
        dataset.drop(bad)


def check_enough_for_a_batch(images: int, batch_size: int, split: str) -> None:
    """Training drops the last incomplete batch: fewer images than one batch would train nothing."""
    if images < batch_size:
        raise ValueError(f"split {split!r} has {images} image(s), fewer than data.init_args.batch_size = {batch_size}")
