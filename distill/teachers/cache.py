"""Teacher outputs computed once, stored on disk, and read back by feature during distillation.

Distilling with the teacher online runs a large model on every batch of every epoch of every
student. The teacher's outputs on the training set never change, so the cache runs it once —
inference mode, length-sorted large batches, under accelerate's mixed-precision setting — and
stores what `task.kd_targets` returns, per feature (logits as float16, bools as uint8), plus the
hidden layers the hidden-state term reads on request (float32, or 16-bit with
`distill.cache_hidden_dtype`). Training looks rows up by `feature_id` in the data pipeline
(`TeacherCache.gather`, called by the training collate), so shuffling, length grouping, resume
and multi-process sharding never depend on the order the cache was built in.

Layout of `<cache_dir>/<key>/` (teachers/shards.py): `metadata.json` (the key's parts, the
stored targets, the shards, sizes) and one folder per process that built it, `shard-<rank>/`,
with the features it computed and each target's rows back to back, memory-mapped on read. Each
process writes its own shard and nothing is merged, so a build by N processes is read by any
number M. The key
hashes everything that changes the outputs (teacher weights, tokenizers, preprocessing options,
label order, the features' content, precision, stored hidden layers and their dtype), so a stale
cache is never read and a matching one is shared across runs, e.g. by every student of a grid.
Folders are written under a temporary name and renamed when complete, with the sha256
of every file in `checksums.json`; a reuse verifies them first, so a damaged or cut-short cache
is built again rather than trained on. The precision in the key is the one that applies
(`launch.effective_precision`: fp16 on a CPU runs, and is recorded, as fp32).

Rows of varying length are trimmed before storage and zero-padded to the batch on read: a
target's axis 1 is cut to the row's value of a batch column (`task.kd_target_lengths`, e.g.
`word_logits -> num_words`, `start_logits -> length`); the task's masks keep padding out of the
loss. Hidden states are trimmed to the row's real tokens.

Here: the key, the teacher's pass with its disk check, and reuse-or-build. The format itself is
written and read by one module, teachers/shards.py, so writer and reader cannot drift.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from accelerate import Accelerator
from datasets import Dataset
from torch import nn
from torch.utils.data import DataLoader

from distill import models
from distill.data.sampling import sorted_batches
from distill.tasks.base import Task
from distill.files import check_free_space, reusable, write_checksums
from distill.launch import effective_precision, on_main, together
from distill.errors import CacheError
from distill.data.features import data_fingerprint
from distill.teachers.shards import HIDDEN_PREFIX, TargetSpec, TeacherCache, shard_dir, write_shard

log = logging.getLogger("distill")

CACHE_VERSION = 2  # 2: one shard per building process, raw memory-mapped arrays
FLOAT16_MAX = float(np.finfo(np.float16).max)
HIDDEN_DTYPES = ("float32", "float16", "bfloat16")
# Row lengths of the families' variable-length targets, for tasks that do not declare
# `kd_target_lengths` themselves: target key -> batch column holding each row's length on axis 1.
KNOWN_LENGTHS = {
    "word_logits": "num_words",
    "word_mask": "num_words",
    "start_logits": "length",
    "end_logits": "length",
}
# Free space required, as a multiple of the estimate (a margin: the estimate counts values only).
SPACE_FACTOR = 1.1


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
    hidden_dtype: str = "float32",
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
        "hidden_dtype": hidden_dtype if hidden_layers else None,
    }
    key = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return key, parts


# ---------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------


def _storage_dtype(name: str, tensor: torch.Tensor, hidden_dtype: str) -> tuple[str, bool]:
    """(dtype to store, whether it was bool): logits as float16, hidden states as asked, bools
    as uint8."""
    if tensor.dtype == torch.bool:
        return "uint8", True
    if tensor.is_floating_point():
        return (hidden_dtype if name.startswith(HIDDEN_PREFIX) else "float16"), False
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


def _specs(task: Task, targets: dict[str, torch.Tensor], hidden_dtype: str) -> dict[str, TargetSpec]:
    lengths = length_columns(task)
    specs = {}
    for name, tensor in targets.items():
        dtype, is_bool = _storage_dtype(name, tensor, hidden_dtype)
        scalar = tensor.dim() == 1
        trailing = [] if tensor.dim() <= 2 else list(tensor.shape[2:])
        column = None if scalar else lengths.get(name)
        specs[name] = TargetSpec(name, dtype, trailing, column, is_bool, scalar)
    return specs


def _stored(spec: TargetSpec, tensor: torch.Tensor) -> tuple[np.ndarray, int]:
    """A batch of one target as the numpy array written ([batch, width, *trailing] or [batch]),
    and how many values were clamped to the float16 range."""
    tensor = tensor.detach()
    clamped = 0
    if spec.dtype == "bfloat16":  # numpy has no bfloat16: its bits, as uint16
        return tensor.to(torch.bfloat16).view(torch.int16).cpu().numpy().view(np.uint16), 0
    if tensor.is_floating_point():
        tensor = tensor.float()
        if spec.dtype == "float16":
            clamped = int((tensor.abs() > FLOAT16_MAX).sum())
            tensor = tensor.clamp(-FLOAT16_MAX, FLOAT16_MAX)
    return tensor.cpu().numpy().astype(spec.dtype), clamped


def _batch_rows(
    specs: dict[str, TargetSpec], targets: dict[str, torch.Tensor], batch: dict, task: Task
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], int]:
    """Each target's rows of a batch, trimmed: {name: (values [items, *trailing] back to back,
    items per row)}, and how many values were clamped to the float16 range."""
    out, clamped = {}, 0
    for name, spec in specs.items():
        array, n = _stored(spec, targets[name])
        clamped += n
        rows = len(array)
        if spec.scalar:
            out[name] = (array.reshape(-1), np.ones(rows, dtype=np.int64))
            continue
        trim = spec.length_column is not None or name.startswith(HIDDEN_PREFIX)
        lengths = _row_lengths(spec, targets[name], batch, task) if trim else np.full(rows, array.shape[1], dtype=np.int64)
        keep = np.arange(array.shape[1])[None, :] < lengths[:, None]  # [batch, width]
        out[name] = (array[keep], lengths)  # row-major: rows back to back, each cut to its length
    return out, clamped


def estimate_bytes(specs: dict[str, TargetSpec], features: Dataset, probe_widths: dict[str, int]) -> int:
    """Bytes the stored values will take (trimmed rows; untrimmed ones at the probe's width)."""
    n = len(features)
    total = n * 8  # feature_id
    lengths_cache: dict[str, int] = {}
    for name, spec in specs.items():
        per_item = int(np.prod(spec.trailing, dtype=np.int64)) * spec.numpy_dtype.itemsize
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


def build_cache(
    task: Task,
    teacher: nn.Module,
    features: Dataset,
    accelerator: Accelerator,
    path: Path,
    parts: dict[str, Any],
    hidden_layers: Sequence[int] = (),
    batch_size: int = 128,
    hidden_dtype: str = "float32",
) -> Path:
    """Run the teacher over `features` once and write the cache folder `path` (atomically).

    Every process computes the features i with i % num_processes == rank (longest first, in
    batches of up to `batch_size` that stay nearly free of padding) into its own shard
    (teachers/shards.py). Once all have written theirs, the main process checks that the shards
    hold every feature exactly once (their `feature_id.npy` only), writes metadata.json and the
    checksums and renames the folder into place: nothing is merged or copied, so no process
    waits on a merge. Called on every process.
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
    specs = _specs(task, probe_targets, hidden_dtype)
    widths = {k: (1 if v.dim() == 1 else v.size(1)) for k, v in probe_targets.items()}
    needed = estimate_bytes(specs, features, widths)
    if hidden_layers and main:
        hidden = next(spec.trailing[0] for name, spec in specs.items() if name.startswith(HIDDEN_PREFIX))
        tokens = int(np.asarray(features.with_format("numpy")["length"]).sum())
        itemsize = np.dtype(np.uint16 if hidden_dtype == "bfloat16" else hidden_dtype).itemsize
        size = tokens * len(hidden_layers) * hidden * itemsize
        print(
            f"[distill] caching teacher hidden states: {len(features)} features x "
            f"{len(hidden_layers)} layers x {tokens / max(1, len(features)):.1f} tokens (mean) x "
            f"{hidden} x {itemsize} bytes ({hidden_dtype}) = {_format_bytes(size)} in {path}",
            flush=True,
        )
    check_free_space(
        path.parent, int(needed * SPACE_FACTOR), "the teacher cache", error=CacheError,
        advice="Point distill.cache_dir at a larger disk, free space, or use distill.teacher_outputs=online",
    )

    def make_tmp() -> None:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)

    on_main(accelerator, f"creating {tmp}", make_tmp)

    # --- this process's shard ---------------------------------------------------------------
    rank, world = accelerator.process_index, accelerator.num_processes
    shard = features.select(range(rank, len(features), world))
    loader = DataLoader(shard, batch_sampler=sorted_batches(shard["length"], batch_size), collate_fn=task.collate)
    clamped = [0]

    def computed():
        for batch in loader:
            batch = _to_device(batch, accelerator.device)
            rows, n_clamped = _batch_rows(specs, forward(batch), batch, task)
            clamped[0] += n_clamped
            yield batch["feature_id"].cpu().numpy(), rows

    # every process learns whether every shard was written (a failure names its process)
    with together(accelerator, f"writing teacher cache shards in {tmp}"):
        written = write_shard(shard_dir(tmp, rank), specs, computed())
        teacher.train(was_training)
        if clamped[0]:
            log.warning("teacher cache: %d values beyond the float16 range were clamped to +-%g", clamped[0], FLOAT16_MAX)
        (shard_dir(tmp, rank) / "shard.json").write_text(json.dumps({"rank": rank, **written, "clamped_values": clamped[0]}))

    def publish() -> None:
        """Check that the shards hold every feature once (their ids only: nothing is merged),
        record them, checksum every file and rename the folder into place."""
        shards = [json.loads((shard_dir(tmp, r) / "shard.json").read_text()) for r in range(world)]
        ids = np.concatenate([np.load(shard_dir(tmp, r) / "feature_id.npy") for r in range(world)])
        if len(ids) != len(features) or not np.array_equal(np.sort(ids), np.arange(len(features))):
            raise CacheError(
                f"teacher cache shards in {tmp} hold {len(ids)} rows with {len(np.unique(ids))} "
                f"distinct feature ids for {len(features)} features: every feature must be "
                "computed exactly once. Delete the folder and run again."
            )
        metadata = {
            "key": path.name,
            "parts": parts,
            "targets": {name: asdict(spec) for name, spec in specs.items()},
            "num_rows": len(features),
            "shards": shards,
            "batch_size": batch_size,
            "bytes": sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file()),
            "build_seconds": round(time.perf_counter() - start, 3),
            "clamped_values": sum(s["clamped_values"] for s in shards),
        }
        (tmp / "metadata.json").write_text(json.dumps(metadata, indent=2))
        write_checksums(tmp)  # verified whenever the cache is reused
        try:
            os.replace(tmp, path)
        except OSError:
            if not (path / "metadata.json").exists():
                raise
            # another run finished the same cache first: theirs is identical, keep it
            shutil.rmtree(tmp, ignore_errors=True)

    on_main(accelerator, f"publishing the teacher cache {path}", publish)
    return path


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
    hidden_dtype: str = "float32",
) -> TeacherCache:
    """The cache under `root` for this (teacher, tokenizers, preprocessing `settings`, data,
    stored hidden layers and their dtype): reused when it exists, built (each process writing its
    own shard) when it does not. A cache is reused only when its files match the checksums written with it; a
    damaged or cut-short one is removed (with a warning naming it) and built again."""
    # the precision that applies (fp16 on a CPU runs in fp32: the same outputs, the same key)
    key, parts = cache_key(task, teacher, train_features, effective_precision(accelerator), settings, hidden_layers, hidden_dtype)
    path = Path(root) / key
    if on_main(accelerator, f"checking the teacher cache {path}", lambda: reusable(path, "metadata.json", "teacher cache")):
        if accelerator.is_main_process:
            print(f"[distill] teacher cache: reusing {path}", flush=True)
    else:
        if accelerator.is_main_process:
            print(f"[distill] teacher cache: building {path} ({len(train_features)} features)", flush=True)
        try:
            build_cache(task, teacher, train_features, accelerator, path, parts, hidden_layers, batch_size, hidden_dtype)
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
