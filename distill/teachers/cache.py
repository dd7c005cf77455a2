"""Teacher outputs computed once, stored on disk, and read back by feature during distillation.

Distilling with the teacher online runs a large model on every batch of every epoch of every
student. The teacher's outputs on the training set never change, so the cache runs it once —
inference mode, length-sorted large batches, under accelerate's mixed-precision setting — and
stores what `task.kd_targets` returns, per feature, as float16 in a `datasets` Arrow folder
(memory-mapped on read). Training then looks rows up by `feature_id`, so shuffling, length
grouping, resume and multi-process sharding never depend on the order the cache was built in.

Layout: `<cache_dir>/<key>/` with `metadata.json` (the key's parts, the stored targets, sizes)
and `data/` (one row per feature, ordered by feature_id: `feature_id` plus one flat list column
per target). The key hashes everything that changes the outputs (teacher weights, tokenizers,
preprocessing options, label order, the features' content, precision, stored hidden layers), so
a stale cache is never read and a matching one is shared across runs, e.g. by every student of
a grid. Folders are written under a temporary name and renamed when complete, with the sha256
of every file in `checksums.json`; a reuse verifies them first, so a damaged or cut-short cache
is built again rather than trained on. The precision in the key is the one that applies
(`launch.effective_precision`: fp16 on a CPU runs, and is recorded, as fp32).

Rows of varying length are trimmed before storage and zero-padded to the batch on read: a
target's axis 1 is cut to the row's value of a batch column (`task.kd_target_lengths`, e.g.
`word_logits -> num_words`, `start_logits -> length`); the task's masks keep padding out of the
loss. Hidden states (only with `distill.cache_hidden_states=true`) are trimmed to the row's real
tokens.

One concern over ~500 lines: the cache's on-disk format is written and read by the same code
(key, build with its disk check and shard merge, memory-mapped reads); splitting writer from
reader would let the two drift.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pyarrow as pa
import torch
from accelerate import Accelerator
from datasets import Dataset, Features, LargeList, Value, concatenate_datasets, load_from_disk
from datasets.arrow_writer import ArrowWriter
from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
from torch import nn
from torch.utils.data import DataLoader

from distill import models
from distill.data.sampling import sorted_batches
from distill.tasks.base import Task
from distill.files import check_free_space, reusable, write_checksums
from distill.launch import effective_precision, on_main, together
from distill.errors import CacheError
from distill.data.features import data_fingerprint

log = logging.getLogger("distill")

CACHE_VERSION = 1
FLOAT16_MAX = float(np.finfo(np.float16).max)
HIDDEN_PREFIX = "hidden_states_"
# Row lengths of the families' variable-length targets, for tasks that do not declare
# `kd_target_lengths` themselves: target key -> batch column holding each row's length on axis 1.
KNOWN_LENGTHS = {
    "word_logits": "num_words",
    "word_mask": "num_words",
    "start_logits": "length",
    "end_logits": "length",
}
# Free space required, as a multiple of the estimate: shards and the merged copy coexist while
# merging.
SPACE_FACTOR = 2.0


def length_columns(task: Task) -> dict[str, str]:
    """Target key -> batch column with each row's length on axis 1 (absent: stored untrimmed)."""
    declared = getattr(task, "kd_target_lengths", None)
    if declared is not None:
        return dict(declared)
    return {k: v for k, v in KNOWN_LENGTHS.items() if k in task.kd_target_keys}


# ---------------------------------------------------------------------------------------------
# The key: everything that changes the teacher's outputs
# ---------------------------------------------------------------------------------------------


def cache_key(
    task: Task,
    teacher: nn.Module,
    features: Dataset,
    mixed_precision: str,
    settings: dict[str, Any],
    hidden_layers: Sequence[int] = (),
) -> tuple[str, dict[str, Any]]:
    """(key, parts): the parts name everything that changes what the cache holds. `settings` are
    the preprocessing options the caller used (task family, lengths, strides, ...)."""
    id2label = getattr(teacher.config, "id2label", None) or {}
    parts = {
        "version": CACHE_VERSION,
        "teacher": models.fingerprint(teacher),
        "teacher_class": type(teacher).__name__,
        "teacher_labels": [id2label[i] for i in sorted(id2label)],
        "tokenizer": models.tokenizer_digest(task.teacher_tokenizer or task.tokenizer),
        "student_tokenizer": models.tokenizer_digest(task.tokenizer),
        "task_class": f"{type(task).__module__}.{type(task).__name__}",
        "labels": list(task.labels),
        **settings,
        "data": data_fingerprint(features),
        "num_features": len(features),
        "mixed_precision": str(mixed_precision),
        "targets": list(task.kd_target_keys),
        "hidden_layers": list(hidden_layers),
    }
    key = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return key, parts


# ---------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------


@dataclass
class TargetSpec:
    """How one stored target looks: row i is an array of shape [n_i, *trailing] (n_i = the
    row's length on axis 1), or of shape [*trailing] when the target has no axis 1."""

    name: str
    dtype: str  # numpy dtype of the stored values (float16, uint8 for bool, or the int type)
    trailing: list[int]
    length_column: Optional[str]  # batch column that trims axis 1; None = untrimmed
    is_bool: bool = False
    scalar: bool = False  # the target is [batch] (one value per feature)


def _storage_dtype(tensor: torch.Tensor) -> tuple[str, bool]:
    """(numpy dtype to store, whether it was bool): floats as float16, bools as uint8."""
    if tensor.dtype == torch.bool:
        return "uint8", True
    if tensor.is_floating_point():
        return "float16", False
    return str(torch.empty(0, dtype=tensor.dtype).numpy().dtype), False


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class _Teacher:
    """The teacher's forward in inference mode under the mixed-precision setting, returning the
    task's targets plus the requested hidden states as one dict of per-feature tensors."""

    def __init__(self, teacher: nn.Module, task: Task, accelerator: Accelerator, hidden_layers: Sequence[int]):
        self.teacher, self.task, self.accelerator = teacher, task, accelerator
        self.hidden_layers = list(hidden_layers)

    @torch.inference_mode()
    def __call__(self, batch: dict) -> dict[str, torch.Tensor]:
        with self.accelerator.autocast():
            out = self.teacher(
                **self.task.model_inputs(batch, teacher=True), output_hidden_states=bool(self.hidden_layers)
            )
        targets = dict(self.task.kd_targets(out, batch, teacher=True))
        for j in self.hidden_layers:
            targets[f"{HIDDEN_PREFIX}{j}"] = out.hidden_states[j]  # [batch, seq, hidden]
        return targets


def _prefix_lengths(mask: torch.Tensor, what: str) -> torch.Tensor:
    """Real positions per row of a right-padded attention mask ([batch]).

    Rows are stored trimmed and zero-padded on the right when read back, which is only the
    same tensor when padding sits on the right; a left-padding tokenizer is refused.
    """
    lengths = mask.sum(1)  # [batch]
    positions = torch.arange(mask.size(1), device=mask.device)  # [seq]
    if not torch.equal(mask.bool(), positions.unsqueeze(0) < lengths.unsqueeze(1)):
        raise CacheError(
            f"the {what} are not right-padded (padding_side='left'?): the teacher cache stores "
            "rows trimmed on the right. Use a right-padding tokenizer or distill.teacher_outputs=online"
        )
    return lengths


def _row_lengths(spec: TargetSpec, tensor: torch.Tensor, batch: dict, task: Task) -> np.ndarray:
    """Length of each row on axis 1 after trimming ([batch] ints)."""
    width = tensor.size(1)
    if spec.name.startswith(HIDDEN_PREFIX):
        inputs = task.model_inputs(batch, teacher=True)
        if "attention_mask" not in inputs:
            return np.full(tensor.size(0), width, dtype=np.int64)
        lengths = _prefix_lengths(inputs["attention_mask"], "teacher's inputs")
    elif spec.length_column is not None:
        if spec.length_column not in batch:
            raise CacheError(
                f"the task trims teacher target '{spec.name}' to batch column "
                f"'{spec.length_column}', which its collate does not produce"
            )
        lengths = batch[spec.length_column]
        mask = batch.get("attention_mask")
        if mask is not None and mask.size(1) == width:  # a target aligned with the tokens
            _prefix_lengths(mask, "inputs")
    else:
        return np.full(tensor.size(0), width, dtype=np.int64)
    return np.minimum(lengths.detach().cpu().numpy().astype(np.int64), width)


def _specs(task: Task, targets: dict[str, torch.Tensor]) -> dict[str, TargetSpec]:
    lengths = length_columns(task)
    specs = {}
    for name, tensor in targets.items():
        dtype, is_bool = _storage_dtype(tensor)
        scalar = tensor.dim() == 1
        trailing = [] if tensor.dim() <= 2 else list(tensor.shape[2:])
        column = None if scalar else lengths.get(name)
        specs[name] = TargetSpec(name, dtype, trailing, column, is_bool, scalar)
    return specs


def _features_schema(specs: dict[str, TargetSpec]) -> Features:
    schema = {"feature_id": Value("int64")}
    schema.update({name: LargeList(Value(spec.dtype)) for name, spec in specs.items()})
    return Features(schema)


def _batch_table(
    specs: dict[str, TargetSpec], targets: dict[str, torch.Tensor], batch: dict, task: Task
) -> tuple[pa.Table, int]:
    """One Arrow table for a batch: feature_id and each target's trimmed rows, flattened.
    Also returns how many values were clamped to the float16 range."""
    columns = {"feature_id": pa.array(batch["feature_id"].detach().cpu().numpy().astype(np.int64))}
    clamped = 0
    for name, spec in specs.items():
        tensor = targets[name].detach()
        if tensor.is_floating_point():
            tensor = tensor.float()
            clamped += int((tensor.abs() > FLOAT16_MAX).sum())
            tensor = tensor.clamp(-FLOAT16_MAX, FLOAT16_MAX)
        array = tensor.cpu().numpy().astype(spec.dtype)  # [batch, width, *trailing] or [batch]
        if spec.scalar:
            values, counts = array.reshape(-1), np.ones(len(array), dtype=np.int64)
        elif array.ndim == 2 and spec.length_column is None and not spec.name.startswith(HIDDEN_PREFIX):
            values, counts = array.reshape(-1), np.full(len(array), array.shape[1], dtype=np.int64)
        else:
            lengths = _row_lengths(spec, tensor, batch, task)
            per_item = int(np.prod(array.shape[2:], dtype=np.int64))
            values = np.concatenate([array[i, : lengths[i]].reshape(-1) for i in range(len(array))])
            counts = lengths * per_item
        offsets = np.zeros(len(counts) + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        columns[name] = pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values))
    return pa.table(columns), clamped


def estimate_bytes(specs: dict[str, TargetSpec], features: Dataset, probe_widths: dict[str, int]) -> int:
    """Bytes the stored values will take (trimmed rows; untrimmed ones at the probe's width)."""
    n = len(features)
    total = n * 8  # feature_id
    lengths_cache: dict[str, int] = {}
    for name, spec in specs.items():
        per_item = int(np.prod(spec.trailing, dtype=np.int64)) * np.dtype(spec.dtype).itemsize
        column = "length" if name.startswith(HIDDEN_PREFIX) else spec.length_column
        if spec.scalar:
            rows = n
        elif column is not None and column in features.column_names:
            if column not in lengths_cache:
                lengths_cache[column] = int(np.asarray(features.with_format("numpy")[column]).sum())
            rows = lengths_cache[column]
        else:
            rows = n * probe_widths[name]
        total += rows * per_item + (n + 1) * 8  # values + offsets
    return int(total)


def _format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TB"


class _QuietProgress:
    """datasets progress bars off while the cache writes (they would print one per shard)."""

    def __enter__(self) -> "_QuietProgress":
        self.was_enabled = not are_progress_bars_disabled()
        disable_progress_bars()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.was_enabled:
            enable_progress_bars()


def _shard_file(tmp: Path, rank: int) -> Path:
    return tmp / f"shard-{rank:05d}.arrow"


def build_cache(
    task: Task,
    teacher: nn.Module,
    features: Dataset,
    accelerator: Accelerator,
    path: Path,
    parts: dict[str, Any],
    hidden_layers: Sequence[int] = (),
    batch_size: int = 128,
) -> Path:
    """Run the teacher over `features` once and write the cache folder `path` (atomically).

    Every process computes the features i with i % num_processes == rank (longest first, in
    batches of up to `batch_size` that stay nearly free of padding) into its own shard; the main process merges the shards into one
    dataset ordered by feature_id, checks that every feature is there exactly once, writes
    metadata.json and renames the folder into place. Called on every process.
    """
    main = accelerator.is_main_process
    start = time.perf_counter()
    path = Path(path)
    token = on_main(accelerator, f"naming the teacher cache {path}", lambda: uuid.uuid4().hex[:8])
    tmp = path.parent / f".tmp-{path.name}-{token}"
    forward = _Teacher(teacher, task, accelerator, hidden_layers)
    was_training = teacher.training
    teacher.eval()

    # A two-row probe tells every process the targets' names, dtypes and shapes, so the disk
    # check (identical on every process) runs before anything is written.
    probe = _to_device(task.collate([features[i] for i in range(min(2, len(features)))]), accelerator.device)
    probe_targets = forward(probe)
    specs = _specs(task, probe_targets)
    widths = {k: (1 if v.dim() == 1 else v.size(1)) for k, v in probe_targets.items()}
    needed = estimate_bytes(specs, features, widths)
    if hidden_layers and main:
        hidden = next(spec.trailing[0] for name, spec in specs.items() if name.startswith(HIDDEN_PREFIX))
        tokens = int(np.asarray(features.with_format("numpy")["length"]).sum())
        size = tokens * len(hidden_layers) * hidden * 2
        print(
            f"[distill] caching teacher hidden states: {len(features)} features x "
            f"{len(hidden_layers)} layers x {tokens / max(1, len(features)):.1f} tokens (mean) x "
            f"{hidden} x 2 bytes = {_format_bytes(size)} in {path}",
            flush=True,
        )
    check_free_space(
        path.parent, int(needed * SPACE_FACTOR), "the teacher cache", error=CacheError,
        advice="Point distill.cache_dir at a larger disk, free space, or use distill.teacher_outputs=online",
    )

    def make_folder() -> None:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)

    on_main(accelerator, f"creating {tmp}", make_folder)

    # --- this process's shard ---------------------------------------------------------------
    rank, world = accelerator.process_index, accelerator.num_processes
    indices = list(range(rank, len(features), world))
    shard = features.select(indices)
    loader = DataLoader(shard, batch_sampler=sorted_batches(shard["length"], batch_size), collate_fn=task.collate)
    schema = _features_schema(specs)
    clamped = rows = 0
    # every process learns whether every shard was written (a failure names its process)
    with together(accelerator, f"writing teacher cache shards in {tmp}"):
        writer = ArrowWriter(features=schema, path=str(_shard_file(tmp, rank)))
        try:
            for batch in loader:
                batch = _to_device(batch, accelerator.device)
                table, n_clamped = _batch_table(specs, forward(batch), batch, task)
                writer.write_table(table)
                clamped += n_clamped
                rows += table.num_rows
            writer.finalize()
        finally:
            writer.close()
    teacher.train(was_training)
    if clamped:
        log.warning("teacher cache: %d values beyond the float16 range were clamped to +-%g", clamped, FLOAT16_MAX)

    # --- merge on the main process ----------------------------------------------------------
    def merge() -> None:
        with _QuietProgress():
            shards = [Dataset.from_file(str(_shard_file(tmp, r))) for r in range(world)]
            merged = concatenate_datasets([s for s in shards if len(s)]) if any(len(s) for s in shards) else shards[0]
            ids = np.asarray(merged.with_format("numpy")["feature_id"], dtype=np.int64)
            if len(ids) != len(features) or not np.array_equal(np.sort(ids), np.arange(len(features))):
                raise CacheError(
                    f"teacher cache shards in {tmp} hold {len(ids)} rows with {len(np.unique(ids))} "
                    f"distinct feature ids for {len(features)} features: every feature must be "
                    "computed exactly once. Delete the folder and run again."
                )
            merged.select(np.argsort(ids, kind="stable")).save_to_disk(str(tmp / "data"))
        metadata = {
            "key": path.name,
            "parts": parts,
            "targets": {name: asdict(spec) for name, spec in specs.items()},
            "num_rows": len(features),
            "shards": [{"rank": r, "rows": len(s)} for r, s in enumerate(shards)],
            "batch_size": batch_size,
            "bytes": sum(f.stat().st_size for f in (tmp / "data").iterdir()),
            "build_seconds": round(time.perf_counter() - start, 3),
            "clamped_values": clamped,
        }
        del shards, merged
        for r in range(world):
            _shard_file(tmp, r).unlink(missing_ok=True)
        (tmp / "metadata.json").write_text(json.dumps(metadata, indent=2))
        write_checksums(tmp)  # verified whenever the cache is reused
        try:
            os.replace(tmp, path)
        except OSError:
            if not (path / "metadata.json").exists():
                raise
            # another run finished the same cache first: theirs is identical, keep it
            shutil.rmtree(tmp, ignore_errors=True)

    on_main(accelerator, f"merging the teacher cache shards into {path}", merge)
    return path


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


class TeacherCache:
    """A built cache, memory-mapped: `rows(feature_ids)` returns each target padded to the batch.

    Reads go straight to the Arrow buffers (zero-copy numpy views of the mapped files), so a
    lookup costs a few microseconds per row and nothing is held in process memory.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta_file = self.path / "metadata.json"
        if not meta_file.exists():
            raise CacheError(f"{self.path} is not a teacher cache (no metadata.json); delete it to rebuild")
        self.metadata = json.loads(meta_file.read_text())
        self.specs = {name: TargetSpec(**spec) for name, spec in self.metadata["targets"].items()}
        self.dataset = load_from_disk(str(self.path / "data"))
        table = self.dataset.data.table
        n = self.metadata["num_rows"]
        ids = np.concatenate([c.to_numpy() for c in table.column("feature_id").chunks]) if n else np.zeros(0)
        if len(ids) != n or not np.array_equal(ids, np.arange(n)):
            raise CacheError(f"teacher cache {self.path} is damaged (rows out of feature order); delete it to rebuild")
        # per target: (first row of each chunk, offsets of each chunk, values of each chunk)
        self._chunks: dict[str, tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]] = {}
        for name in self.specs:
            column = table.column(name)
            starts, offsets, values, row = [], [], [], 0
            for chunk in column.chunks:
                starts.append(row)
                offsets.append(chunk.offsets.to_numpy())
                values.append(chunk.values.to_numpy(zero_copy_only=False))
                row += len(chunk)
            self._chunks[name] = (np.asarray(starts, dtype=np.int64), offsets, values)

    def __len__(self) -> int:
        return int(self.metadata["num_rows"])

    @property
    def hidden_layers(self) -> list[int]:
        return list(self.metadata["parts"].get("hidden_layers", []))

    def row(self, name: str, feature_id: int) -> np.ndarray:
        """One feature's stored target, shaped [n, *trailing] (or [*trailing] for [batch] targets)."""
        starts, offsets, values = self._chunks[name]
        c = int(np.searchsorted(starts, feature_id, side="right") - 1)
        i = feature_id - starts[c]
        flat = values[c][offsets[c][i] : offsets[c][i + 1]]
        spec = self.specs[name]
        if spec.scalar:
            return flat.reshape(())
        return flat.reshape(-1, *spec.trailing)

    def rows(self, feature_ids: Sequence[int], widths: Optional[dict[str, int]] = None) -> dict[str, np.ndarray]:
        """Every target for these features, zero-padded on axis 1 to the longest row (or to
        `widths[name]` when given): [batch, width, *trailing], [batch, *trailing] or [batch]."""
        out = {}
        for name, spec in self.specs.items():
            rows = [self.row(name, int(i)) for i in feature_ids]
            if spec.scalar:
                array = np.stack(rows) if rows else np.zeros(0, dtype=spec.dtype)
            else:
                width = max((len(r) for r in rows), default=0)
                if widths and name in widths:
                    width = max(width, widths[name])
                array = np.zeros((len(rows), width, *spec.trailing), dtype=spec.dtype)
                for i, r in enumerate(rows):
                    array[i, : len(r)] = r
            out[name] = array.astype(bool) if spec.is_bool else array
        return out


# ---------------------------------------------------------------------------------------------
# The entry point: reuse or build
# ---------------------------------------------------------------------------------------------


def get_or_build(
    root: Path,
    task: Task,
    teacher: nn.Module,
    train_features: Dataset,
    accelerator: Accelerator,
    settings: dict[str, Any],
    hidden_layers: Sequence[int] = (),
    batch_size: int = 128,
) -> TeacherCache:
    """The cache under `root` for this (teacher, tokenizers, preprocessing `settings`, data,
    stored hidden layers): reused when it exists, built (on every process, merged once) when it
    does not. A cache is reused only when its files match the checksums written with it; a
    damaged or cut-short one is removed (with a warning naming it) and built again."""
    # the precision that applies (fp16 on a CPU runs in fp32: the same outputs, the same key)
    key, parts = cache_key(task, teacher, train_features, effective_precision(accelerator), settings, hidden_layers)
    path = Path(root) / key
    if on_main(accelerator, f"checking the teacher cache {path}", lambda: reusable(path, "metadata.json", "teacher cache")):
        if accelerator.is_main_process:
            print(f"[distill] teacher cache: reusing {path}", flush=True)
    else:
        if accelerator.is_main_process:
            print(f"[distill] teacher cache: building {path} ({len(train_features)} features)", flush=True)
        try:
            build_cache(task, teacher, train_features, accelerator, path, parts, hidden_layers, batch_size)
        except BaseException:  # a signal (Preempted), an error, Ctrl-C: leave no half-built folder
            if accelerator.is_main_process:
                for tmp in path.parent.glob(f".tmp-{path.name}-*"):
                    shutil.rmtree(tmp, ignore_errors=True)
            raise
        if accelerator.is_main_process:
            meta = json.loads((path / "metadata.json").read_text())
            print(
                f"[distill] teacher cache: built in {meta['build_seconds']:.1f}s, "
                f"{_format_bytes(meta['bytes'])}",
                flush=True,
            )
    try:
        return TeacherCache(path)
    except CacheError:
        raise
    except Exception as err:  # checked above: a cache damaged since, or one written by other code
        raise CacheError(
            f"teacher cache {path} cannot be read ({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}): "
            "delete that folder and re-run the same command to rebuild it"
        ) from None
