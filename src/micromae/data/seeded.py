"""A seeded loader of augmented images whose randomness is reproducible and fresh.

The order of an epoch is a permutation drawn from ``np.random.default_rng([seed, epoch])`` (the same on
every rank, which then takes every ``world_size``-th item, as ``DistributedSampler``), and item ``index`` is
augmented with ``np.random.default_rng([seed, rank, epoch, index])``. Batches therefore do not depend on the
number of workers, differ between epochs and ranks, and replay exactly from the seed (call
``loader.sampler.set_epoch(epoch)`` before each epoch, as for ``DistributedSampler``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from micromae.errors import input_error


class SeededSampler(Sampler):
    """Yields keys ``(index, epoch)``: a ``(seed, epoch)`` permutation split over ranks, padded by repeats."""

    def __init__(self, length: int, seed: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True) -> None:
        for name, value, low in (("seed", seed, 0), ("rank", rank, 0), ("world_size", world_size, 1)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise input_error(name, f"an integer >= {low}", repr(value), f"Set {name} to an integer >= {low}")
        if rank >= world_size:
            raise input_error("rank", f"below world_size {world_size}", repr(rank), "Pass the process's global rank")
        self.length, self.seed, self.rank, self.world_size = int(length), int(seed), int(rank), int(world_size)
        self.shuffle, self.epoch = shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return math.ceil(self.length / self.world_size)

    def __iter__(self):
        order = (np.random.default_rng([self.seed, self.epoch]).permutation(self.length) if self.shuffle
                 else np.arange(self.length))
        order = np.resize(order, len(self) * self.world_size)  # pads by repeating from the start
        return iter([(int(i), self.epoch) for i in order[self.rank::self.world_size]])


class SeededItems(Dataset):
    """``dataset`` indexed by ``(index, epoch)`` keys; the item's augmentation draws from
    ``np.random.default_rng([seed, rank, epoch, index])``."""

    def __init__(self, dataset: Any, seed: int, rank: int) -> None:
        if not callable(getattr(dataset, "get", None)):
            raise input_error("dataset", "a dataset with get(index, rng) such as MultiChannelImageFolder",
                              type(dataset).__name__, "Wrap the images in MultiChannelImageFolder")
        self.dataset, self.seed, self.rank = dataset, int(seed), int(rank)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, epoch = key
        return self.dataset.get(index, np.random.default_rng([self.seed, self.rank, epoch, index]))


def make_mif_loader(dataset: Any, batch_size: int, seed: int = 0, rank: int = 0, num_workers: int = 0,
                    world_size: int = 1, shuffle: bool = True, drop_last: bool = True,
                    pin_memory: bool = False) -> DataLoader:
    """A DataLoader of ``(images (B, C, H, W), labels (B,))`` with seeded order and augmentation (module docs).

    Call ``loader.sampler.set_epoch(epoch)`` before each epoch. ``drop_last`` drops a short last batch.
    """
    sampler = SeededSampler(len(dataset), seed, rank, world_size, shuffle)
    generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(rank))
    return DataLoader(SeededItems(dataset, seed, rank), batch_size=batch_size, sampler=sampler,
                      num_workers=num_workers, pin_memory=pin_memory, drop_last=drop_last,
                      persistent_workers=num_workers > 0, generator=generator)
