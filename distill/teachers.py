"""The teacher behind one interface: `teacher(batch) -> Signals` (its logit targets and the layers
the loss terms read), whether it runs online or reads the cache.

    OnlineTeacher   runs the frozen model on each batch (inference mode, mixed precision)
    CachedTeacher   reads the targets (and cached hidden states) by the batch's feature_id
    MergedTeacher   cached targets + an online pass for what the cache does not hold (the
                    intermediate layers of attention/relation terms), stopped after the deepest
                    layer any term reads

`make_teacher` decides which one a stage gets from what the loss terms need (told by the
caller: the hidden layers and attention projections to keep), and builds the cache when needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from datasets import Dataset
from torch import nn

from distill import cache as cache_mod
from distill.errors import CacheError
from distill.losses import Signals
from distill.tasks.base import Task

Teacher = Callable[[dict], Signals]


class OnlineTeacher:
    """Runs the frozen teacher on each batch (inference mode, under the mixed-precision setting).

    The teacher is never passed to `accelerator.prepare`: no DDP/FSDP wrapper, no gradient sync,
    no optimizer state, and it stays out of checkpoints. Each process holds a full copy.
    `hidden_layers` are the hidden-state indices kept (0 = embeddings); `qkv_layers` the layers
    whose attention projections are captured with hooks (distill/capture.py), so SDPA stays on.
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
        if self.qkv_layers:
            from distill.capture import forward_capturing

            self.capture_fn = forward_capturing

    @torch.no_grad()
    def __call__(self, batch: dict) -> Signals:
        inputs = self.task.model_inputs(batch, teacher=True)
        with self.accelerator.autocast():
            if not self.qkv_layers:
                out = self.model(**inputs, output_hidden_states=bool(self.hidden_layers))
                hidden = out.hidden_states if self.hidden_layers else None
                return self._signals(out, batch, inputs, hidden, None)
            # hooks capture only the layers the terms read; without logit targets the forward
            # stops after the deepest of them (the rest of the teacher never runs)
            stop = None if self.targets else max(self.qkv_layers + self.hidden_layers)
            out, captured = self.capture_fn(self.model, inputs, qkv=self.qkv_layers, hidden=self.hidden_layers, stop_after=stop)
        hidden = captured.hidden_states() if self.hidden_layers else None
        return self._signals(out, batch, inputs, hidden, captured.qkv)

    def _signals(self, out: Any, batch: dict, inputs: dict, hidden: Any, qkv: Any) -> Signals:
        return Signals(
            outputs=out,
            targets=self.task.kd_targets(out, batch, teacher=True) if self.targets else None,
            hidden=hidden,
            qkv=qkv,
            attention_mask=inputs.get("attention_mask"),
        )


class CachedTeacher:
    """Stands in for the online teacher, reading the cache by the batch's `feature_id`."""

    def __init__(self, cache: cache_mod.TeacherCache, device: torch.device, num_hidden: int = 0):
        self.cache, self.device = cache, torch.device(device)
        self.num_hidden = num_hidden  # length of the hidden-state tuple the loss indexes

    def __call__(self, batch: dict) -> Signals:
        ids = batch["feature_id"].detach().cpu().numpy()
        widths = {}
        if self.cache.hidden_layers and "attention_mask" in batch:
            width = batch["attention_mask"].size(1)
            widths = {f"{cache_mod.HIDDEN_PREFIX}{j}": width for j in self.cache.hidden_layers}
        arrays = self.cache.rows(ids, widths)
        tensors = {}
        for name, array in arrays.items():
            tensor = torch.from_numpy(array).to(self.device, non_blocking=True)
            tensors[name] = tensor.float() if tensor.dtype == torch.float16 else tensor
        hidden = None
        if self.cache.hidden_layers:
            # a tuple indexed like the model's hidden_states; unmapped layers are never read
            size = max(self.num_hidden, max(self.cache.hidden_layers) + 1)
            hidden_list: list[Optional[torch.Tensor]] = [None] * size
            for j in self.cache.hidden_layers:
                hidden_list[j] = tensors.pop(f"{cache_mod.HIDDEN_PREFIX}{j}")  # [batch, seq, hidden]
            hidden = tuple(hidden_list)
        return Signals(targets=tensors, hidden=hidden, attention_mask=batch.get("attention_mask"))


class MergedTeacher:
    """Cached targets (and hidden states) plus the online pass's attention projections."""

    def __init__(self, cached: CachedTeacher, online: OnlineTeacher):
        self.cached, self.online = cached, online

    def __call__(self, batch: dict) -> Signals:
        signals = self.cached(batch)
        signals.qkv = self.online(batch).qkv
        return signals


def place_teacher(teacher: nn.Module, accelerator: Accelerator) -> nn.Module:
    """Move the frozen teacher to this process's device. DeepSpeed trains without autocast, so
    there the teacher is cast to the mixed-precision dtype instead (half the memory)."""
    teacher.to(accelerator.device)
    if accelerator.distributed_type == DistributedType.DEEPSPEED and accelerator.mixed_precision in ("bf16", "fp16"):
        teacher.to(torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float16)
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
) -> tuple[Teacher, bool]:
    """(the stage's teacher, whether it still needs the model in memory).

    The caller says what to keep: `hidden_layers` (hidden-state indices, 0 = embeddings) and
    `qkv_layers` (attention projections, computed online: they are as large as hidden states
    times three). Targets and hidden states are cached unless `mode` or their size says online.
    """
    hidden = bool(hidden_layers)
    num_hidden = model.config.num_hidden_layers + 1
    if not use_cache(mode, hidden, cache_hidden_states):
        return OnlineTeacher(model, task, accelerator, hidden_layers, qkv_layers), True
    stored = cache_mod.get_or_build(
        cache_root, task, model, train_features, accelerator, cache_settings, sorted(hidden_layers), batch_size
    )
    cached = CachedTeacher(stored, accelerator.device, num_hidden if hidden else 0)
    if not qkv_layers:
        return cached, False
    online = OnlineTeacher(model, task, accelerator, qkv_layers=qkv_layers, targets=False)
    return MergedTeacher(cached, online), True
