"""Samplers: DeiT's repeated-augmentation sampler (repeated augmentation: Hoffer et al., "Augment
your batch", CVPR 2020; Berman et al., "MultiGrain", 2019), exact distributed evaluation, and
resumable shuffling. Samplers accept a data set (as DeiT's do) or its length.

Every training sampler here draws its epoch permutation from (seed, epoch) only, can
skip the first k samples of an epoch (mid-epoch resume) and can tag each index with
a per-sample seed derived from (seed, epoch, global position). `PerSampleSeeded`
seeds the augmentation RNGs from that tag, so what a sample looks like depends
neither on the worker that loads it, nor on the number of processes, nor on
whether the run was interrupted: a resumed or re-sharded run sees the same batches.
"""
from __future__ import annotations

import math
import random
from typing import Iterator, NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, get_worker_info

_MASK64 = (1 << 64) - 1


def _length(dataset_or_len) -> int:
    """Samplers take a data set (as DeiT's do) or just its length."""
    return int(dataset_or_len) if isinstance(dataset_or_len, int) else len(dataset_or_len)


def mix_seed(*values: int) -> int:
    """A well-spread 63-bit seed from integers (splitmix64 finaliser over the sequence)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & _MASK64)) & _MASK64
        h = (h + 0x9E3779B97F4A7C15) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h & ((1 << 63) - 1)


class SampleKey(NamedTuple):
    """What a seeding sampler yields: the dataset index and the seed for its augmentation."""
    index: int
    seed: int


class PerSampleSeeded(Dataset):
    """Wraps a dataset; `ds[SampleKey(i, s)]` loads item i with the RNGs seeded from s.

    Seeds Python's `random` (timm RandAugment), NumPy and torch (torchvision transforms).
    In the main process (num_workers=0) the global RNG states are restored afterwards,
    so data loading never perturbs the training RNG stream (dropout, mixup).
    """

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name):
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, key):
        if not isinstance(key, SampleKey):
            return self.dataset[key]
        in_main_process = get_worker_info() is None
        if in_main_process:
            saved = (random.getstate(), np.random.get_state(), torch.get_rng_state())
        random.seed(key.seed)
        np.random.seed(key.seed % (1 << 32))
        torch.manual_seed(key.seed)
        try:
            return self.dataset[key.index]
        finally:
            if in_main_process:
                random.setstate(saved[0])
                np.random.set_state(saved[1])
                torch.set_rng_state(saved[2])


class _ResumableSampler(Sampler):
    """Shared epoch / start-index / seed-tagging logic. Subclasses build `_rank_order()`.

    `_rank_order()` returns this rank's (dataset index, global position) pairs for the epoch.
    """

    def __init__(self, seed: int = 0, tag_seeds: bool = False):
        self.seed = int(seed)
        self.epoch = 0
        self.start_index = 0
        self.tag_seeds = tag_seeds

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's permutation; also clears a start index set for the previous epoch."""
        self.epoch = int(epoch)
        self.start_index = 0

    def set_start_index(self, start: int) -> None:
        """Skip the first `start` samples of this rank in the current epoch (mid-epoch resume)."""
        self.start_index = int(start)

    def _rank_order(self) -> list[tuple[int, int]]:
        raise NotImplementedError

    def __iter__(self) -> Iterator:
        order = self._rank_order()[self.start_index:]
        if not self.tag_seeds:
            return iter([index for index, _ in order])
        return iter([SampleKey(index, mix_seed(self.seed, self.epoch, position)) for index, position in order])

    def _full_len(self) -> int:
        raise NotImplementedError

    def __len__(self) -> int:
        return max(self._full_len() - self.start_index, 0)


class ShardedShuffleSampler(_ResumableSampler):
    """Shuffled (or ordered) indices, padded to a multiple of the world size, rank r takes r::world.

    With one replica this is a RandomSampler whose permutation depends only on (seed, epoch).
    The global order is the same for any world size, so the union of the ranks' k-th
    batches of size b equals the k-th batch of size b * world of a single process.
    """

    def __init__(self, dataset_len: int, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0, tag_seeds: bool = False):
        super().__init__(seed=seed, tag_seeds=tag_seeds)
        self.dataset_len = _length(dataset_len)
        self.num_replicas, self.rank, self.shuffle = num_replicas, rank, shuffle
        self.num_samples = math.ceil(self.dataset_len / num_replicas)
        self.total_size = self.num_samples * num_replicas

    def _global_order(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(mix_seed(self.seed, self.epoch))
            indices = torch.randperm(self.dataset_len, generator=g).tolist()
        else:
            indices = list(range(self.dataset_len))
        padding = self.total_size - len(indices)
        if padding > 0:
            indices += (indices * math.ceil(padding / max(len(indices), 1)))[:padding]
        return indices

    def _rank_order(self):
        indices = self._global_order()
        positions = range(self.rank, self.total_size, self.num_replicas)
        return [(indices[p], p) for p in positions]

    def _full_len(self) -> int:
        return self.num_samples


class RASampler(_ResumableSampler):
    """DeiT's repeated-augmentation sampler (3 repeats), reproduced exactly.

    Per epoch: permutation from a generator seeded with the epoch number only (not
    --seed, as in DeiT); each index repeated `num_repeats` times consecutively; padded
    with the head of the list to ceil(repeats * n / world) * world; rank r takes
    positions r, r + world, ...; only the first floor((n // 256) * 256 / world) are used.
    """

    def __init__(self, dataset_len: int, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 num_repeats: int = 3, seed: int = 0, tag_seeds: bool = False):
        super().__init__(seed=seed, tag_seeds=tag_seeds)
        self.dataset_len = _length(dataset_len)
        self.num_replicas, self.rank, self.shuffle, self.num_repeats = num_replicas, rank, shuffle, num_repeats
        self.num_samples = int(math.ceil(self.dataset_len * num_repeats / num_replicas))
        self.total_size = self.num_samples * num_replicas
        self.num_selected_samples = int(math.floor(self.dataset_len // 256 * 256 / num_replicas))

    def _rank_order(self):
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.epoch)
            indices = torch.randperm(self.dataset_len, generator=g)
        else:
            indices = torch.arange(self.dataset_len)
        indices = torch.repeat_interleave(indices, repeats=self.num_repeats, dim=0).tolist()
        padding = self.total_size - len(indices)
        if padding > 0:
            indices += indices[:padding]
        positions = list(range(self.rank, self.total_size, self.num_replicas))[: self.num_selected_samples]
        return [(indices[p], p) for p in positions]

    def _full_len(self) -> int:
        return self.num_selected_samples


class ExactDistributedEvalSampler(Sampler):
    """Evaluation shards without padding: every sample is evaluated exactly once over all ranks.

    `contiguous=True`: rank r gets [r * n // w, (r + 1) * n // w); otherwise r::w.
    Shards differ in length by at most one; the evaluation sums correct counts and
    sample counts across ranks, so no duplicate is ever counted (unlike
    DistributedSampler, which pads with repeated samples).
    """

    def __init__(self, dataset_len: int, num_replicas: int = 1, rank: int = 0, contiguous: bool = True):
        self.dataset_len, self.num_replicas, self.rank, self.contiguous = _length(dataset_len), num_replicas, rank, contiguous

    def _indices(self) -> range:
        if self.contiguous:
            start = self.rank * self.dataset_len // self.num_replicas
            end = (self.rank + 1) * self.dataset_len // self.num_replicas
            return range(start, end)
        return range(self.rank, self.dataset_len, self.num_replicas)

    def __iter__(self):
        return iter(self._indices())

    def __len__(self) -> int:
        return len(self._indices())
