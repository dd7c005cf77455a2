"""The teacher cache's on-disk format, written and read here only (`teachers/cache.py` runs the
teacher and decides when to build): one shard per process that built it, read by any number of
processes, rows gathered by feature id with vectorised numpy indexing into memory-mapped files.

    <cache>/metadata.json                    the key's parts, the targets' specs, the shards
    <cache>/shard-<rank>/feature_id.npy      the features this process computed, in its order
    <cache>/shard-<rank>/<name>.bin          each row's values back to back ([items, *trailing])
    <cache>/shard-<rank>/<name>.offsets.npy  where each row starts ([rows + 1], in items)
    <cache>/shard-<rank>/shard.json          rows and items written

A target's row is an array [n_i, *trailing] (n_i: the row's length, e.g. its words or tokens) or
one value per feature; floats are stored as float16, float32 or bfloat16 (its uint16 bits:
numpy has no bfloat16), bools as uint8.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from distill.errors import CacheError

HIDDEN_PREFIX = "hidden_states_"


@dataclass
class TargetSpec:
    """How one stored target looks: row i is an array of shape [n_i, *trailing] (n_i = the
    row's length on axis 1), or of shape [*trailing] when the target has no axis 1."""

    name: str
    dtype: str  # float16, float32, bfloat16 (as uint16 bits), uint8 for bool, or the int type
    trailing: list[int]
    length_column: Optional[str]  # batch column that trims axis 1; None = untrimmed
    is_bool: bool = False
    scalar: bool = False  # the target is [batch] (one value per feature)

    @property
    def numpy_dtype(self) -> np.dtype:
        return np.dtype(np.uint16 if self.dtype == "bfloat16" else self.dtype)


def shard_dir(folder: Path, rank: int) -> Path:
    return folder / f"shard-{rank:05d}"


def write_shard(folder: Path, specs: dict[str, TargetSpec], batches: Any) -> dict[str, Any]:
    """Write one process's shard into `folder`: `batches` yields (feature ids, {name: (values
    [items, *trailing] back to back, items per row)}); values are appended to `<name>.bin` as
    they come, nothing is held. Returns {rows, items per target}."""
    folder.mkdir(parents=True)
    files = {name: open(folder / f"{name}.bin", "wb") for name in specs}
    ids: list[np.ndarray] = []
    counts: dict[str, list[np.ndarray]] = {name: [] for name in specs}
    try:
        for feature_ids, rows in batches:
            ids.append(np.asarray(feature_ids, dtype=np.int64))
            for name, (values, per_row) in rows.items():
                np.ascontiguousarray(values).tofile(files[name])
                counts[name].append(np.asarray(per_row, dtype=np.int64))
    finally:
        for f in files.values():
            f.close()
    np.save(folder / "feature_id.npy", np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64))
    items = {}
    for name, parts in counts.items():
        per_row = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        offsets = np.zeros(len(per_row) + 1, dtype=np.int64)
        np.cumsum(per_row, out=offsets[1:])
        np.save(folder / f"{name}.offsets.npy", offsets)
        items[name] = int(offsets[-1])
    written = {"rows": int(sum(len(i) for i in ids)), "items": items}
    (folder / "shard.json").write_text(json.dumps(written))
    return written


class TeacherCache:
    """A built cache, memory-mapped: `gather(feature_ids)` returns each target of those features
    padded to the batch, as CPU tensors.

    Opening reads the small index arrays (feature ids and offsets of every shard) into one
    table: feature id -> (shard, first item, items) per target. A lookup is a few vectorised
    numpy gathers from the memory-mapped values, one per shard the batch touches, so nothing
    but the rows asked for is ever read. Picklable (reopened by path), for DataLoader workers.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta_file = self.path / "metadata.json"
        if not meta_file.exists():
            raise CacheError(f"{self.path} is not a teacher cache (no metadata.json); delete it to rebuild")
        self.metadata = json.loads(meta_file.read_text())
        self.specs = {name: TargetSpec(**spec) for name, spec in self.metadata["targets"].items()}
        n = int(self.metadata["num_rows"])
        self.shard_of = np.full(n, -1, dtype=np.int32)  # [features]
        self.start = {name: np.zeros(n, dtype=np.int64) for name in self.specs}  # first item of each row
        self.count = {name: np.zeros(n, dtype=np.int64) for name in self.specs}  # items of each row
        self.values: dict[str, list[np.ndarray]] = {name: [] for name in self.specs}  # per shard
        try:
            for s, shard in enumerate(self.metadata["shards"]):
                folder = shard_dir(self.path, shard["rank"])
                ids = np.load(folder / "feature_id.npy")
                if ids.size and (ids.min() < 0 or ids.max() >= n or (self.shard_of[ids] >= 0).any()):
                    raise CacheError(f"teacher cache {self.path} is damaged (shard {shard['rank']} repeats or "
                                     "exceeds feature ids); delete it to rebuild")
                self.shard_of[ids] = s
                for name, spec in self.specs.items():
                    offsets = np.load(folder / f"{name}.offsets.npy")
                    self.start[name][ids], self.count[name][ids] = offsets[:-1], np.diff(offsets)
                    shape = (int(offsets[-1]), *spec.trailing)
                    if shape[0] == 0:  # np.memmap cannot map an empty file
                        self.values[name].append(np.zeros(shape, dtype=spec.numpy_dtype))
                    else:
                        self.values[name].append(np.memmap(folder / f"{name}.bin", spec.numpy_dtype, "r", shape=shape))
        except (OSError, ValueError) as err:
            raise CacheError(f"teacher cache {self.path} is damaged ({err}); delete it to rebuild") from None
        if (self.shard_of < 0).any():
            raise CacheError(f"teacher cache {self.path} is damaged (features missing); delete it to rebuild")

    def __getstate__(self) -> dict:
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])

    def __len__(self) -> int:
        return int(self.metadata["num_rows"])

    @property
    def hidden_layers(self) -> list[int]:
        return list(self.metadata["parts"].get("hidden_layers", []))

    @property
    def target_names(self) -> list[str]:
        """The stored logit targets (everything but hidden states)."""
        return [name for name in self.specs if not name.startswith(HIDDEN_PREFIX)]

    def gather(
        self, feature_ids: Sequence[int], names: Optional[Sequence[str]] = None, widths: Optional[dict[str, int]] = None
    ) -> dict[str, torch.Tensor]:
        """Targets `names` (default: all) of these features, zero-padded on axis 1 to the longest
        row (or to `widths[name]` when larger): CPU tensors [batch, width, *trailing],
        [batch, *trailing] or [batch]; float16 / float32 / bfloat16 / bool as stored."""
        ids = np.asarray(feature_ids, dtype=np.int64).reshape(-1)  # [batch]
        shard = self.shard_of[ids]  # [batch]
        used = np.unique(shard)
        out = {}
        for name in self.specs if names is None else names:
            spec, values = self.specs[name], self.values[name]
            starts, counts = self.start[name][ids], self.count[name][ids]  # [batch]
            if spec.scalar:
                array = np.empty(len(ids), dtype=spec.numpy_dtype)
                for s in used:
                    rows = shard == s
                    array[rows] = values[s][starts[rows]]
            else:
                width = max(int(counts.max(initial=0)), (widths or {}).get(name, 0))
                array = np.zeros((len(ids), width, *spec.trailing), dtype=spec.numpy_dtype)
                positions = np.arange(width)
                real = positions[None, :] < counts[:, None]  # [batch, width]
                source = starts[:, None] + positions[None, :]  # [batch, width]: item in the shard
                for s in used:
                    take = real & (shard == s)[:, None]
                    array[take] = values[s][source[take]]
            tensor = torch.from_numpy(array)
            if spec.dtype == "bfloat16":
                tensor = tensor.view(torch.bfloat16)
            out[name] = tensor.bool() if spec.is_bool else tensor
        return out
