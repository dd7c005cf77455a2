"""Loss terms. Each is a small module with its formula in the docstring; the recipe weights them.

    total = ce_weight * CE(student, gold)
          + kd_weight * KD(student logits, teacher logits)
          + hidden_weight * Hidden(student hidden states, teacher hidden states)

The reference study's published setting is ce_weight=0, kd_weight=1, kd_loss=kl, T=1.
Plain fine-tuning (teacher stage, or a student with no teacher) is ce_weight=1 alone.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from distill.tasks.base import LogitPair


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


class HiddenStateLoss(nn.Module):
    """Distance between mapped hidden states, averaged over the mapped layers and real tokens.

    For each pair (student layer i, teacher layer j), with h_s projected by a learned linear map
    W_i when the hidden sizes differ (ALBETO tiny 312 -> 768):
        mse:    mean over tokens and features of (W_i h_s - h_t)^2
        cosine: mean over tokens of 1 - cos(W_i h_s, h_t)
    Index 0 of a hidden-state tuple is the embedding output; layer i is index i. Padding
    positions (attention_mask == 0) never count. The projections are trained with the student
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
        mapping = list(layer_map) or uniform_layer_map(student_layers, teacher_layers)
        if len(mapping) != student_layers:
            raise ValueError(
                f"distill.layer_map has {len(mapping)} entries for a {student_layers}-layer "
                f"student; give one teacher layer (1..{teacher_layers}) per student layer"
            )
        bad = [j for j in mapping if not 1 <= j <= teacher_layers]
        if bad:
            raise ValueError(
                f"distill.layer_map={mapping}: teacher layers {bad} are out of range "
                f"1..{teacher_layers}"
            )
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
        mask = attention_mask.bool()  # [batch, seq]
        losses = []
        for (i, j), proj in zip(self.pairs, self.projections):
            hs = proj(student_hidden[i].float())[mask]  # [tokens, hidden_t]
            ht = teacher_hidden[j].float().to(hs.device)[mask]  # [tokens, hidden_t]
            if self.kind == "mse":
                losses.append(F.mse_loss(hs, ht))
            else:
                losses.append((1 - F.cosine_similarity(hs, ht, dim=-1)).mean())
        return torch.stack(losses).mean()
