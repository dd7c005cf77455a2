"""Raw splits -> the task's features -> batches.

`load_data` reads and subsamples the recipe's splits and lets the task read its label names
(before any model is built, so heads get the right size); `prepare_data` tokenizes them with the
task's bound tokenizers; `make_loader` batches them in an order that is a function of
(seed, epoch) only, so a resumed run sees the same batches.
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import Any, Optional, Sequence

import pyarrow as pa
import torch
from datasets import Dataset, DatasetDict
from torch.utils.data import DataLoader

from distill.data import read as data_mod
from distill.config import DataConfig
from distill.errors import DataError
from distill.files import sha256_file
from distill.launch import main_first
from distill.data.sampling import LengthGroupedBatchSampler


def read_raw(data: DataConfig, seed: int) -> DatasetDict:
    """The recipe's raw splits, subsampled as a stage sees them."""
    return data_mod.subsample(data_mod.load_raw(data, seed), data, seed)


def load_data(data: DataConfig, seed: int, task: Any, raw: Optional[DatasetDict] = None) -> DatasetDict:
    """The raw splits (read here unless `raw` is given); the task (distill.tasks) reads its label
    names from them."""
    raw = read_raw(data, seed) if raw is None else raw
    try:
        task.setup(raw)
    except ValueError as err:  # the task's own data checks (DataError is a ValueError too)
        raise DataError(str(err)) from None
    return raw


def prepare_data(task: Any, raw: DatasetDict, accelerator: Optional[Any] = None) -> dict[str, Dataset]:
    """Raw splits -> features with the task's (bound) tokenizers. With an accelerator, the main
    process tokenizes first and the others then read the datasets cache."""
    features = {}
    first = main_first(accelerator, "tokenizing the data") if accelerator is not None else contextlib.nullcontext()
    with first:
        for split, ds in raw.items():
            try:
                features[split] = task.preprocess(ds, split)
            except ValueError as err:
                raise DataError(f"split '{split}': {err}") from None
    for split, feats in features.items():
        if len(feats) == 0:
            raise DataError(f"split '{split}' has no features after preprocessing")
    return features


def make_loader(
    task: Any,
    features: Dataset,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    group_by_length: bool = True,
    num_workers: int = 0,
    pin_memory: bool = False,
    collate: Optional[Any] = None,
    persistent: bool = True,
) -> DataLoader:
    """Length-grouped batches whose order is a function of (seed, epoch) only.

    The loader gets its own generator: starting an iteration draws a seed from it, and drawing
    from the global RNG instead would shift dropout after a resume. Workers only collate (the
    batch order is fixed by the sampler), so their number never changes the batches; they live
    as long as the loader unless `persistent` is false (then each epoch starts its own, with the
    collate as it is then: a two-phase stage changes what its collate gathers between phases).
    """
    sampler = LengthGroupedBatchSampler(
        features["length"], batch_size, shuffle=shuffle, group_by_length=group_by_length, seed=seed
    )
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        features,
        batch_sampler=sampler,
        collate_fn=collate or task.collate,
        generator=generator,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=persistent and num_workers > 0,
    )


# ---------------------------------------------------------------------------------------------
# What the data is: a content hash (the teacher cache's key and a stage's identity use it)
# ---------------------------------------------------------------------------------------------


class _HashSink:
    """A write-only file object that hashes what is written (Arrow IPC streams into it)."""

    def __init__(self) -> None:
        self.digest = hashlib.sha256()
        self.closed = False

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self.digest.update(view)
        return view.nbytes

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def data_fingerprint(features: Dataset) -> str:
    """A hash of the features' content (every column, in row order).

    `Dataset._fingerprint` is not used: datasets falls back to a random one whenever the
    preprocessing function cannot be hashed, which would make every run miss the cache.
    """
    table = features.with_format("arrow")[:]  # zero-copy view (takes rows if indices are mapped)
    sink = _HashSink()
    with pa.ipc.new_stream(pa.PythonFile(sink, mode="w"), table.schema) as writer:
        writer.write_table(table)
    return sink.digest.hexdigest()[:16]


def data_identity(raw: DatasetDict, transfer: Sequence[Any] = ()) -> dict[str, str]:
    """A content hash of every raw split (as `read_raw` gives them) and of each `data.transfer`
    entry (keyed `data.transfer[i]`: local files by their bytes, a Hub source by its rows): a
    stage resumed or skipped as complete must have been trained on exactly this data."""
    out = {split: data_fingerprint(ds) for split, ds in raw.items()}
    for i, src in enumerate(transfer):
        files = list(src.files) or ([src.source] if src.source and Path(src.source).is_file() else [])
        if not files:
            from distill.data.transfer import read_transfer_source

            out[f"data.transfer[{i}]"] = data_fingerprint(read_transfer_source(src, i))
            continue
        digest = hashlib.sha256()
        for f in files:
            if not Path(f).is_file():
                raise DataError(f"data.transfer[{i}]: file not found: {f}")
            digest.update(sha256_file(Path(f)).encode())
        out[f"data.transfer[{i}]"] = digest.hexdigest()[:16]
    return out
