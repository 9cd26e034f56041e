"""A training loader that a resume continues exactly where the interrupted run was, mid-epoch.

Two things make a run's data differ after a resume with a plain ``DataLoader(shuffle=True)``: the
order (drawn from the global RNG when each epoch starts) and the augmentations (drawn from the global
RNG, in whatever process loads the sample). Here both are functions of the run's seed alone: the order
of epoch ``e`` is a permutation seeded by (seed, e), and the sample at position ``i`` of that order is
augmented under a generator seeded by (seed, e, i), so neither depends on what ran before. torchdata's
``StatefulDataLoader`` records how far into the epoch the loader got; Lightning saves that in the
checkpoint and, on resume, the loader skips what was already consumed (indices only, no images read).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader

#: spreads (seed, epoch, position) over the 63-bit seed space; any fixed odd constants would do
_EPOCH_STRIDE, _SEED_STRIDE = 1_000_003, 2_654_435_761


def run_seed() -> int:
    """The seed LightningCLI's ``seed_everything`` set for this run (0 when none was set)."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


class SeededOrderSampler(DistributedSampler):
    """Yields ``(index, augmentation_seed)``: a permutation of the dataset seeded by (seed, epoch), each
    index with the seed its augmentation is drawn from; under DDP each rank takes every world-th item.

    Lightning calls ``set_epoch`` before each epoch. Its state (the epoch) and its iterator's (how many
    items were yielded) go into the loader's state, so a resume rebuilds the interrupted epoch's order
    and starts after the last consumed item, without depending on when ``set_epoch`` is called. A
    ``DistributedSampler`` so that Lightning keeps it under DDP instead of wrapping it in one of its own
    (which could only fast-forward by replaying indices from whatever epoch was set at the time)."""

    def __init__(self, size: int, seed: int, views: int = 0, views_seed: int = 0) -> None:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        world = torch.distributed.get_world_size() if distributed else 1
        rank = torch.distributed.get_rank() if distributed else 0
        super().__init__(range(size), num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.size, self.views, self.views_seed = size, views, views_seed

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = state["epoch"]

    def __iter__(self) -> Iterator[tuple[int, ...]]:
        base = (self.seed * _SEED_STRIDE + self.epoch * _EPOCH_STRIDE) % 2**63
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(base)).tolist()
        positions = range(self.rank, self.num_samples * self.num_replicas, self.num_replicas)
        if self.views:  # a teacher cache: epoch e shows view e mod K of every image, always augmented alike
            view = self.epoch % self.views
            return _SeededOrder([(order[p], view_seed(self.views_seed, order[p], view), view) for p in positions])
        return _SeededOrder([(order[p], (base + p + 1) % 2**63) for p in positions])


def view_seed(seed: int, index: int, view: int) -> int:
    """The augmentation seed of view ``view`` of image ``index`` under the cache's seed ``seed`` (not the run's:
    every run and seed of a sweep reads one cache), so a cached teacher output and the student's input come from
    the same augmented image in every epoch of every run."""
    return (seed * _SEED_STRIDE + (index * 4096 + view + 1) * _EPOCH_STRIDE + 7) % 2**63


class _SeededOrder(Iterator[tuple[int, ...]]):
    """An epoch's items, and how many were yielded (the state the loader saves)."""

    def __init__(self, items: list[tuple[int, ...]]) -> None:
        self.items, self.yielded = items, 0

    def __next__(self) -> tuple[int, ...]:
        if self.yielded >= len(self.items):
            raise StopIteration
        self.yielded += 1
        return self.items[self.yielded - 1]

    def state_dict(self) -> dict[str, int]:
        return {"yielded": self.yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.yielded = state["yielded"]


class SeededAugmentation(Dataset):
    """``dataset[index]`` with the global torch RNG seeded for that one sample (transforms.v2 draws its
    random parameters from it), then put back as it was: the same (index, seed) always gives the same
    augmented sample, in any worker, after any resume.

    A view of a teacher cache (``(index, seed, view)``) ends with ``{"keys": [index, view]}`` and, given
    ``teacher_tensors(index, view)``, ``"teacher"``: the cached teacher tensors of that view, read here, in the
    loader's worker, so they are batched, prefetched and pinned with the image, off the training step."""

    def __init__(self, dataset: Dataset, teacher_tensors: Callable[[int, int], Any] | None = None) -> None:
        self.dataset, self.teacher_tensors = dataset, teacher_tensors

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, item: tuple[int, ...]) -> Any:
        index, seed, *view = item
        # transforms.v2 draws on the CPU generator only: seeding it alone gives the draws torch.manual_seed
        # would, without its per-call cost (every device's generator; 0.5 of 2.2 ms a 64×64 sample took)
        generator = torch.default_generator
        state = generator.get_state()
        generator.manual_seed(seed)
        try:
            sample = self.dataset[index]
        finally:
            generator.set_state(state)
        if not view:
            return sample
        entry = {"keys": torch.tensor([index, view[0]])}
        if self.teacher_tensors is not None:
            entry["teacher"] = self.teacher_tensors(index, view[0])
        return (*sample, entry)


def resumable_train_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    views: int = 0,
    views_seed: int = 0,
    teacher_tensors: Callable[[int, int], Any] | None = None,
    pin_memory: bool = False,
) -> StatefulDataLoader:
    """The training loader of both data modules: seeded order and augmentations, incomplete last batch
    dropped, state saved in checkpoints. With ``views`` (a teacher cache) every image has that many fixed
    augmented views (seeded by ``views_seed``) and each batch ends with their cache entry (``SeededAugmentation``)."""
    return StatefulDataLoader(
        SeededAugmentation(dataset, teacher_tensors),
        batch_size=batch_size,
        sampler=SeededOrderSampler(len(dataset), run_seed(), views, views_seed),
        drop_last=True,
        num_workers=num_workers,
        collate_fn=collate_fn,
        persistent_workers=num_workers > 0,
        pin_memory=pin_memory,
    )


def all_views_loader(
    dataset: Dataset, views: int, views_seed: int, batch_size: int, num_workers: int
) -> StatefulDataLoader:
    """Every view of every image once, in (image, view) order, each augmented as training will see it:
    what a teacher cache is filled from."""
    items = [(index, view_seed(views_seed, index, view), view)
             for index in range(len(dataset)) for view in range(views)]  # type: ignore[arg-type]  # fmt: skip
    return StatefulDataLoader(
        SeededAugmentation(dataset), batch_size=batch_size, sampler=items, num_workers=num_workers
    )
