"""Answer spans in windows of tokens, the part of extractive QA that works on offsets:
where a gold answer lies in a window (`answer_tokens`), a context cut into overlapping windows
that never truncate the question (`tokenize_windows`), a teacher of another tokenizer's window
matched to each student window and its start/end probabilities moved onto the student's tokens
through characters (`pick_teacher_window`, `map_positions`, `move_probabilities`), and the best
spans of a prediction over an example's windows (`best_spans`). The QA task (tasks/qa.py) and its
docstring say how these are used; docs/qa-across-tokenizers.md gives the rules.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from datasets import Dataset

from distill.errors import DataError

QA_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
# log-probability standing for "no mass": finite (no NaN in the loss), float16-safe for the
# cache, and exp() of it (or of it over any sensible temperature) is exactly 0 in float32.
LOG_ZERO = -1e4
# feature columns that exist only when the teacher tokenizes differently
CROSS_MAPS = ("teacher_start_map", "teacher_end_map")


def answer_tokens(
    offsets: Sequence[Sequence[int]], context_mask: Sequence[int], start_char: int, end_char: int
) -> tuple[int, int] | None:
    """Token span [start, end] covering characters [start_char, end_char) when the window's
    context holds all of them, else None."""
    positions = [i for i, m in enumerate(context_mask) if m]
    if not positions:
        return None
    first, last = positions[0], positions[-1]
    if offsets[first][0] > start_char or offsets[last][1] < end_char:
        return None
    start = first
    while start <= last and offsets[start][1] <= start_char:
        start += 1
    end = last
    while end >= first and offsets[end][0] >= end_char:
        end -= 1
    if start > end:
        return None
    return start, end


def has_answer(answers: Any) -> bool:
    """Whether a row's `answers` holds at least one non-blank answer text."""
    texts = (answers or {}).get("text") or []
    return any(isinstance(t, str) and t.strip() for t in texts)


# ---------------------------------------------------------------------------------------------
# Windows
# ---------------------------------------------------------------------------------------------


@dataclass
class Window:
    """One tokenized window of a (question, context) pair."""

    inputs: dict[str, list[int]]  # input_ids, attention_mask[, token_type_ids]
    offsets: list[list[int]]  # [seq, 2] character span of context tokens, [0, 0] elsewhere
    context_mask: list[int]  # [seq] 1 on context tokens
    cls_index: int

    def bounds(self) -> tuple[int, int] | None:
        """Characters [lo, hi) of the context this window holds (None: no context token)."""
        spans = [o for o, m in zip(self.offsets, self.context_mask) if m]
        if not spans:
            return None
        return min(a for a, _ in spans), max(b for _, b in spans)


def question_lengths(
    tok: Any, questions: Sequence[str], max_length: int, where: Sequence[str], length_key: str = "data.max_length",
) -> list[int]:
    """Each question's length in `tok`'s tokens; DataError naming the row (`where[i]`) and the
    setting (`length_key`) when a question leaves no room for the context in `max_length`."""
    room = max_length - tok.num_special_tokens_to_add(pair=True)
    q_lens = [len(ids) for ids in tok(list(questions), add_special_tokens=False)["input_ids"]]
    for i, n in enumerate(q_lens):
        if room - n < 1:
            raise DataError(
                f"{where[i]}: the question has {n} tokens and {length_key}={max_length} leaves "
                f"no room for the context with {type(tok).__name__}; questions are never "
                f"truncated, so raise {length_key}."
            )
    return q_lens


def tokenize_windows(
    tok: Any,
    questions: Sequence[str],
    contexts: Sequence[str],
    max_length: int,
    stride: int,
    where: Sequence[str],
    length_key: str = "data.max_length",
) -> list[list[Window]]:
    """Each row's windows, in context order, for one tokenizer.

    The question is never truncated: a row whose question leaves no room for the context is an
    error (`where[i]` names the row, `length_key` the setting to raise). Rows whose question
    leaves room for fewer than `stride` context tokens get a smaller stride of their own instead
    of failing the batch.
    """
    question_first = tok.padding_side == "right"
    room = max_length - tok.num_special_tokens_to_add(pair=True)
    q_lens = question_lengths(tok, questions, max_length, where, length_key)

    def encode(rows: list[int], row_stride: int) -> Any:
        qs, cs = [questions[i] for i in rows], [contexts[i] for i in rows]
        first, second = (qs, cs) if question_first else (cs, qs)
        return tok(
            first,
            second,
            truncation="only_second" if question_first else "only_first",
            max_length=max_length,
            stride=row_stride,
            return_overflowing_tokens=True,
            return_offsets_mapping=True,
        )

    out: list[list[Window]] = [[] for _ in questions]
    context_id = 1 if question_first else 0
    keys = [k for k in QA_INPUTS if k in tok.model_input_names]

    def collect(enc: Any, rows: list[int]) -> None:
        for j, sample in enumerate(enc["overflow_to_sample_mapping"]):
            ids = enc["input_ids"][j]
            mask = [int(s == context_id) for s in enc.sequence_ids(j)]
            offsets = [list(o) if m else [0, 0] for o, m in zip(enc["offset_mapping"][j], mask)]
            cls = ids.index(tok.cls_token_id) if tok.cls_token_id in ids else 0
            inputs = {k: list(enc[k][j]) for k in keys if k in enc}
            out[rows[sample]].append(Window(inputs, offsets, mask, cls))

    normal = [i for i, n in enumerate(q_lens) if room - n > stride]
    if normal:
        collect(encode(normal, stride), normal)
    for i in sorted(set(range(len(questions))) - set(normal)):
        collect(encode([i], (room - q_lens[i]) // 2), [i])
    return out


# ---------------------------------------------------------------------------------------------
# Across tokenizers: which teacher window, and where its probability mass goes
# ---------------------------------------------------------------------------------------------


def pick_teacher_window(student: tuple[int, int] | None, teachers: Sequence[tuple[int, int] | None]) -> int:
    """The teacher window that gives a student window its targets.

    Windows are character ranges [lo, hi) of the context. The rule: the most characters of
    the student window covered; among the windows covering all of it, the one where it is most
    central (the larger margin on its poorer side); then the earlier window. A single window
    (not an average over several) keeps one teacher forward per student feature, and each
    teacher window's null (CLS) mass means "not in *this* window", so distributions from
    different windows cannot simply be averaged.
    """
    if student is None:
        return 0
    lo, hi = student
    best, best_key = 0, None
    for k, bounds in enumerate(teachers):
        if bounds is None:
            continue
        t_lo, t_hi = bounds
        overlap = max(0, min(hi, t_hi) - max(lo, t_lo))
        margin = min(lo - t_lo, t_hi - hi)  # negative when the window does not cover it all
        key = (overlap, margin)
        if best_key is None or key > best_key:
            best, best_key = k, key
    return best


def _stripped(context: str, lo: int, hi: int) -> tuple[int, int]:
    """The span [lo, hi) without leading and trailing whitespace (BPE `Ġx` and SentencePiece
    `▁x` tokens may include the space before a word). A span of only whitespace gives
    (hi, lo): its start moves to the next word, its end back to the previous one."""
    text = context[lo:hi]
    if not text:
        return lo, hi
    return lo + len(text) - len(text.lstrip()), hi - (len(text) - len(text.rstrip()))


def map_positions(context: str, student: Window, teacher: Window) -> tuple[list[int], list[int], list[int]]:
    """Index maps that move a teacher window's start/end distributions onto a student window.

    Returns (start_map, end_map) over the teacher's positions and `covered` over the student's:
      start_map[k]  the student position that receives teacher position k's start mass: where
                    the student's gold labels would put the start of an answer that begins at
                    token k's first non-space character (`answer_tokens`' rule: the first
                    student context token ending after it); the student's CLS when that
                    character is outside the student window; -1 for positions outside the
                    teacher's softmax (question, special tokens, padding). Teacher CLS -> CLS.
      end_map[k]    the same for an answer that ends at token k's last non-space character
                    (the last student context token starting before its end).
      covered[i]    1 for the student's CLS and for its context tokens that lie inside the
                    teacher window's characters; the others get no target.
    Two teacher tokens inside one student token both give it their mass (BPE splits `piñas`
    into five pieces, WordPiece into two); a student token that no teacher token starts in
    (the `##as` of `pin ##as` when the teacher keeps `piñas` whole) gets none.
    """
    s_pos = [i for i, m in enumerate(student.context_mask) if m]
    s_spans = [_stripped(context, *student.offsets[i]) for i in s_pos]
    raw_spans = [student.offsets[i] for i in s_pos]
    # running max of ends / running min (from the right) of starts: sorted, so bisect finds
    # "the first token ending after c" and "the last token starting before c" even when
    # tokens overlap (NFKD pieces, byte pieces of one character)
    ends, starts = [], []
    for _, b in raw_spans:
        ends.append(max(b, ends[-1]) if ends else b)
    for a, _ in reversed(raw_spans):
        starts.append(min(a, starts[-1]) if starts else a)
    starts.reverse()
    bounds = student.bounds()
    s_cls = student.cls_index

    def start_target(c: int) -> int:
        if bounds is None or not bounds[0] <= c < bounds[1]:
            return s_cls
        j = bisect.bisect_right(ends, c)  # first token with end > c
        return s_pos[j] if j < len(s_pos) else s_cls

    def end_target(c: int) -> int:
        if bounds is None or not bounds[0] < c <= bounds[1]:
            return s_cls
        j = bisect.bisect_left(starts, c) - 1  # last token with start < c
        return s_pos[j] if j >= 0 else s_cls

    start_map = [-1] * len(teacher.context_mask)
    end_map = [-1] * len(teacher.context_mask)
    for k, (m, (a, b)) in enumerate(zip(teacher.context_mask, teacher.offsets)):
        if not m:
            continue
        lo, hi = _stripped(context, a, b)
        start_map[k] = start_target(lo)
        end_map[k] = end_target(hi)
    start_map[teacher.cls_index] = end_map[teacher.cls_index] = s_cls

    covered = [0] * len(student.context_mask)
    t_bounds = teacher.bounds()
    if t_bounds is not None:
        for i, (lo, hi) in zip(s_pos, s_spans):
            covered[i] = int(t_bounds[0] <= lo and hi <= t_bounds[1])
    # CLS always keeps a target. When the teacher window holds the whole student window, its
    # null ("not wholly in my window") plus its mass outside the student window is exactly "not
    # in this student window". When it holds only part, uncovered positions leave both
    # softmaxes, and the same mass means "not among the covered positions": still true, and
    # it leaves the student free where the teacher could not see (an answer straddling the
    # teacher window's edge is the one case it misleads; the coverage is logged).
    covered[s_cls] = 1
    return start_map, end_map, covered


def move_probabilities(
    teacher_logits: torch.Tensor, index: torch.Tensor, covered: torch.Tensor
) -> torch.Tensor:
    """Teacher start (or end) logits -> log-probabilities over the student's positions.

    p = softmax of the teacher logits over its positions with index >= 0 (context + CLS);
    q_i = sum of p_k over k with index_k = i, kept where `covered`, renormalised to sum to 1;
    returns log q with LOG_ZERO where q = 0 (positions without target are masked in kd_pairs).
    A distribution is returned (not logits): its softmax is itself, so any temperature the
    loss applies softens the mapped distribution, p_T ∝ q^(1/T).
    """
    logits = teacher_logits.float()  # [batch, t_seq]
    valid = index >= 0  # [batch, t_seq]
    p = logits.masked_fill(~valid, float("-inf")).softmax(-1)  # [batch, t_seq] (CLS always valid)
    p = p.masked_fill(~valid, 0.0)
    q = torch.zeros(covered.shape, dtype=p.dtype, device=p.device)  # [batch, seq]
    q.scatter_add_(1, index.clamp(min=0).to(p.device), p)
    q = q * covered.to(p.device, p.dtype)
    q = q / q.sum(-1, keepdim=True).clamp(min=1e-30)
    return q.log().clamp(min=LOG_ZERO)  # [batch, seq]


# ---------------------------------------------------------------------------------------------
# Post-processing
# ---------------------------------------------------------------------------------------------


def best_spans(
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    features: Dataset,
    contexts: Sequence[str],
    n_best: int = 20,
    max_answer_length: int = 30,
) -> list[dict[str, Any]]:
    """Best answer span of every example over all its windows, and its null score.

    `start_logits`/`end_logits` are [features, seq] in feature order (padding beyond a feature's
    length is ignored). Only context tokens are candidates; a span scores start + end logit.
    Returns per example {"text", "score", "start", "end", "null_score"}: character offsets
    with surrounding whitespace trimmed ("" and -inf when no valid span exists); null_score is
    the lowest start + end logit at CLS over the example's windows (SQuAD v2).
    """
    best: list[dict[str, Any]] = [
        {"text": "", "score": float("-inf"), "start": -1, "end": -1, "null_score": float("inf")}
        for _ in contexts
    ]
    cols = features.select_columns(["example_id", "offset_mapping", "context_mask", "length", "cls_index"])
    for f, (ex, offsets, ctx, length, cls) in enumerate(
        zip(cols["example_id"], cols["offset_mapping"], cols["context_mask"], cols["length"], cols["cls_index"])
    ):
        null = float(start_logits[f, cls] + end_logits[f, cls])
        best[ex]["null_score"] = min(best[ex]["null_score"], null)
        valid = np.asarray(ctx[:length], dtype=bool)  # [length]
        if not valid.any():
            continue
        s = np.where(valid, start_logits[f, :length], -np.inf)  # [length]
        e = np.where(valid, end_logits[f, :length], -np.inf)  # [length]
        k = min(n_best, int(valid.sum()))
        starts = np.argsort(-s, kind="stable")[:k]
        ends = np.argsort(-e, kind="stable")[:k]
        for i in starts:
            for j in ends:
                if j < i or j - i + 1 > max_answer_length:
                    continue
                score = float(s[i] + e[j])
                if score > best[ex]["score"]:
                    lo, hi = _stripped(contexts[ex], offsets[i][0], offsets[j][1])
                    lo, hi = (lo, hi) if lo < hi else (offsets[i][0], offsets[j][1])
                    best[ex].update(text=contexts[ex][lo:hi], score=score, start=lo, end=hi)
    return best
