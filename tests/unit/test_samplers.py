"""Samplers: DeiT's RASampler (recipe check 11.5), exact distributed evaluation (11.6),
and the resumable, seed-tagged training samplers."""
from collections import Counter

import pytest
import torch
from torch.utils.data import DistributedSampler, TensorDataset

from samplers import (ExactDistributedEvalSampler, PerSampleSeeded, RASampler, SampleKey,
                      ShardedShuffleSampler, mix_seed)


def test_rasampler_counts_and_truncation():
    n, world = 1000, 4
    samplers = [RASampler(n, world, r) for r in range(world)]
    for s in samplers:
        assert s.num_samples == 750  # ceil(3 * 1000 / 4) before truncation
        assert len(s) == 192         # floor((1000 // 256) * 256 / 4)
        assert len(list(s)) == 192


def test_rasampler_repeats_on_consecutive_ranks_and_is_deterministic():
    n, world = 1000, 4
    per_rank = []
    for r in range(world):
        s = RASampler(n, world, r)
        s.set_epoch(3)
        order = s._rank_order()
        per_rank.append(order)
        assert [i for i, _ in order] == list(s)
        s2 = RASampler(n, world, r, seed=123)  # DeiT seeds with the epoch only
        s2.set_epoch(3)
        assert list(s2) == list(s)
    # Reassemble the global (repeated, padded) list from the rank slices: position p lives on rank p % world.
    total = {}
    for r, order in enumerate(per_rank):
        for index, position in order:
            assert position % world == r
            total[position] = index
    positions = sorted(total)
    for p in positions[: 3 * 60]:
        base = p - p % 3
        if all(q in total for q in (base, base + 1, base + 2)):
            # three consecutive positions (three consecutive ranks mod world) hold the same image
            assert total[base] == total[base + 1] == total[base + 2]
    other = RASampler(n, world, 0)
    other.set_epoch(4)
    assert list(other) != [i for i, _ in per_rank[0]]


def test_exact_eval_sampler_counts_every_sample_once():
    for n in (10, 11, 13, 50):
        for world in (1, 2, 3, 4, 7):
            for contiguous in (True, False):
                seen = Counter()
                for r in range(world):
                    seen.update(ExactDistributedEvalSampler(n, world, r, contiguous=contiguous))
                assert seen == Counter(range(n)), (n, world, contiguous)


def test_distributed_sampler_pads_with_duplicates():
    """Check 11.6: torch's DistributedSampler evaluates padded duplicates when n % world != 0."""
    dataset = TensorDataset(torch.arange(10))
    seen = Counter()
    for r in range(3):
        seen.update(DistributedSampler(dataset, num_replicas=3, rank=r, shuffle=False))
    assert sum(seen.values()) == 12  # 2 duplicates counted
    assert max(seen.values()) == 2


def test_sharded_shuffle_depends_only_on_seed_and_epoch():
    a = ShardedShuffleSampler(100, seed=5)
    b = ShardedShuffleSampler(100, seed=5)
    a.set_epoch(2)
    b.set_epoch(2)
    assert list(a) == list(b)
    assert sorted(a) == list(range(100))
    b.set_epoch(3)
    assert list(a) != list(b)
    c = ShardedShuffleSampler(100, seed=6)
    c.set_epoch(2)
    assert list(c) != list(a)


def test_sharded_shuffle_skip_and_reset():
    s = ShardedShuffleSampler(40, seed=1)
    s.set_epoch(0)
    full = list(s)
    s.set_start_index(16)
    assert len(s) == 24
    assert list(s) == full[16:]
    s.set_epoch(1)  # a new epoch starts from its beginning again
    assert len(s) == 40


def test_two_ranks_batches_union_equals_single_process_batch():
    n, b = 64, 8
    single = ShardedShuffleSampler(n, 1, 0, seed=3, tag_seeds=True)
    ranks = [ShardedShuffleSampler(n, 2, r, seed=3, tag_seeds=True) for r in range(2)]
    for s in [single] + ranks:
        s.set_epoch(7)
    single_keys = list(single)
    rank_keys = [list(s) for s in ranks]
    for k in range(n // (2 * b)):
        big = single_keys[k * 2 * b:(k + 1) * 2 * b]
        union = rank_keys[0][k * b:(k + 1) * b] + rank_keys[1][k * b:(k + 1) * b]
        assert sorted(big) == sorted(union)  # same indices with the same per-sample seeds


def test_seed_tags_are_distinct_per_position():
    s = RASampler(512, 1, 0, tag_seeds=True)
    keys = list(s)
    assert all(isinstance(k, SampleKey) for k in keys)
    assert len({k.seed for k in keys}) == len(keys)  # the three repeats get different augmentations
    assert mix_seed(1, 2) != mix_seed(2, 1)


class _RandomDataset(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return torch.rand(3), i


def test_per_sample_seeded_is_reproducible_and_keeps_main_rng():
    ds = PerSampleSeeded(_RandomDataset())
    torch.manual_seed(0)
    before = torch.get_rng_state()
    x1, _ = ds[SampleKey(2, 99)]
    assert torch.equal(torch.get_rng_state(), before)  # the training stream is untouched
    x2, _ = ds[SampleKey(2, 99)]
    x3, _ = ds[SampleKey(2, 100)]
    assert torch.equal(x1, x2)
    assert not torch.equal(x1, x3)
    assert len(ds) == 4


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_output_independent_of_workers(workers):
    sampler = ShardedShuffleSampler(4, seed=0, tag_seeds=True)
    loader = torch.utils.data.DataLoader(PerSampleSeeded(_RandomDataset()), sampler=sampler, batch_size=2,
                                         num_workers=workers, generator=torch.Generator())
    reference = torch.utils.data.DataLoader(PerSampleSeeded(_RandomDataset()), sampler=sampler, batch_size=2,
                                            num_workers=0, generator=torch.Generator())
    for (a, ia), (b, ib) in zip(loader, reference):
        assert torch.equal(ia, ib)
        assert torch.equal(a, b)


def test_samplers_accept_a_dataset_like_deit():
    dataset = TensorDataset(torch.arange(1000))
    assert list(RASampler(dataset, 4, 1)) == list(RASampler(1000, 4, 1))
    assert len(ExactDistributedEvalSampler(dataset, 3, 2)) == len(ExactDistributedEvalSampler(1000, 3, 2))
