"""How the soft targets of several teachers combine into one (`distill.teacher_combine`).

Every rule returns *logits* whose softmax at the distillation temperature T is the combined
distribution, so the soft-label losses (kl, ce) apply to an ensemble unchanged:

    mean       p = (1/K) sum_k softmax(z_k / T)               (the reference study's rule)
    weighted   p = sum_k w_k softmax(z_k / T),  w normalised to sum 1
    confident  p = softmax(z_k* / T) per row, k* = the teacher with the lowest entropy of
               softmax(z_k / T) on that row (the first such teacher on a tie)

For `mean` and `weighted` the returned logits are T * log p: softmax(T * log p / T) = p / sum p
= p. They are computed in log space (logsumexp over teachers of log w_k + log softmax(z_k / T)),
so a class every teacher finds unlikely does not underflow to log 0. `confident` returns the
chosen teacher's own logits. With `kd_loss: mse` (raw logits) the target is therefore T * log p,
not an average of raw logits.

`class_mask` [N, C] (True = a real class, e.g. the context positions of a QA window) keeps the
other positions out of every softmax and entropy; they come back as MASKED_LOGIT, a large finite
negative (probability 0, no NaN in the losses, which mask them the same way).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

RULES = ("mean", "weighted", "confident")
MASKED_LOGIT = -1e9  # as the soft-label loss fills masked classes


def _check(
    teacher_logits: Sequence[torch.Tensor], rule: str, temperature: float, weights: Optional[Sequence[float]],
    class_mask: Optional[torch.Tensor],
) -> None:
    if rule not in RULES:
        raise ValueError(f"unknown teacher combination rule '{rule}'; use one of: {', '.join(RULES)}")
    if not teacher_logits:
        raise ValueError("no teacher logits to combine (an empty list)")
    if not temperature > 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    shape = tuple(teacher_logits[0].shape)
    if len(shape) != 2:
        raise ValueError(f"teacher logits must be [rows, classes]; teacher 0 has shape {list(shape)}")
    for i, z in enumerate(teacher_logits[1:], start=1):
        if tuple(z.shape) != shape:
            raise ValueError(
                f"teacher {i} gives logits of shape {list(z.shape)} but teacher 0 gives {list(shape)}: "
                "every teacher must score the same rows and classes (same label order)"
            )
    if class_mask is not None and tuple(class_mask.shape) != shape:
        raise ValueError(f"class_mask has shape {list(class_mask.shape)}; the logits have {list(shape)}")
    if rule == "weighted":
        if weights is None:
            raise ValueError("rule 'weighted' needs weights, one per teacher")
        if len(weights) != len(teacher_logits):
            raise ValueError(f"{len(weights)} weights for {len(teacher_logits)} teachers; give one per teacher")
        bad = [w for w in weights if not math.isfinite(float(w)) or float(w) < 0]
        if bad:
            raise ValueError(f"teacher weights must be finite and >= 0, got {list(weights)}")
        if sum(float(w) for w in weights) <= 0:
            raise ValueError(f"teacher weights are all zero ({list(weights)}): no teacher would count")
    elif weights is not None:
        raise ValueError(f"weights are only used by rule 'weighted', not '{rule}'")


def combine(
    teacher_logits: Sequence[torch.Tensor],
    rule: str = "mean",
    temperature: float = 1.0,
    weights: Optional[Sequence[float]] = None,
    class_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Combine K teachers' logits [N, C] into one [N, C] (float32) by `rule` (see the module)."""
    _check(teacher_logits, rule, temperature, weights, class_mask)
    device = teacher_logits[0].device
    z = torch.stack([t.float().to(device) for t in teacher_logits])  # [K, N, C]
    mask = None
    if class_mask is not None:
        mask = class_mask.to(device, torch.bool).unsqueeze(0)  # [1, N, C]
        z = z.masked_fill(~mask, MASKED_LOGIT)
    log_p = F.log_softmax(z / temperature, dim=-1)  # [K, N, C]
    if rule == "confident":
        p = log_p.exp()
        plogp = p * log_p
        if mask is not None:
            plogp = torch.where(mask, plogp, torch.zeros_like(plogp))
        entropy = -plogp.sum(-1)  # [K, N]
        chosen = entropy.argmin(0)  # [N]; argmin returns the first minimum on a tie
        rows = torch.arange(z.size(1), device=device)
        return z[chosen, rows]  # [N, C]
    k = z.size(0)
    if rule == "mean":
        log_w = torch.full((k,), -math.log(k), device=device)  # [K]
    else:
        w = torch.tensor([float(x) for x in weights], device=device)  # type: ignore[union-attr]
        log_w = torch.log(w / w.sum())  # [K]; a zero weight is -inf: that teacher drops out
    log_mean = torch.logsumexp(log_w.view(k, 1, 1) + log_p, dim=0)  # [N, C]
    out = temperature * log_mean
    if mask is not None:
        out = out.masked_fill(~mask[0], MASKED_LOGIT)
    return out
