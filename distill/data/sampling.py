"""Batch samplers: seeded shuffling every epoch, optionally grouping examples of similar length.

Grouping by length keeps padding low (each batch pads to its own longest example) while the
order stays random: each epoch shuffles all examples, cuts them into mega-batches of
`group_size` batches, sorts each mega-batch by length, splits it into batches, and shuffles the
full batches (a short last batch stays last, where distributed sharding expects it). Evaluation and the teacher-cache pass use one fixed length-sorted order, longest first
(outputs are put back by feature_id), so an out-of-memory batch shows up at once.

The order is a pure function of (seed, epoch): a resumed run replays the same batches, and every
process of a distributed run sees the same list before accelerate shards it.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler


class LengthGroupedBatchSampler(Sampler[list[int]]):
    """Batches of indices into a dataset whose examples have the given lengths (tokens)."""

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
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1 (batches per length-sorted group), got {group_size}")
        self.lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)  # [examples]
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.group_by_length = group_by_length
        self.seed = seed
        self.group_size = group_size
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order `__iter__` yields (the training loop calls it)."""
        self.epoch = epoch

    def _by_length(self, indices: np.ndarray) -> np.ndarray:
        """`indices` sorted longest first; ties keep their order (stable)."""
        return indices[np.argsort(-self.lengths[indices], kind="stable")]

    def batches(self) -> list[list[int]]:
        """This epoch's batches (a pure function of seed and epoch)."""
        n = len(self.lengths)
        if not self.shuffle:
            order = np.arange(n)
            if self.group_by_length:
                order = self._by_length(order)
            return self._chunk(order)
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(n, generator=g).numpy()
        if not self.group_by_length:
            return self._chunk(order)
        # Each mega-batch is a whole number of batches, so no batch mixes two mega-batches.
        mega = self.batch_size * self.group_size
        batches: list[list[int]] = []
        for start in range(0, n, mega):
            batches.extend(self._chunk(self._by_length(order[start : start + mega]), drop=False))
        partial = batches.pop() if batches and len(batches[-1]) < self.batch_size else None
        perm = torch.randperm(len(batches), generator=g).tolist()
        batches = [batches[i] for i in perm]
        # The one short batch stays last: accelerate's per-process sharding expects only the
        # last batch to be short and would silently skip a short one (and its partner) earlier.
        if partial is not None and not self.drop_last:
            batches.append(partial)
        return batches

    def _chunk(self, order: np.ndarray, drop: bool | None = None) -> list[list[int]]:
        drop = self.drop_last if drop is None else drop
        batches = [order[i : i + self.batch_size].tolist() for i in range(0, len(order), self.batch_size)]
        if drop and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches()

    def __len__(self) -> int:
        n = len(self.lengths)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)


def sorted_batches(lengths: Sequence[int], max_batch: int, min_fill: float = 0.95) -> list[list[int]]:
    """Longest-first batches of at most `max_batch` examples for inference passes.

    A batch also closes before its padding would push its fill (real / processed tokens)
    below `min_fill`: a fixed count of consecutive length-sorted rows spans a wide range of
    lengths on a small or long-tailed set (the first batch of 128 rows of 256 pads most of
    them to the longest), while big sets still get full batches.
    """
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    if not 0.0 <= min_fill <= 1.0:
        raise ValueError(f"min_fill must be in [0, 1], got {min_fill}")
    lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)  # [examples]
    order = np.argsort(-lengths, kind="stable")
    batches: list[list[int]] = []
    current: list[int] = []
    longest = real = 0
    for i in order.tolist():
        length = int(lengths[i])
        if current and (
            len(current) == max_batch or (real + length) < min_fill * longest * (len(current) + 1)
        ):
            batches.append(current)
            current, real = [], 0
        if not current:
            longest = length
        current.append(i)
        real += length
    if current:
        batches.append(current)
    return batches


def padding_ratio(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """Real tokens / processed tokens when every batch pads to its longest member."""
    lengths = np.asarray(lengths)
    real = processed = 0
    for b in batches:
        if len(b):
            rows = lengths[np.asarray(b)]
            real += int(rows.sum())
            processed += len(b) * int(rows.max())
    return real / processed if processed else 1.0
