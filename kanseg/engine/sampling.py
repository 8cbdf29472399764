"""Resumable, rank-independent data order.

The sampler yields ``(index, item_seed)`` pairs: the shuffle depends only on ``(seed, epoch)``
and every item's random augmentation only on ``(seed, epoch, index)``. So the data a step sees
does not depend on worker count, on the process count (batches are sharded by Accelerate), or
on whether the run was interrupted and resumed by skipping the first batches of an epoch.
"""
from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler


def derive_seed(*parts: int) -> int:
    """A 32-bit seed mixed from integers (stable across processes and Python runs)."""
    return int(np.random.SeedSequence([int(p) % 2**63 for p in parts]).generate_state(1)[0])


class SeededSampler(Sampler):
    """Per-epoch seeded permutation of ``range(n)`` yielding ``(index, item_seed)``."""

    def __init__(self, n: int, seed: int, shuffle: bool = True) -> None:
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            gen = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
            order = torch.randperm(self.n, generator=gen).tolist()
        else:
            order = list(range(self.n))
        for index in order:
            yield index, derive_seed(self.seed, self.epoch, index, 1)


@contextmanager
def _seeded_global_rngs(seed: int) -> Iterator[None]:
    """Seed torch / numpy / random for one item, restoring the caller's states afterwards."""
    states = torch.get_rng_state(), np.random.get_state(), random.getstate()
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(states[0])
        np.random.set_state(states[1])
        random.setstate(states[2])


class SeededDataset(Dataset):
    """Wraps a map-style dataset; ``ds[(index, seed)]`` applies its random transforms with
    ``seed`` (MONAI ``Randomizable`` transforms and the global torch/numpy/random RNGs)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        transform = getattr(self.dataset, "transform", None)
        if hasattr(transform, "set_random_state"):
            transform.set_random_state(seed=seed)
        with _seeded_global_rngs(seed):
            return self.dataset[index]


def make_resumable(loader: DataLoader, seed: int, shuffle: bool = True) -> tuple[DataLoader, SeededSampler]:
    """Rebuild ``loader`` (same dataset, batch size, workers, collate) with a seeded order."""
    sampler = SeededSampler(len(loader.dataset), seed, shuffle)  # type: ignore[arg-type]
    workers = loader.num_workers
    rebuilt = DataLoader(
        SeededDataset(loader.dataset), batch_size=loader.batch_size, sampler=sampler,
        num_workers=workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
        drop_last=loader.drop_last, persistent_workers=workers > 0,
        prefetch_factor=loader.prefetch_factor if workers > 0 else None,
        generator=torch.Generator().manual_seed(seed),
    )
    return rebuilt, sampler
