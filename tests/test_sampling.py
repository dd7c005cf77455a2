"""The length-grouped batch sampler: coverage, per-epoch shuffling, seeding, padding."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from distill.data.sampling import LengthGroupedBatchSampler, padding_ratio, sorted_batches


def long_tailed_lengths(n: int, seed: int = 0) -> list[int]:
    """Token counts shaped like sentence pairs (log-normal, truncated at 128)."""
    rng = np.random.default_rng(seed)
    return np.clip(np.rint(rng.lognormal(np.log(45), 0.45, n)), 8, 128).astype(int).tolist()


LENGTHS = long_tailed_lengths(1000)


def flat(batches: list[list[int]]) -> list[int]:
    return [i for b in batches for i in b]


@pytest.mark.parametrize("group_by_length", [True, False])
@pytest.mark.parametrize("batch_size", [1, 7, 32])
def test_every_example_exactly_once_per_epoch(group_by_length, batch_size):
    sampler = LengthGroupedBatchSampler(LENGTHS, batch_size, group_by_length=group_by_length, seed=3, group_size=4)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert sorted(flat(batches)) == list(range(len(LENGTHS)))
        assert len(batches) == len(sampler)
        sizes = Counter(len(b) for b in batches)
        assert sizes[batch_size] == len(LENGTHS) // batch_size  # at most one partial batch


def test_at_most_one_partial_batch_and_drop_last():
    sampler = LengthGroupedBatchSampler(LENGTHS, 32, seed=0, group_size=3)
    sizes = Counter(len(b) for b in sampler)
    assert sizes == {32: 1000 // 32, 1000 % 32: 1}
    dropping = LengthGroupedBatchSampler(LENGTHS, 32, seed=0, group_size=3, drop_last=True)
    batches = list(dropping)
    assert len(batches) == len(dropping) == 1000 // 32
    assert all(len(b) == 32 for b in batches)
    assert len(set(flat(batches))) == 32 * (1000 // 32)


def test_order_differs_between_epochs_and_is_reproducible_from_seed():
    a = LengthGroupedBatchSampler(LENGTHS, 16, seed=7)
    b = LengthGroupedBatchSampler(LENGTHS, 16, seed=7)
    epochs_a = []
    for epoch in range(3):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        epochs_a.append(list(a))
        assert epochs_a[-1] == list(b)  # same seed and epoch: same batches
    assert epochs_a[0] != epochs_a[1] != epochs_a[2]
    # the batch contents change, not only their order
    assert {tuple(sorted(x)) for x in epochs_a[0]} != {tuple(sorted(x)) for x in epochs_a[1]}
    other = LengthGroupedBatchSampler(LENGTHS, 16, seed=8)
    assert list(other) != epochs_a[0]
    # replaying an epoch (resume) gives it back exactly
    a.set_epoch(1)
    assert list(a) == epochs_a[1]


def test_grouping_cuts_padding_on_long_tailed_lengths():
    grouped = LengthGroupedBatchSampler(LENGTHS, 32, group_by_length=True, seed=1)
    plain = LengthGroupedBatchSampler(LENGTHS, 32, group_by_length=False, seed=1)
    r_grouped = padding_ratio(LENGTHS, list(grouped))
    r_plain = padding_ratio(LENGTHS, list(plain))
    assert r_grouped >= 0.90
    assert r_plain < 0.6
    # batches are length-homogeneous, but big and small ones come in random order
    maxima = [max(LENGTHS[i] for i in b) for b in grouped]
    assert maxima != sorted(maxima, reverse=True) and maxima != sorted(maxima)


def test_batches_never_straddle_two_length_groups():
    # 2 batches of 4 per group: every batch lies inside one group of the epoch's shuffled order
    lengths = list(range(1, 41))
    sampler = LengthGroupedBatchSampler(lengths, 4, seed=5, group_size=2)
    g = torch.Generator().manual_seed(5 * 100_003 + 0)
    order = torch.randperm(40, generator=g).tolist()
    groups = [set(order[i : i + 8]) for i in range(0, 40, 8)]
    for batch in sampler:
        assert any(set(batch) <= group for group in groups)


def test_evaluation_order_is_fixed_and_longest_first():
    sampler = LengthGroupedBatchSampler([3, 9, 9, 1, 5], 2, shuffle=False)
    assert list(sampler) == [[1, 2], [4, 0], [3]]  # ties keep index order
    sampler.set_epoch(4)
    assert list(sampler) == [[1, 2], [4, 0], [3]]
    unsorted = LengthGroupedBatchSampler([3, 9, 9, 1, 5], 2, shuffle=False, group_by_length=False)
    assert list(unsorted) == [[0, 1], [2, 3], [4]]


def test_padding_ratio_by_hand():
    lengths = [2, 4, 4, 1]
    # [2, 4] pads to 4 -> 8 processed, 6 real; [4, 1] -> 8 processed, 5 real
    assert padding_ratio(lengths, [[0, 1], [2, 3]]) == pytest.approx(11 / 16)
    assert padding_ratio(lengths, [[1, 2], [0, 3]]) == pytest.approx(11 / 12)
    assert padding_ratio(lengths, []) == 1.0


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="batch_size"):
        LengthGroupedBatchSampler(LENGTHS, 0)
    with pytest.raises(ValueError, match="group_size"):
        LengthGroupedBatchSampler(LENGTHS, 4, group_size=0)


@pytest.mark.parametrize("n", [1000, 70, 5])
def test_accelerate_sharding_over_two_processes_covers_every_example(n):
    from accelerate.data_loader import BatchSamplerShard

    sampler = LengthGroupedBatchSampler(LENGTHS[:n], 8, seed=2, group_size=2)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        shards = [
            list(BatchSamplerShard(sampler, num_processes=2, process_index=rank, even_batches=True))
            for rank in range(2)
        ]
        assert len(shards[0]) == len(shards[1])  # processes step together
        seen = Counter(flat(shards[0]) + flat(shards[1]))
        assert set(seen) == set(range(n))  # nobody's batch was skipped
        assert sum(seen.values()) - n < 2 * 8  # only the padding that evens out the last step


def test_sorted_batches_cover_everything_longest_first_with_little_padding():
    batches = sorted_batches(LENGTHS, max_batch=128, min_fill=0.95)
    assert sorted(flat(batches)) == list(range(len(LENGTHS)))
    assert all(1 <= len(b) <= 128 for b in batches)
    maxima = [max(LENGTHS[i] for i in b) for b in batches]
    assert maxima == sorted(maxima, reverse=True)
    assert all(padding_ratio(LENGTHS, [b]) >= 0.95 for b in batches)
    # a plain cut of the sorted order into 128s pads far more on these 1000 long-tailed lengths
    order = sorted(range(len(LENGTHS)), key=lambda i: -LENGTHS[i])
    plain = [order[i : i + 128] for i in range(0, len(order), 128)]
    assert padding_ratio(LENGTHS, plain) < 0.9 < padding_ratio(LENGTHS, batches)


def test_sorted_batches_are_full_when_lengths_repeat():
    lengths = [50] * 300 + [20] * 100  # many rows per length: nothing to gain from smaller batches
    batches = sorted_batches(lengths, max_batch=64)
    assert [len(b) for b in batches] == [64, 64, 64, 64, 48, 64, 32]  # 4 short rows fit in the 5th
    assert sorted_batches([], 8) == []
    with pytest.raises(ValueError, match="max_batch"):
        sorted_batches(lengths, 0)
