"""Batch samplers: seeded shuffling every epoch, optionally grouping examples of similar length.

Grouping by length keeps padding low (each batch pads to its own longest example) while the
order stays random: each epoch shuffles all examples, cuts them into mega-batches of
`group_size` batches, sorts each mega-batch by length, splits it into batches, and shuffles the
batches. Evaluation uses one fixed length-sorted order (outputs are put back by feature_id).
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch.utils.data import Sampler


class LengthGroupedBatchSampler(Sampler[list[int]]):
    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        shuffle: bool = True,
        group_by_length: bool = True,
        seed: int = 0,
        group_size: int = 50,
        drop_last: bool = False,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.group_by_length = group_by_length
        self.seed = seed
        self.group_size = group_size
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self) -> list[list[int]]:
        """This epoch's batches (a pure function of seed and epoch)."""
        n = len(self.lengths)
        if not self.shuffle:
            order = list(range(n))
            if self.group_by_length:
                order.sort(key=lambda i: -self.lengths[i])
            return self._chunk(order)
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(n, generator=g).tolist()
        if self.group_by_length:
            mega = self.batch_size * self.group_size
            grouped = []
            for start in range(0, n, mega):
                chunk = order[start : start + mega]
                grouped.extend(sorted(chunk, key=lambda i: -self.lengths[i]))
            order = grouped
        batches = self._chunk(order)
        if self.group_by_length:
            perm = torch.randperm(len(batches), generator=g).tolist()
            batches = [batches[i] for i in perm]
        return batches

    def _chunk(self, order: list[int]) -> list[list[int]]:
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches()

    def __len__(self) -> int:
        n = len(self.lengths)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)


def padding_ratio(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """Real tokens / processed tokens when every batch pads to its longest member."""
    real = sum(lengths[i] for b in batches for i in b)
    processed = sum(len(b) * max(lengths[i] for i in b) for b in batches if b)
    return real / processed if processed else 1.0
