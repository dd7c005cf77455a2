"""Capture what intermediate-layer loss terms read: each layer's query/key/value projections and
hidden states, with forward hooks on the model's own modules.

Never `output_attentions`: current transformers serves attention weights only through the slow
eager attention, so the terms rebuild scores from Q and K (captured at the projections) and both
models keep SDPA / flash attention. Only the layers asked for are kept; nothing else is stored.

    with Capture(student, qkv={4}, hidden={0, 2, 4}) as cap:
        out = student(**inputs)                     # normal forward, logits and loss as usual
    cap.qkv[4].q                                    # [batch, seq, width]
    cap.hidden_states()                             # index i = layer i (None where not asked)

    with torch.no_grad(), Capture(teacher, qkv={9}, stop_after=9) as cap:
        teacher(**inputs)                           # ends after layer 9: no later layer, no head
    cap.stopped                                     # True; the forward returned nothing

    cap = Capture(student, qkv={4}).attach()        # a stage: hooks registered once ...
    with cap:                                       # ... and armed around each training forward
        out = student(**inputs)

"Layer i" is the i-th application of a transformer block in forward order (1-based); layer 0 is
the input of layer 1 — the embedding output (for ALBERT: after its embedding-to-hidden
projection, so hidden-size wide). ALBERT / ALBETO base-N run one shared block N times; each
application is its own layer here, exactly as in `output_hidden_states`.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch
from torch import nn

# Attribute names of the Q, K, V projections inside a self-attention module:
# BERT, RoBERTa, ELECTRA, ALBERT use query/key/value; DistilBERT uses q_lin/k_lin/v_lin.
PROJECTION_NAMES = (("query", "key", "value"), ("q_lin", "k_lin", "v_lin"))


@dataclass(frozen=True)
class QKV:
    """One layer's self-attention projections, heads not yet split (head h is columns
    h*d_head .. (h+1)*d_head of each tensor, as the model splits them)."""

    q: torch.Tensor  # [batch, seq, width]
    k: torch.Tensor  # [batch, seq, width]
    v: torch.Tensor  # [batch, seq, width]
    num_heads: int


class _StopForward(BaseException):
    """Raised by the hook after the `stop_after` layer and caught by `Capture.__exit__`.

    A BaseException so that no `except Exception` in model or library code can swallow it; the
    `finally` blocks on the way out (transformers' own output recorder) still run."""


@dataclass
class _Layout:
    blocks: list[nn.Module]  # distinct transformer blocks (ALBERT: one, applied N times)
    projections: list[tuple[nn.Linear, nn.Linear, nn.Linear]]  # q, k, v of each block
    num_layers: int  # block applications per forward
    num_heads: int


def _unwrap(model: nn.Module) -> nn.Module:
    """The model under DDP / accelerate wrappers (they keep it as `.module`)."""
    while not hasattr(model, "config") and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


_LAYOUTS: "weakref.WeakKeyDictionary[nn.Module, tuple[int, _Layout]]" = weakref.WeakKeyDictionary()


def _layout(model: nn.Module) -> _Layout:
    """The model's layout, found once per model (walking every module costs ~1 ms: too much to
    pay twice per training step)."""
    model = _unwrap(model)
    key = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    cached = _LAYOUTS.get(model)
    if cached is None or cached[0] != key:
        cached = _LAYOUTS[model] = (key, _find_layout(model))
    return cached[1]


def _find_layout(model: nn.Module) -> _Layout:
    """Find the self-attention projections and the transformer block that holds each of them."""
    named = dict(model.named_modules())
    attentions: list[tuple[str, nn.Module, tuple[nn.Linear, nn.Linear, nn.Linear]]] = []
    for name, module in named.items():
        for names in PROJECTION_NAMES:
            parts = [getattr(module, n, None) for n in names]
            if all(isinstance(p, nn.Linear) for p in parts):
                attentions.append((name, module, tuple(parts)))
    if not attentions:
        raise ValueError(
            f"{type(model).__name__}: found no self-attention with query/key/value (BERT, RoBERTa, "
            "ALBERT) or q_lin/k_lin/v_lin (DistilBERT) projections; the attention and relation "
            "terms support those encoder families"
        )
    blocks: list[nn.Module] = []
    projections = []
    for name, module, parts in attentions:
        # the block is the nearest ancestor that is an element of a ModuleList (encoder.layer.3,
        # albert_layer_groups.0.albert_layers.0, transformer.layer.3)
        path = name.split(".")
        block = None
        for cut in range(len(path), 0, -1):
            parent = named.get(".".join(path[: cut - 1]))
            if isinstance(parent, nn.ModuleList):
                block = named[".".join(path[:cut])]
                break
        if block is None:
            raise ValueError(f"{type(model).__name__}: attention '{name}' sits in no layer list")
        if any(b is block for b in blocks):
            raise ValueError(
                f"{type(model).__name__}: layer block holding '{name}' has more than one attention "
                "(cross-attention?); only encoder self-attention is supported"
            )
        blocks.append(block)
        projections.append(parts)
    config = getattr(model, "config", None)
    if config is None or getattr(config, "num_hidden_layers", None) is None:
        raise ValueError(f"{type(model).__name__} has no config.num_hidden_layers")
    # ALBERT: num_hidden_layers group applications, each running inner_group_num blocks
    num_layers = int(config.num_hidden_layers) * int(getattr(config, "inner_group_num", 1) or 1)
    attention = attentions[0][1]
    heads = getattr(attention, "num_attention_heads", None) or getattr(attention, "n_heads", None)
    heads = int(heads or config.num_attention_heads)
    return _Layout(blocks, projections, num_layers, heads)


class Capture:
    """Hooks that keep the Q/K/V projections of layers `qkv` and the hidden states of layers
    `hidden` during a forward of `model`, used as a context manager around that forward.

    Two ways to use it. `with Capture(model, qkv={4}) as cap: model(...)` registers the hooks on
    entry and removes them on exit. A stage instead registers them once (`attach()`), switches
    what they keep with `select()` (a phase whose terms read nothing simply never enters the
    context), and enters the context around each forward: outside it the hooks return at once
    (evaluation runs the same model), and their set never changes between steps, so a compiled
    student is not recompiled for them. `close()` removes them.

    stop_after=L ends the forward right after layer L (for a teacher whose logits come from the
    cache, or are not needed): the hook raises a private exception that `__exit__` swallows, so
    the statement that called the model never completes (its result stays unassigned) and
    `stopped` is True. Never use it on a model under DDP/FSDP (its reducer expects the forward to
    finish) — the teacher is never wrapped. A second forward inside the same context replaces
    the captures. Exit the context before `backward()`.

    With gradients on, the captured student tensors carry the graph, so terms built on them
    train the student. A capture that comes back without a graph (e.g. reentrant gradient
    checkpointing runs layers under no_grad) raises instead of training nothing.
    """

    def __init__(
        self,
        model: nn.Module,
        qkv: Iterable[int] = (),
        hidden: Iterable[int] = (),
        stop_after: Optional[int] = None,
    ):
        self.model = model
        self.layout = _layout(model)
        self._handles: list[Any] = []
        self._temporary = False  # attached by __enter__, removed by __exit__
        self._armed = False  # inside the context: the hooks keep what is selected
        self.select(qkv, hidden, stop_after)
        # what the attached hooks can serve: select() may narrow it, never widen it
        self._built = (frozenset(self.qkv_layers), frozenset(self.hidden_layers), stop_after is not None)
        self._reset()

    def select(self, qkv: Iterable[int] = (), hidden: Iterable[int] = (), stop_after: Optional[int] = None) -> None:
        """What the hooks keep from now on (checked against the model's layers)."""
        qkv, hidden = frozenset(qkv), frozenset(hidden)
        n, kind = self.layout.num_layers, type(_unwrap(self.model)).__name__
        bad = sorted(i for i in qkv if not 1 <= i <= n)
        if bad:
            raise ValueError(f"Q/K/V capture of layers {bad}: {kind} has layers 1..{n}")
        bad = sorted(i for i in hidden if not 0 <= i <= n)
        if bad:
            raise ValueError(f"hidden-state capture of layers {bad}: {kind} has 0 (embeddings)..{n}")
        if stop_after is not None:
            if not 1 <= stop_after <= n:
                raise ValueError(f"stop_after={stop_after}: {kind} has layers 1..{n}")
            deeper = sorted(i for i in qkv | hidden if i > stop_after)
            if deeper:
                raise ValueError(f"stop_after={stop_after} but layers {deeper} are to be captured")
            if isinstance(self.model, nn.parallel.DistributedDataParallel):
                raise ValueError("stop_after cannot end the forward of a DDP-wrapped model")
        if self._handles and not self._temporary:
            built_qkv, built_hidden, built_blocks = self._built
            if not (qkv <= built_qkv and hidden <= built_hidden and (stop_after is None or built_blocks or built_qkv or built_hidden)):
                raise ValueError(
                    f"select(qkv={sorted(qkv)}, hidden={sorted(hidden)}) asks for more than the attached "
                    f"hooks serve (qkv {sorted(built_qkv)}, hidden {sorted(built_hidden)})"
                )
        self.qkv_layers, self.hidden_layers, self.stop_after = qkv, hidden, stop_after

    # ---- hooks: registered once, switched by `_armed` and the selection ----
    def attach(self) -> "Capture":
        """Register the hooks (once; a second call does nothing)."""
        if self._handles:
            return self
        qkv, hidden, stop = self._built
        top = _unwrap(self.model)
        add = self._handles.append
        add(top.register_forward_pre_hook(self._on_model_start, with_kwargs=True))
        add(top.register_forward_hook(self._on_model_end, with_kwargs=True))
        if qkv or hidden or stop:
            for block in self.layout.blocks:
                add(block.register_forward_pre_hook(self._on_block_start, with_kwargs=True))
                add(block.register_forward_hook(self._on_block_end, with_kwargs=True))
        if qkv:
            for q, k, v in self.layout.projections:
                for slot, proj in (("q", q), ("k", k), ("v", v)):
                    add(proj.register_forward_hook(self._projection_hook(slot)))
        return self

    def close(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # ---- state of one forward ----
    def _reset(self) -> None:
        self._layer = 0  # block applications seen so far in this forward
        self._done = False  # set when the forward returned: later hook calls (recompute) are ignored
        self._parts: dict[int, dict[str, torch.Tensor]] = {}
        self.qkv: dict[int, QKV] = {}
        self.hidden: dict[int, torch.Tensor] = {}
        self.stopped = False

    def _on_model_start(self, module, args, kwargs) -> None:
        if self._armed:
            self._reset()

    def _on_model_end(self, module, args, kwargs, output) -> None:
        if self._armed:
            self._done = True

    def _on_block_start(self, module, args, kwargs) -> None:
        if not self._armed or self._done:
            return
        self._layer += 1
        if self._layer == 1 and 0 in self.hidden_layers:
            x = args[0] if args else kwargs.get("hidden_states")
            self.hidden[0] = x  # [batch, seq, hidden]

    def _on_block_end(self, module, args, kwargs, output) -> None:
        if not self._armed or self._done:
            return
        if self._layer in self.hidden_layers:
            self.hidden[self._layer] = output[0] if isinstance(output, (tuple, list)) else output
        if self._layer == self.stop_after:
            raise _StopForward()

    def _projection_hook(self, slot: str):
        def hook(module: nn.Linear, args, output: torch.Tensor) -> None:
            if not self._armed or self._done or self._layer not in self.qkv_layers:
                return
            parts = self._parts.setdefault(self._layer, {})
            parts[slot] = output  # [batch, seq, width]
            if len(parts) == 3:
                self.qkv[self._layer] = QKV(parts["q"], parts["k"], parts["v"], self.layout.num_heads)

        return hook

    # ---- context: one forward ----
    def __enter__(self) -> "Capture":
        if not self._handles:
            self.attach()
            self._temporary = True
        self._reset()
        self._grad = torch.is_grad_enabled()
        self._armed = True
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._armed = False
        if self._temporary:
            self.close()
            self._temporary = False
        stopped = exc_type is _StopForward
        if exc_type is not None and not stopped:
            return False  # a real error: let it through
        self._done, self.stopped = True, stopped
        kind = type(_unwrap(self.model)).__name__
        if self._layer and not stopped and self._layer != self.layout.num_layers:
            raise RuntimeError(
                f"{kind} ran {self._layer} transformer blocks but its config says "
                f"{self.layout.num_layers}; layer numbers would be wrong, so nothing is captured"
            )
        missing = sorted((self.qkv_layers - set(self.qkv)) | (self.hidden_layers - set(self.hidden)))
        if self._layer and missing:
            raise RuntimeError(f"{kind}: layers {missing} were asked for but never ran")
        trains = self._grad and any(p.weight.requires_grad for qkv in self.layout.projections for p in qkv)
        no_graph = [f"layer {i} {s}" for i, x in sorted(self.qkv.items()) for s in "qkv" if trains and not getattr(x, s).requires_grad]
        if no_graph:
            raise RuntimeError(
                f"{kind}: captured {', '.join(no_graph[:3])} carry no gradient although the "
                "layer trains (reentrant gradient checkpointing runs layers under no_grad); turn it "
                "off or use use_reentrant=False"
            )
        return stopped

    def hidden_states(self) -> tuple[Optional[torch.Tensor], ...]:
        """Captured hidden states as a tuple indexed like `output_hidden_states` (index 0 =
        embeddings, i = layer i), None at the layers nobody asked for."""
        size = max(self.hidden, default=-1) + 1
        return tuple(self.hidden.get(i) for i in range(size))
