"""Loss terms and the objective that weights them. Each term is a small module with its formula
in the docstring; the recipe weights them; each is logged on its own as train/loss_<name>.

    total = ce_weight * CE(student, gold)
          + kd_weight * KD(student logits, teacher logits)
          + hidden_weight * Hidden(student hidden states, teacher hidden states)
          + attention_weight * Attention(...) + relation_weight * Relations(...)   (intermediate.py)

Every term has one signature, `term(student: Signals, teacher: Signals, batch) -> scalar`, and
says which layers it reads from each model (`student_layers()` / `teacher_layers()`), so the
stage captures only those and the teacher cache stores only those. `Objective` owns the terms,
their weights, the layer map and the projections; `Trainee` wraps the trained model with it, so
accelerate prepares, synchronises and checkpoints both together while only the model is saved.
A new term is one class here (or in its own module) plus one weight in the recipe.

The reference study's published setting is ce_weight=0, kd_weight=1, kd_loss=kl, T=1.
Plain fine-tuning (teacher stage, or a student with no teacher) is ce_weight=1 alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from distill.tasks.base import LogitPair


# terms that compare token positions: the (main) teacher and the student must tokenize alike
POSITION_TERMS = ("hidden", "attention", "relations")

def _masked_mean(values: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean of `values` [N] over rows where mask is True (0 when no row counts)."""
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def soft_label_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    kind: str = "kl",
    temperature: float = 1.0,
    row_mask: Optional[torch.Tensor] = None,
    class_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Soft-label distillation between logits [N, C], averaged over the rows in `row_mask`.

    kl:  T^2 * sum_c p_t,c (log p_t,c - log p_s,c),   p = softmax(z / T)
    ce:  T^2 * sum_c -p_t,c log p_s,c                 (soft-target cross-entropy)
    mse: mean_c (z_s,c - z_t,c)^2                      (raw logits, T unused)
    Classes outside `class_mask` [N, C] are left out of both softmaxes (and of the mse mean).
    """
    s = student.float()  # [N, C]
    t = teacher.float().to(s.device)  # [N, C]
    if class_mask is not None:
        class_mask = class_mask.to(s.device, torch.bool)
    if kind == "mse":
        sq = (s - t) ** 2  # [N, C]
        if class_mask is None:
            per_row = sq.mean(-1)
        else:
            per_row = (sq * class_mask).sum(-1) / class_mask.sum(-1).clamp(min=1)
        return _masked_mean(per_row, row_mask)
    if kind not in ("kl", "ce"):
        raise ValueError(f"unknown kd loss '{kind}' (kl, ce or mse)")
    s, t = s / temperature, t / temperature
    if class_mask is not None:
        # a large finite negative (not -inf) keeps masked rows free of NaNs
        s = s.masked_fill(~class_mask, -1e9)
        t = t.masked_fill(~class_mask, -1e9)
    log_ps = F.log_softmax(s, dim=-1)  # [N, C]
    log_pt = F.log_softmax(t, dim=-1)  # [N, C]
    pt = log_pt.exp()
    terms = pt * (log_pt - log_ps) if kind == "kl" else -pt * log_ps  # [N, C]
    if class_mask is not None:
        terms = torch.where(class_mask, terms, torch.zeros_like(terms))
    return temperature**2 * _masked_mean(terms.sum(-1), row_mask)


class SoftLabelLoss(nn.Module):
    """Soft-label KD averaged over the task's logit pairs (QA: start and end, averaged)."""

    name = "kd"

    def __init__(self, kind: str = "kl", temperature: float = 1.0):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.kind, self.temperature = kind, temperature

    def forward(self, pairs: Sequence[LogitPair]) -> torch.Tensor:
        losses = [
            soft_label_loss(p.student, p.teacher, self.kind, self.temperature, p.row_mask, p.class_mask)
            for p in pairs
        ]
        return torch.stack(losses).mean()


def uniform_layer_map(num_student: int, num_teacher: int) -> list[int]:
    """Teacher layer (1-based) for each student layer 1..num_student, spread evenly and ending on
    the teacher's last layer. Any ratio works: 10 of 12 -> [1, 2, 4, 5, 6, 7, 8, 10, 11, 12]."""
    if num_student < 1 or num_teacher < 1:
        raise ValueError("layer counts must be >= 1")
    return [round(i * num_teacher / num_student) for i in range(1, num_student + 1)]


def checked_layer_map(num_student: int, num_teacher: int, layer_map: Sequence[int] = (), term: str = "") -> list[int]:
    """The teacher layer (1-based) of each student layer: `distill.layer_map` when given (one
    entry per student layer, each in range), else the uniform map. `term` prefixes errors."""
    where = f"{term}: " if term else ""
    mapping = list(layer_map) or uniform_layer_map(num_student, num_teacher)
    if len(mapping) != num_student:
        raise ValueError(
            f"{where}distill.layer_map has {len(mapping)} entries for a {num_student}-layer "
            f"student; give one teacher layer (1..{num_teacher}) per student layer"
        )
    bad = [j for j in mapping if not 1 <= j <= num_teacher]
    if bad:
        raise ValueError(f"{where}distill.layer_map={mapping}: teacher layers {bad} are out of range 1..{num_teacher}")
    return mapping


class HiddenStateLoss(nn.Module):
    """Distance between mapped hidden states, averaged over the mapped layers and real tokens.

    For each pair (student layer i, teacher layer j), with h_s projected by a learned linear map
    W_i when the hidden sizes differ (ALBETO tiny 312 -> 768):
        mse:    mean over tokens and features of (W_i h_s - h_t)^2
        cosine: mean over tokens of 1 - cos(W_i h_s, h_t)
    Index 0 of a hidden-state tuple is the embedding output; layer i is index i. Padding
    positions (attention_mask == 0) weigh nothing. The projections are trained with the student
    and never saved with it.
    """

    name = "hidden"

    def __init__(
        self,
        student_layers: int,
        teacher_layers: int,
        student_hidden: int,
        teacher_hidden: int,
        kind: str = "mse",
        layer_map: Sequence[int] = (),
        include_embeddings: bool = False,
    ):
        super().__init__()
        if kind not in ("mse", "cosine"):
            raise ValueError(f"unknown hidden loss '{kind}' (mse or cosine)")
        mapping = checked_layer_map(student_layers, teacher_layers, layer_map)
        self.pairs = [(i + 1, j) for i, j in enumerate(mapping)]
        if include_embeddings:
            self.pairs.insert(0, (0, 0))
        self.kind = kind
        self.projections = nn.ModuleList(
            nn.Linear(student_hidden, teacher_hidden) if student_hidden != teacher_hidden else nn.Identity()
            for _ in self.pairs
        )

    def forward(
        self,
        student_hidden: Sequence[torch.Tensor],
        teacher_hidden: Sequence[torch.Tensor],
        attention_mask: torch.Tensor,
    ) -> torch.Tensor:
        device = student_hidden[self.pairs[0][0]].device
        # every position is projected and the padded ones weigh 0: `x[mask]` would make the host
        # wait for a GPU to count the real tokens (per layer, and again in the backward pass),
        # and the student's own layers run over the padding all the same
        real = attention_mask.to(device).bool()  # [batch, seq]
        weights = real.float()
        tokens = weights.sum().clamp_min(1.0)
        losses = []
        for (i, j), proj in zip(self.pairs, self.projections):
            hs = proj(student_hidden[i].float())
            # whatever a teacher left at padded positions (inf, NaN) must not reach a gradient
            ht = teacher_hidden[j].to(device).float().masked_fill(~real[..., None], 0.0)
            if self.kind == "mse":
                per_token = (hs - ht).pow(2).mean(-1)  # [batch, seq]
            else:
                per_token = 1 - F.cosine_similarity(hs, ht, dim=-1)
            losses.append((per_token * weights).sum() / tokens)
        return torch.stack(losses).mean()


# ---------------------------------------------------------------------------------------------
# Terms with one signature, the objective that weights them, and the trained module
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reads:
    """What the loss terms read from one model's forward: hidden-state indices (0 = embeddings),
    the layers whose Q/K/V projections are captured (from 1), and whether they read its outputs
    (the student's logits; the teacher's logit targets). `reads["hidden"]` works too."""

    hidden: frozenset = frozenset()
    qkv: frozenset = frozenset()
    outputs: bool = False

    KINDS = ("hidden", "qkv")

    def __getitem__(self, kind: str) -> frozenset:
        return getattr(self, kind)

    @property
    def deepest(self) -> int:
        """The deepest layer a capture reads (0 = embeddings or none): where a teacher that only
        feeds intermediate terms may stop."""
        return max(self.hidden | self.qkv, default=0)

    @property
    def anything(self) -> bool:
        return bool(self.hidden or self.qkv or self.outputs)


@dataclass
class Signals:
    """What one forward pass exposes to the loss terms (student or teacher)."""

    outputs: Any = None  # the model output object (student: .loss, .logits, ...)
    targets: Optional[dict] = None  # task.kd_targets(...): the logits distillation compares
    hidden: Optional[Sequence[Optional[torch.Tensor]]] = None  # index 0 = embeddings; [batch, seq, hidden]
    qkv: Optional[dict] = None  # layer (1-based) -> captured self-attention projections (capture.QKV)
    attention_mask: Optional[torch.Tensor] = None  # [batch, seq]


class Term(nn.Module):
    """A loss term: `forward(student, teacher, batch)` returns a scalar.

    `student_layers()` / `teacher_layers()` name what the term reads, as {"hidden": {layers},
    "qkv": {layers}} (hidden index 0 = embeddings; qkv layers count from 1), so only those are
    captured. `intermediate` terms train in the first phase of a two-phase schedule.
    """

    name = ""
    intermediate = False
    reads_outputs = False  # whether the term uses the student's outputs (logits), not only its layers
    reads_targets = False  # whether the term uses the teacher's logit targets

    def student_layers(self) -> dict[str, set[int]]:
        return {}

    def teacher_layers(self) -> dict[str, set[int]]:
        return {}

    def forward(self, student: Signals, teacher: Optional[Signals], batch: dict) -> torch.Tensor:
        raise NotImplementedError


class GoldTerm(Term):
    """CE(student, gold): the model's own task loss (`outputs.loss`), computed by its head on the
    gold labels the task passed in (rows without a gold label carry the ignore index)."""

    name = "ce"
    reads_outputs = True

    def forward(self, student: Signals, teacher: Optional[Signals], batch: dict) -> torch.Tensor:
        loss = student.outputs.loss
        if "has_gold" in batch:
            # a batch of transfer rows only has no gold loss (the head's mean would be 0/0)
            loss = torch.nan_to_num(loss, nan=0.0) * batch["has_gold"].any()
        return loss


class SoftLabelTerm(Term):
    """Soft-label KD over the task's logit pairs (see `soft_label_loss`)."""

    name = "kd"
    reads_outputs = True
    reads_targets = True

    def __init__(self, task: Any, kind: str = "kl", temperature: float = 1.0):
        super().__init__()
        self.task = task
        self.loss = SoftLabelLoss(kind, temperature)

    def forward(self, student: Signals, teacher: Optional[Signals], batch: dict) -> torch.Tensor:
        mine = self.task.kd_targets(student.outputs, batch, teacher=False)
        return self.loss(self.task.kd_pairs(mine, teacher.targets, batch))


class HiddenTerm(Term):
    """Hidden-state distance of mapped layers (see `HiddenStateLoss`, which owns the projections)."""

    name = "hidden"
    intermediate = True

    def __init__(self, loss: HiddenStateLoss):
        super().__init__()
        self.loss = loss

    def student_layers(self) -> dict[str, set[int]]:
        return {"hidden": {i for i, _ in self.loss.pairs}}

    def teacher_layers(self) -> dict[str, set[int]]:
        return {"hidden": {j for _, j in self.loss.pairs}}

    def forward(self, student: Signals, teacher: Optional[Signals], batch: dict) -> torch.Tensor:
        return self.loss(student.hidden, teacher.hidden, batch["attention_mask"])


class Objective(nn.Module):
    """The weighted sum of the stage's terms: `objective(student, teacher, batch)` returns
    (total, {name: value}). With `intermediate_phase` set, only the intermediate terms count
    (TinyBERT's first phase); otherwise, under a two-phase schedule, only the prediction terms.
    """

    def __init__(self, terms: Sequence[Term], weights: dict[str, float], two_phase: bool = False):
        super().__init__()
        self.terms = nn.ModuleDict({t.name: t for t in terms})
        self.weights = {t.name: float(weights[t.name]) for t in terms}
        self.two_phase = two_phase
        self.intermediate_phase = False
        self._needs: dict[tuple, Reads] = {}

    def needs(self, side: str, every_phase: bool = False) -> Reads:
        """What the active terms read from `side` ("student" or "teacher"), or every term with
        `every_phase` (what a stage must be able to serve: the cache's layers, the hooks).
        Computed once per phase: the training forward asks on every step."""
        if side not in ("student", "teacher"):
            raise ValueError(f"side must be 'student' or 'teacher', got {side!r}")
        phase = "all" if every_phase or not self.two_phase else "intermediate" if self.intermediate_phase else "prediction"
        key = (side, phase)
        if key not in self._needs:
            layers: dict[str, set[int]] = {kind: set() for kind in Reads.KINDS}
            outputs = False
            for name, term in self.terms.items():
                if not (every_phase or self.active(name)):
                    continue
                for kind, which in (term.student_layers() if side == "student" else term.teacher_layers()).items():
                    if kind not in layers:
                        raise ValueError(f"term '{name}' asks for unknown signal '{kind}' (known: {', '.join(Reads.KINDS)})")
                    layers[kind] |= set(which)
                outputs = outputs or (term.reads_outputs if side == "student" else term.reads_targets)
            self._needs[key] = Reads(frozenset(layers["hidden"]), frozenset(layers["qkv"]), outputs)
        return self._needs[key]

    def active(self, name: str) -> bool:
        if not self.two_phase:
            return True
        return self.terms[name].intermediate == self.intermediate_phase

    def forward(self, student: Signals, teacher: Optional[Signals], batch: dict) -> tuple[torch.Tensor, dict]:
        values: dict[str, torch.Tensor] = {}
        total = None
        for name, term in self.terms.items():
            if not self.active(name):
                # keep the inactive term's parameters (projections) in the graph with a zero
                # gradient: DDP expects every parameter to take part in every step
                params = list(term.parameters())
                if params:
                    zero = sum(p.sum() for p in params) * 0.0
                    total = zero if total is None else total + zero
                continue
            values[name] = term(student, teacher, batch)
            weighted = self.weights[name] * values[name]
            total = weighted if total is None else total + weighted
        if not any(self.terms[n].reads_outputs for n in values) and student.outputs is not None:
            # intermediate terms alone (TinyBERT's first phase): the head is not in the loss;
            # a zero-weighted sum of the outputs keeps it in the graph for DDP, with zero gradient
            outs = [v for v in student.outputs.values() if isinstance(v, torch.Tensor) and v.requires_grad]
            total = total + 0.0 * sum(v.sum() for v in outs)
        return total, values


class Trainee(nn.Module):
    """The trained model plus its objective (whose projections are trained with it).

    `trainee(inputs)` returns (model outputs, None, {}); `trainee(inputs, batch, teacher)` also
    computes the objective: (outputs, total loss, {term: value}). Only `model` is ever saved.
    `capture` (objective/capture.py `Capture`) keeps the student's Q/K/V for the terms that read
    them: its hooks are attached here, once, and armed only around forwards whose active terms
    read Q/K/V; hidden states are asked of the model only when an active term reads them.
    """

    def __init__(self, model: nn.Module, objective: Optional[Objective] = None, capture: Any = None):
        super().__init__()
        self.model = model
        self.objective = objective
        self.capture = capture.attach() if capture is not None else None

    def forward(self, inputs: dict, batch: Optional[dict] = None, teacher: Optional[Signals] = None):
        if self.objective is None or batch is None:
            return self.model(**inputs), None, {}
        reads = self.objective.needs("student")
        hidden = bool(reads.hidden)
        qkv = None
        if reads.qkv and self.capture is not None:
            if self.capture.qkv_layers != reads.qkv:
                self.capture.select(qkv=reads.qkv)
            with self.capture as captured:
                out = self.model(**inputs, output_hidden_states=hidden)
            qkv = captured.qkv
        else:
            out = self.model(**inputs, output_hidden_states=hidden)
        student = Signals(
            outputs=out,
            hidden=out.hidden_states if hidden else None,
            qkv=qkv,
            attention_mask=inputs.get("attention_mask"),
        )
        loss, terms = self.objective(student, teacher, batch)
        return out, loss, terms
