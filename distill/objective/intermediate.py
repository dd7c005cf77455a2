"""Intermediate-layer loss terms: TinyBERT attention scores and MiniLMv2 self-attention relations.

Both read the Q/K/V projections that `distill.objective.capture.Capture` keeps (never attention
weights, so SDPA stays on) and compare token positions, so teacher and student must share a
tokenizer (the stage refuses other pairs before any step: `loop.setup.bind_tokenizers`). Each
term says which layers it reads (`student_layers` / `teacher_layers`) so only those are
captured, and the teacher can stop after the deepest one.

    attention  (TinyBERT)  MSE of per-head scores Q Kᵀ/√d_head of mapped layers
    relations  (MiniLMv2)  KL of softmax(X Xᵀ/√d_r), X ∈ {Q, K, V}, split into relation heads
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from distill.objective.losses import Term, checked_layer_map

# large finite negative for masked keys: exp() gives exactly 0 and no inf - inf NaNs
_MASKED = -1e9


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[batch, seq, width] -> [batch, heads, seq, width / heads], head h = columns h*d .. (h+1)*d
    (the split the models use, so head h here is the model's head h)."""
    batch, seq, width = x.shape
    if width % heads:
        raise ValueError(f"width {width} does not split into {heads} heads")
    return x.view(batch, seq, heads, width // heads).transpose(1, 2)


def attention_scores(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """Pre-softmax attention scores Q Kᵀ / √d_head per head, as the model computes them before
    adding its mask: [batch, seq, width] x2 -> [batch, heads, seq, seq]."""
    qh, kh = split_heads(q.float(), heads), split_heads(k.float(), heads)  # [batch, heads, seq, d]
    return qh @ kh.transpose(-1, -2) / math.sqrt(qh.shape[-1])


def _mask(signals: Any, batch: dict, like: torch.Tensor) -> torch.Tensor:
    """The real-token mask [batch, seq] (bool) of a forward: the signals' own, else the batch's."""
    mask = getattr(signals, "attention_mask", None)
    if mask is None:
        mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    if mask is None:
        return torch.ones(like.shape[:2], dtype=torch.bool, device=like.device)
    return mask.to(like.device).bool()


def _captured(signals: Any, layer: int, side: str, term: str):
    qkv = getattr(signals, "qkv", None) or {}
    if layer not in qkv:
        raise RuntimeError(
            f"{term}: the {side}'s layer {layer} Q/K/V were not captured; capture what "
            f"{side}_layers() returns (distill.objective.capture.Capture)"
        )
    return qkv[layer]


def _same_positions(s: torch.Tensor, t: torch.Tensor, term: str) -> None:
    if s.shape[:2] != t.shape[:2]:
        raise ValueError(
            f"{term}: student positions {tuple(s.shape[:2])} and teacher positions {tuple(t.shape[:2])} "
            "differ ([batch, seq]); the term compares token positions, so both must see the same ids"
        )


class AttentionTerm(Term):
    """TinyBERT attention distillation: MSE between student and teacher attention *scores*.

    For each student layer i and its teacher layer j = map(i), per head h:
        A = Q Kᵀ / √d_head                                   [batch, heads, seq, seq]
        L_i = Σ_{b,h,q,k} m_bq m_bk (A^s_bhqk − A^t_bhqk)² / (H · Σ_{b,q,k} m_bq m_bk)
        L = mean_i L_i
    where m is the real-token mask: padded queries and padded keys never count.

    Scores, not probabilities: this is TinyBERT's choice (its ablation converged faster and
    scored better), and probabilities — about 1/seq each and tied by the row sum — give MSE
    gradients that vanish as sequences grow. The scores are scaled by each model's own √d_head,
    so a 312-wide student and a 768-wide teacher with 12 heads each compare on one scale.

    Heads are compared one to one, so the head counts must match; otherwise the term refuses
    (averaging 64 teacher heads into 12 would blur what is matched) and points at `relations`,
    whose relation heads are independent of either model's heads. The layer map is the uniform
    one, or `distill.layer_map` (one teacher layer per student layer, 1-based).
    """

    name = "attention"
    intermediate = True  # trains in the first phase of a two-phase schedule

    def __init__(
        self,
        student_layers_total: int,
        teacher_layers_total: int,
        student_heads: int,
        teacher_heads: int,
        layer_map: Sequence[int] = (),
    ):
        super().__init__()
        if student_heads != teacher_heads:
            raise ValueError(
                f"distill.attention_weight: the attention term matches attention maps head by head, "
                f"but the student has {student_heads} heads and the teacher {teacher_heads}; use "
                "distill.relation_weight (MiniLMv2 relations work with any head counts) instead"
            )
        self.heads = student_heads
        mapping = checked_layer_map(student_layers_total, teacher_layers_total, layer_map, "attention")
        self.pairs = [(i + 1, j) for i, j in enumerate(mapping)]

    def student_layers(self) -> dict[str, set[int]]:
        return {"qkv": {i for i, _ in self.pairs}}

    def teacher_layers(self) -> dict[str, set[int]]:
        return {"qkv": {j for _, j in self.pairs}}

    def forward(self, student: Any, teacher: Any, batch: dict) -> torch.Tensor:
        losses = []
        for i, j in self.pairs:
            s, t = _captured(student, i, "student", self.name), _captured(teacher, j, "teacher", self.name)
            _same_positions(s.q, t.q, self.name)
            a_s = attention_scores(s.q, s.k, self.heads)  # [batch, heads, seq, seq]
            a_t = attention_scores(t.q.detach().to(s.q.device), t.k.detach().to(s.q.device), self.heads)
            mask = _mask(student, batch, s.q)  # [batch, seq]
            pairs = (mask[:, :, None] & mask[:, None, :])[:, None].float()  # [batch, 1, seq, seq]
            sq = (a_s - a_t) ** 2 * pairs
            losses.append(sq.sum() / (self.heads * pairs.sum()).clamp(min=1.0))
        return torch.stack(losses).mean()


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def default_relation_heads(student_hidden: int, teacher_hidden: int, student_heads: int) -> int:
    """Relation heads when the recipe leaves `distill.relation_heads` at 0.

    Preferred: 64 for a large teacher (hidden ≥ 1024: xxlarge, large), as MiniLMv2 used many
    relation heads for large teachers; otherwise the student's own head count. Both widths must
    divide evenly, so the preference is lowered to the largest count that does: ALBETO tiny
    (312) from ALBETO xxlarge (4096) gets 8, ALBETO base (768) from xxlarge gets 64, a 12-head
    student from BETO gets 12.
    """
    preferred = 64 if teacher_hidden >= 1024 else student_heads
    common = math.gcd(student_hidden, teacher_hidden)
    return max(d for d in _divisors(common) if d <= max(preferred, 1))


def relation_kl(
    xs: torch.Tensor, xt: torch.Tensor, heads: int, mask: torch.Tensor
) -> torch.Tensor:
    """KL(teacher ‖ student) of one self-attention relation, averaged over relation heads and
    real query rows. xs [batch, seq, width_s], xt [batch, seq, width_t], mask [batch, seq] bool.

        R = softmax(X_h X_hᵀ / √d_r) over real keys,  d_r = width / heads
        KL = Σ_{b,h,q real} Σ_k R^t_bhqk (log R^t_bhqk − log R^s_bhqk) / (heads · #real rows)
    """
    keys = mask[:, None, None, :]  # [batch, 1, 1, seq]
    log_r = []
    for x in (xs, xt):
        xh = split_heads(x.float(), heads)  # [batch, heads, seq, d_r]
        logits = xh @ xh.transpose(-1, -2) / math.sqrt(xh.shape[-1])  # [batch, heads, seq, seq]
        log_r.append(F.log_softmax(logits.masked_fill(~keys, _MASKED), dim=-1))
    log_s, log_t = log_r
    kl = torch.where(keys, log_t.exp() * (log_t - log_s), torch.zeros_like(log_t)).sum(-1)  # [batch, heads, seq]
    rows = mask[:, None, :].float()  # [batch, 1, seq]
    return (kl * rows).sum() / (heads * rows.sum()).clamp(min=1.0)


class RelationTerm(Term):
    """MiniLMv2 self-attention relation distillation.

    For X ∈ {Q, K, V} of the student's last layer and the teacher's layer `relation_layer`,
    split X into `relation_heads` heads of width d_r = width / relation_heads (each model its own
    d_r), relation R = softmax(X_h X_hᵀ / √d_r) over real tokens (padded keys masked), and
        L = 1/3 Σ_{X∈{Q,K,V}} KL(R^t_X ‖ R^s_X)   averaged over relation heads and real query rows.
    (MiniLMv2 writes the sum of the three; that is this term with relation_weight × 3.)

    Relation heads are independent of both models' attention heads, so any widths and head counts
    meet (a 312-wide 12-head student from a 4096-wide 64-head teacher), provided `relation_heads`
    divides both widths. relation_heads=0 picks `default_relation_heads`; relation_layer=0 is the
    teacher's last layer (MiniLMv2 found an upper-middle layer better for large teachers).
    """

    name = "relations"
    intermediate = True

    def __init__(
        self,
        student_layers_total: int,
        teacher_layers_total: int,
        student_hidden: int,
        teacher_hidden: int,
        student_heads: int,
        teacher_heads: int,
        relation_heads: int = 0,
        relation_layer: int = 0,
    ):
        super().__init__()
        if relation_heads < 0:
            raise ValueError(f"distill.relation_heads={relation_heads}: use 0 (default rule) or a positive count")
        if relation_heads == 0:
            relation_heads = default_relation_heads(student_hidden, teacher_hidden, student_heads)
        widths = (("student", student_hidden), ("teacher", teacher_hidden))
        uneven = [f"{who} width {w}" for who, w in widths if w % relation_heads]
        if uneven:
            valid = _divisors(math.gcd(student_hidden, teacher_hidden))
            raise ValueError(
                f"distill.relation_heads={relation_heads} does not divide the {' and '.join(uneven)}; "
                f"counts that divide both {student_hidden} and {teacher_hidden}: {valid}"
            )
        if not 0 <= relation_layer <= teacher_layers_total:
            raise ValueError(
                f"distill.relation_layer={relation_layer}: the teacher has layers 1..{teacher_layers_total} "
                "(0 = its last)"
            )
        self.relation_heads = relation_heads
        self.teacher_layer = relation_layer or teacher_layers_total
        self.student_layer = student_layers_total
        self.teacher_heads, self.student_heads = teacher_heads, student_heads  # for the log / report

    def student_layers(self) -> dict[str, set[int]]:
        return {"qkv": {self.student_layer}}

    def teacher_layers(self) -> dict[str, set[int]]:
        return {"qkv": {self.teacher_layer}}

    def forward(self, student: Any, teacher: Any, batch: dict) -> torch.Tensor:
        s = _captured(student, self.student_layer, "student", self.name)
        t = _captured(teacher, self.teacher_layer, "teacher", self.name)
        _same_positions(s.q, t.q, self.name)
        mask = _mask(student, batch, s.q)  # [batch, seq]
        losses = [
            relation_kl(xs, xt.detach().to(xs.device), self.relation_heads, mask)
            for xs, xt in ((s.q, t.q), (s.k, t.k), (s.v, t.v))
        ]
        return torch.stack(losses).mean()

    def extra_repr(self) -> str:
        return (
            f"relation_heads={self.relation_heads}, teacher_layer={self.teacher_layer}, "
            f"student_layer={self.student_layer}"
        )


def layer_count(config: Any) -> int:
    """Transformer-block applications of a model from its config (ALBERT: groups × inner layers),
    the numbering `Capture` uses."""
    return int(config.num_hidden_layers) * int(getattr(config, "inner_group_num", 1) or 1)


def intermediate_terms(d: Any, student_config: Any, teacher_config: Any, weights: dict[str, float]) -> list[nn.Module]:
    """The attention / relation terms the recipe weights (> 0), built from the `distill:` section
    `d` (layer_map, relation_heads, relation_layer) and the two models' configs."""
    s_layers, t_layers = layer_count(student_config), layer_count(teacher_config)
    terms: list[nn.Module] = []
    if weights.get("attention", 0) > 0:
        terms.append(
            AttentionTerm(
                s_layers, t_layers, student_config.num_attention_heads, teacher_config.num_attention_heads,
                layer_map=tuple(getattr(d, "layer_map", ()) or ()),
            )
        )
    if weights.get("relations", 0) > 0:
        terms.append(
            RelationTerm(
                s_layers, t_layers, student_config.hidden_size, teacher_config.hidden_size,
                student_config.num_attention_heads, teacher_config.num_attention_heads,
                relation_heads=int(getattr(d, "relation_heads", 0) or 0),
                relation_layer=int(getattr(d, "relation_layer", 0) or 0),
            )
        )
    return terms
