"""The teacher behind one interface: `teacher(batch) -> Signals` (its logit targets and the layers
the loss terms read), whether it runs online or reads the cache.

    OnlineTeacher   runs the frozen model on each batch (inference mode, mixed precision)
    CachedTeacher   reads the targets (and cached hidden states) by the batch's feature_id
    MergedTeacher   cached targets + an online pass for what the cache does not hold (the
                    intermediate layers of attention/relation terms), stopped after the deepest
                    layer any term reads
    EnsembleTeacher several of the above (`teachers:`): their logit targets combined by
                    `distill.teacher_combine` (teachers/ensemble.py), the layers the
                    intermediate terms read taken from one of them. A teacher whose tokenizer
                    the batch does not carry is a CachedTeacher built on its own copy of the
                    features (loop/setup.py `teacher_inputs`): the same feature ids, so its
                    targets line up with the others'

`make_teacher` decides which one a stage gets from what the loss terms need (told by the
caller: the hidden layers and attention projections to keep), and builds the cache when needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from accelerate import Accelerator
from datasets import Dataset
from torch import nn

from distill.launch import effective_precision
from distill.teachers import cache as cache_mod
from distill.teachers.ensemble import MASKED_LOGIT, combine
from distill.errors import CacheError
from distill.objective.losses import Reads, Signals
from distill.tasks.base import Task, fit_width

Teacher = Callable[[dict], Signals]


def select(teacher: Any, reads: Reads) -> None:
    """Tell a teacher what the active loss terms read from it (a phase switch); callables
    without `select` always give everything."""
    if hasattr(teacher, "select"):
        teacher.select(reads)


class OnlineTeacher:
    """Runs the frozen teacher on each batch (inference mode, under the mixed-precision setting).

    The teacher is never passed to `accelerator.prepare`: no DDP/FSDP wrapper, no gradient sync,
    no optimizer state, and it stays out of checkpoints. Each process holds a full copy.
    `hidden_layers` are the hidden-state indices it may be asked for (0 = embeddings);
    `qkv_layers` the layers whose attention projections are captured, with hooks attached once
    (objective/capture.py), so SDPA stays on. `select(reads)` narrows that to what the active
    terms read: fewer layers, a forward stopped after the deepest one when no logit target is
    read, and no forward at all when nothing is (the second phase of a two-phase schedule whose
    logits come from the cache).
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        accelerator: Accelerator,
        hidden_layers: Sequence[int] = (),
        qkv_layers: Sequence[int] = (),
        targets: bool = True,
    ):
        self.model, self.task, self.accelerator = model, task, accelerator
        self.hidden_layers, self.qkv_layers = sorted(hidden_layers), sorted(qkv_layers)
        self.targets = targets
        self.capture = None
        if self.qkv_layers:
            from distill.objective.capture import Capture

            self.capture = Capture(model, qkv=self.qkv_layers, hidden=self.hidden_layers).attach()
        self.select(Reads(frozenset(self.hidden_layers), frozenset(self.qkv_layers), targets))

    def select(self, reads: Reads) -> None:
        self.reads = Reads(
            reads.hidden & frozenset(self.hidden_layers), reads.qkv & frozenset(self.qkv_layers), self.targets and reads.outputs
        )
        if self.capture is not None and self.reads.qkv:
            # without logit targets the forward stops after the deepest layer read
            stop = None if self.reads.outputs else self.reads.deepest
            self.capture.select(qkv=self.reads.qkv, hidden=self.reads.hidden, stop_after=stop)

    @torch.no_grad()
    def __call__(self, batch: dict) -> Signals:
        inputs = self.task.model_inputs(batch, teacher=True)
        reads = self.reads
        if not reads.anything:  # no active term reads this teacher: it does not run
            return Signals(attention_mask=inputs.get("attention_mask"))
        with self.accelerator.autocast():
            if not reads.qkv:
                out = self.model(**inputs, output_hidden_states=bool(reads.hidden))
                hidden = out.hidden_states if reads.hidden else None
                return self._signals(out, batch, inputs, hidden, None)
            out = None  # stays None when the capture stops the forward
            with self.capture as captured:
                out = self.model(**inputs)
        hidden = captured.hidden_states() if reads.hidden else None
        return self._signals(out, batch, inputs, hidden, captured.qkv)

    def _signals(self, out: Any, batch: dict, inputs: dict, hidden: Any, qkv: Any) -> Signals:
        return Signals(
            outputs=out,
            targets=self.task.kd_targets(out, batch, teacher=True) if self.reads.outputs else None,
            hidden=hidden,
            qkv=qkv,
            attention_mask=inputs.get("attention_mask"),
        )


class CachedTeacher:
    """Stands in for the online teacher with the cache's targets (and hidden states).

    In training they arrive with the batch: the training collate (`CachedTargets`) gathers them
    by the rows' feature ids under the keys `cached/<slot>/<name>`, in DataLoader workers, so
    the step reads no id back from the device. A batch without them (a direct call) is looked
    up here, by its `feature_id`.
    """

    def __init__(self, cache: cache_mod.TeacherCache, device: torch.device, num_hidden: int = 0):
        self.cache, self.device = cache, torch.device(device)
        self.num_hidden = num_hidden  # length of the hidden-state tuple the loss indexes
        self.prefix = "cached/0/"  # the batch keys its rows arrive under (set by CachedTargets)
        self.select(Reads(frozenset(cache.hidden_layers), frozenset(), True))

    def select(self, reads: Reads) -> None:
        """Read (and have the collate gather) only what the active terms read."""
        self.names = (self.cache.target_names if reads.outputs else []) + [
            f"{cache_mod.HIDDEN_PREFIX}{j}" for j in self.cache.hidden_layers if j in reads.hidden
        ]

    def rows(self, feature_ids: Any, width: int = 0) -> dict[str, torch.Tensor]:
        """The selected rows of these features as CPU tensors under their batch keys; hidden
        states padded to `width` tokens (the batch's)."""
        widths = {name: width for name in self.names if name.startswith(cache_mod.HIDDEN_PREFIX)}
        return {self.prefix + k: v for k, v in self.cache.gather(feature_ids, self.names, widths).items()}

    def __call__(self, batch: dict) -> Signals:
        keys = [self.prefix + name for name in self.names]
        if all(k in batch for k in keys):
            found = {k[len(self.prefix):]: batch[k] for k in keys}
        else:  # not collated with the lookup: read here (copies the ids to the host)
            width = batch["attention_mask"].size(1) if "attention_mask" in batch else 0
            ids = batch["feature_id"].detach().cpu().numpy()
            found = {k[len(self.prefix):]: v.to(self.device, non_blocking=True) for k, v in self.rows(ids, width).items()}
        tensors = {k: v.float() if v.is_floating_point() else v for k, v in found.items()}  # 16-bit as stored
        hidden = None
        if any(name.startswith(cache_mod.HIDDEN_PREFIX) for name in tensors):
            # a tuple indexed like the model's hidden_states; unmapped layers are never read
            size = max(self.num_hidden, max(self.cache.hidden_layers) + 1)
            hidden_list: list[Optional[torch.Tensor]] = [None] * size
            for j in self.cache.hidden_layers:
                hidden_list[j] = tensors.pop(f"{cache_mod.HIDDEN_PREFIX}{j}", None)  # [batch, seq, hidden]
            hidden = tuple(hidden_list)
        return Signals(targets=tensors or None, hidden=hidden, attention_mask=batch.get("attention_mask"))


class CachedTargets:
    """The training collate, plus each cached teacher's rows for the batch (`CachedTeacher.rows`):
    a vectorised gather from the memory-mapped cache by the rows' feature ids, done where the
    collate runs (DataLoader workers), so the batch (pinned on a GPU) carries its targets to the
    device with everything else. A class, not a closure, so workers can pickle it."""

    def __init__(self, collate: Callable[[list[dict]], dict], teachers: Sequence[CachedTeacher]):
        self.collate, self.teachers = collate, list(teachers)
        for slot, teacher in enumerate(self.teachers):
            teacher.prefix = f"cached/{slot}/"

    def __call__(self, features: list[dict]) -> dict:
        batch = self.collate(features)
        ids = np.fromiter((f["feature_id"] for f in features), dtype=np.int64, count=len(features))
        width = batch["attention_mask"].size(1) if "attention_mask" in batch else 0
        for teacher in self.teachers:
            batch.update(teacher.rows(ids, width))
        return batch


def cached_parts(teacher: Any) -> list[CachedTeacher]:
    """The cached teachers inside a stage's teacher (itself, a merged one's, an ensemble's)."""
    if isinstance(teacher, CachedTeacher):
        return [teacher]
    if isinstance(teacher, MergedTeacher):
        return [teacher.cached]
    if isinstance(teacher, EnsembleTeacher):
        return [c for t in teacher.teachers for c in cached_parts(t)]
    return []


def with_cached_targets(teacher: Any, collate: Callable[[list[dict]], dict]) -> Callable[[list[dict]], dict]:
    """The training collate for `teacher`: `CachedTargets` when it reads a cache, else `collate`."""
    parts = cached_parts(teacher)
    return CachedTargets(collate, parts) if parts else collate


class MergedTeacher:
    """Cached targets (and hidden states) plus the online pass's attention projections."""

    def __init__(self, cached: CachedTeacher, online: OnlineTeacher):
        self.cached, self.online = cached, online

    def select(self, reads: Reads) -> None:
        self.cached.select(reads)
        self.online.select(Reads(qkv=reads.qkv))  # the online pass serves Q/K/V alone

    def __call__(self, batch: dict) -> Signals:
        signals = self.cached(batch)
        signals.qkv = self.online(batch).qkv
        return signals


def place_teacher(teacher: nn.Module, accelerator: Accelerator) -> nn.Module:
    """Move the frozen teacher to this process's device, in the mixed-precision dtype when the run
    trains in bf16/fp16: it only infers, so its weights need not stay fp32 (half the memory and
    bandwidth; DeepSpeed, which trains without autocast, needs it anyway)."""
    teacher.to(accelerator.device)
    precision = effective_precision(accelerator)  # fp16 does not apply on a CPU: fp32 there
    if precision in ("bf16", "fp16"):
        teacher.to(torch.bfloat16 if precision == "bf16" else torch.float16)
    return teacher


def use_cache(mode: str, hidden: bool, cache_hidden_states: bool) -> bool:
    """Resolve `distill.teacher_outputs`: auto caches unless hidden states are needed and their
    caching was not asked for (they are large); online never caches."""
    if mode == "online":
        return False
    if mode == "cached" and hidden and not cache_hidden_states:
        raise CacheError(
            "distill.teacher_outputs=cached with distill.hidden_weight > 0 needs the teacher's "
            "hidden states on disk: set distill.cache_hidden_states=true (the size is printed "
            "before writing), or use distill.teacher_outputs=online"
        )
    return not hidden or cache_hidden_states


def make_teacher(
    model: nn.Module,
    task: Task,
    accelerator: Accelerator,
    train_features: Dataset,
    *,
    mode: str,
    cache_root: Path,
    cache_settings: dict[str, Any],
    hidden_layers: Sequence[int] = (),
    qkv_layers: Sequence[int] = (),
    cache_hidden_states: bool = False,
    batch_size: int = 128,
    hidden_dtype: str = "float32",
) -> tuple[Teacher, bool]:
    """(the stage's teacher, whether it still needs the model in memory).

    The caller says what to keep: `hidden_layers` (hidden-state indices, 0 = embeddings) and
    `qkv_layers` (attention projections, computed online: they are as large as hidden states
    times three). Targets and hidden states are cached unless `mode` or their size says online;
    cached hidden states are stored as `hidden_dtype` (float32, float16 or bfloat16).
    """
    hidden = bool(hidden_layers)
    num_hidden = model.config.num_hidden_layers + 1
    if not use_cache(mode, hidden, cache_hidden_states):
        return OnlineTeacher(model, task, accelerator, hidden_layers, qkv_layers), True
    stored = cache_mod.get_or_build(
        cache_root, task, model, train_features, accelerator, cache_settings, sorted(hidden_layers), batch_size, hidden_dtype
    )
    cached = CachedTeacher(stored, accelerator.device, num_hidden if hidden else 0)
    if not qkv_layers:
        return cached, False
    online = OnlineTeacher(model, task, accelerator, qkv_layers=qkv_layers, targets=False)
    return MergedTeacher(cached, online), True


# ---------------------------------------------------------------------------------------------
# Several teachers
# ---------------------------------------------------------------------------------------------

# How each target of a task's `kd_targets` layout combines: its class axis is always the last.
#   logits [N, C]                        one row per example
#   word_logits [N, W, C] + word_mask    one row per word; a word counts where every teacher has it
#   start/end_logits [N, L] + kd_mask    one row per window over its positions: the softmax runs
#                                        over the task's class mask (context + CLS) and, across
#                                        tokenizers, the positions every teacher covers
ROW_MASKS = {"word_logits": "word_mask"}
POSITION_TARGETS = ("start_logits", "end_logits")
MASKS = ("word_mask", "kd_mask")


def combine_targets(
    task: Task,
    targets: Sequence[dict],
    batch: dict,
    rule: str,
    temperature: float,
    weights: Optional[Sequence[float]] = None,
) -> dict[str, torch.Tensor]:
    """The teachers' `kd_targets` dicts -> one dict of the same layout, each logit row combined
    over its class axis by `ensemble.combine` (rows and classes outside the masks stay out of
    every softmax and entropy). The loss terms read it exactly as one teacher's."""
    if len(targets) == 1:
        return dict(targets[0])
    keys = list(targets[0])
    for i, t in enumerate(targets[1:], start=1):
        if set(t) != set(keys):
            raise ValueError(f"teacher {i} gives targets {sorted(t)} but teacher 0 gives {sorted(keys)}")
    out: dict[str, torch.Tensor] = {}
    for key in MASKS:
        if key in targets[0]:
            width = max(t[key].size(1) for t in targets)
            masks = [fit_width(t[key].bool(), width, False) for t in targets]  # [N, W] each
            out[key] = torch.stack(masks).all(0)  # a position counts where every teacher has it
    for key in keys:
        if key in MASKS:
            continue
        values = [t[key] for t in targets]
        if key in ROW_MASKS:  # [N, W, C]: one row per word
            width = out[ROW_MASKS[key]].size(1)
            values = [fit_width(v.float(), width, 0.0) for v in values]
            n, w, c = values[0].shape
            mixed = combine([v.reshape(n * w, c) for v in values], rule, temperature, weights)
            mixed = mixed.reshape(n, w, c)  # [N, W, C]
            out[key] = mixed.masked_fill(~out[ROW_MASKS[key]].unsqueeze(-1), 0.0)
        elif key in POSITION_TARGETS:  # [N, L]: one row per window, the positions are the classes
            mask = task.kd_class_mask(batch)  # [N, L]: context + CLS
            width = mask.size(1)
            if "kd_mask" in out:  # across tokenizers: positions with a target from every teacher
                mask = mask & fit_width(out["kd_mask"].to(mask.device), width, False)
            values = [fit_width(v.float().to(mask.device), width, MASKED_LOGIT) for v in values]
            out[key] = combine(values, rule, temperature, weights, class_mask=mask)  # [N, L]
        elif values[0].dim() == 2:  # [N, C]: one row per example
            out[key] = combine(values, rule, temperature, weights)
        else:
            raise ValueError(
                f"cannot combine the teachers' '{key}' targets of shape {list(values[0].shape)} "
                f"({task.family}): the known layouts are [rows, classes], word_logits and start/end logits"
            )
    return out


class EnsembleTeacher:
    """Several teachers behind the one interface: every teacher runs (online or from its cache),
    their logit targets combine by `rule` (see `combine_targets`), and the hidden states and
    attention projections come from teacher `main` alone (the intermediate terms follow one)."""

    def __init__(
        self,
        teachers: Sequence[Teacher],
        task: Task,
        rule: str = "mean",
        temperature: float = 1.0,
        weights: Optional[Sequence[float]] = None,
        main: int = 0,
    ):
        if not 0 <= main < len(teachers):
            raise ValueError(f"main teacher {main} is out of range for {len(teachers)} teachers")
        self.teachers, self.task, self.main = list(teachers), task, main
        self.rule, self.temperature = rule, temperature
        self.weights = list(weights) if rule == "weighted" else None
        self.targets = True

    def select(self, reads: Reads) -> None:
        """The main teacher serves what the terms read; the others only their logit targets."""
        self.targets = reads.outputs
        for i, teacher in enumerate(self.teachers):
            select(teacher, reads if i == self.main else Reads(outputs=reads.outputs))

    def __call__(self, batch: dict) -> Signals:
        if not self.targets:  # no soft-label term is active: the main teacher's layers alone
            return self.teachers[self.main](batch)
        signals = [teacher(batch) for teacher in self.teachers]
        main = signals[self.main]
        targets = combine_targets(
            self.task, [s.targets for s in signals], batch, self.rule, self.temperature, self.weights
        )
        return Signals(
            outputs=main.outputs, targets=targets, hidden=main.hidden, qkv=main.qkv,
            attention_mask=main.attention_mask,
        )
