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


def num_layers(model: nn.Module) -> int:
    """Transformer-block applications per forward (ALBERT: each reuse of a shared block counts)."""
    return _layout(model).num_layers


def wanted_layers(terms: Iterable[Any], side: str) -> dict[str, set[int]]:
    """Union of what `terms` read from one side ("student" or "teacher"): {"qkv": {...}, "hidden": {...}}."""
    if side not in ("student", "teacher"):
        raise ValueError(f"side must be 'student' or 'teacher', got {side!r}")
    wants: dict[str, set[int]] = {"qkv": set(), "hidden": set()}
    for term in terms:
        reader = getattr(term, f"{side}_layers", None)
        for kind, layers in (reader() if reader else {}).items():
            if kind not in wants:
                raise ValueError(f"term '{getattr(term, 'name', term)}' asks for unknown signal '{kind}'")
            wants[kind] |= set(layers)
    return wants


def deepest_layer(wants: dict[str, set[int]]) -> int:
    """The deepest layer any capture in `wants` reads (0 = embeddings only): where a teacher that
    only feeds intermediate terms may stop."""
    return max((i for layers in wants.values() for i in layers), default=0)


class Capture:
    """Hooks that keep the Q/K/V projections of layers `qkv` and the hidden states of layers
    `hidden` during one forward of `model`, used as a context manager around that forward.

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
        self.qkv_layers, self.hidden_layers = set(qkv), set(hidden)
        n, kind = self.layout.num_layers, type(_unwrap(model)).__name__
        bad = sorted(i for i in self.qkv_layers if not 1 <= i <= n)
        if bad:
            raise ValueError(f"Q/K/V capture of layers {bad}: {kind} has layers 1..{n}")
        bad = sorted(i for i in self.hidden_layers if not 0 <= i <= n)
        if bad:
            raise ValueError(f"hidden-state capture of layers {bad}: {kind} has 0 (embeddings)..{n}")
        if stop_after is not None:
            if not 1 <= stop_after <= n:
                raise ValueError(f"stop_after={stop_after}: {kind} has layers 1..{n}")
            deeper = sorted(i for i in self.qkv_layers | self.hidden_layers if i > stop_after)
            if deeper:
                raise ValueError(f"stop_after={stop_after} but layers {deeper} are to be captured")
            if isinstance(model, nn.parallel.DistributedDataParallel):
                raise ValueError("stop_after cannot end the forward of a DDP-wrapped model")
        self.stop_after = stop_after
        self.qkv: dict[int, QKV] = {}
        self.hidden: dict[int, torch.Tensor] = {}
        self.stopped = False
        self._handles: list[Any] = []
        self._reset()

    # ---- state of one forward ----
    def _reset(self) -> None:
        self._layer = 0  # block applications seen so far in this forward
        self._done = False  # set when the forward returned: later hook calls (recompute) are ignored
        self._parts: dict[int, dict[str, torch.Tensor]] = {}
        self.qkv, self.hidden, self.stopped = {}, {}, False
        self._no_graph: list[str] = []

    def _on_model_start(self, module, args, kwargs) -> None:
        self._reset()

    def _on_model_end(self, module, args, kwargs, output) -> None:
        self._done = True

    def _on_block_start(self, module, args, kwargs) -> None:
        if self._done:
            return
        self._layer += 1
        if self._layer == 1 and 0 in self.hidden_layers:
            x = args[0] if args else kwargs.get("hidden_states")
            self.hidden[0] = x  # [batch, seq, hidden]

    def _on_block_end(self, module, args, kwargs, output) -> None:
        if self._done:
            return
        if self._layer in self.hidden_layers:
            self.hidden[self._layer] = output[0] if isinstance(output, (tuple, list)) else output
        if self._layer == self.stop_after:
            raise _StopForward()

    def _projection_hook(self, slot: str):
        def hook(module: nn.Linear, args, output: torch.Tensor) -> None:
            if self._done or self._layer not in self.qkv_layers:
                return
            if self._grad and module.weight.requires_grad and not output.requires_grad:
                self._no_graph.append(f"layer {self._layer} {slot}")
            parts = self._parts.setdefault(self._layer, {})
            parts[slot] = output  # [batch, seq, width]
            if len(parts) == 3:
                self.qkv[self._layer] = QKV(parts["q"], parts["k"], parts["v"], self.layout.num_heads)

        return hook

    # ---- context ----
    def __enter__(self) -> "Capture":
        self._reset()
        self._grad = torch.is_grad_enabled()
        top = _unwrap(self.model)
        add = self._handles.append
        add(top.register_forward_pre_hook(self._on_model_start, with_kwargs=True))
        add(top.register_forward_hook(self._on_model_end, with_kwargs=True))
        if self.qkv_layers or self.hidden_layers or self.stop_after is not None:
            for block in self.layout.blocks:
                add(block.register_forward_pre_hook(self._on_block_start, with_kwargs=True))
                add(block.register_forward_hook(self._on_block_end, with_kwargs=True))
        if self.qkv_layers:
            for q, k, v in self.layout.projections:
                for slot, proj in (("q", q), ("k", k), ("v", v)):
                    add(proj.register_forward_hook(self._projection_hook(slot)))
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
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
        if self._no_graph:
            raise RuntimeError(
                f"{kind}: captured {', '.join(self._no_graph[:3])} carry no gradient although the "
                "layer trains (reentrant gradient checkpointing runs layers under no_grad); turn it "
                "off or use use_reentrant=False"
            )
        return stopped

    def hidden_states(self) -> tuple[Optional[torch.Tensor], ...]:
        """Captured hidden states as a tuple indexed like `output_hidden_states` (index 0 =
        embeddings, i = layer i), None at the layers nobody asked for."""
        size = max(self.hidden, default=-1) + 1
        return tuple(self.hidden.get(i) for i in range(size))


# The name the stage setup imports: `QKVCapture(model, layers, stop_after=L)`.
QKVCapture = Capture


def forward_capturing(
    model: nn.Module,
    inputs: dict,
    qkv: Iterable[int] = (),
    hidden: Iterable[int] = (),
    stop_after: Optional[int] = None,
    **kwargs: Any,
) -> tuple[Any, Capture]:
    """`model(**inputs, **kwargs)` under a `Capture`: (outputs, capture). outputs is None when
    the forward stopped after `stop_after` (a `with` body would leave its result unassigned)."""
    outputs = None
    with Capture(model, qkv, hidden, stop_after) as cap:
        outputs = model(**inputs, **kwargs)
    return outputs, cap
