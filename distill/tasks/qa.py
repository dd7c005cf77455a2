"""Extractive question answering (MLQA, SQAC, TAR/XQuAD), SQuAD format (v1.1, or v2.0 with
unanswerable questions when `task.version_2_with_negative=true`).

Example row (flat SQuAD layout; `distill.data.formats.read_squad` turns nested files into it):
    {"id": "q1", "title": "Madrid", "context": "Madrid es la capital de España.",
     "question": "¿Cuál es la capital de España?",
     "answers": {"text": ["Madrid"], "answer_start": [0]}}
(an unanswerable SQuAD v2 row has `"answers": {"text": [], "answer_start": []}`).

Features are windows over the context (`data.max_length` tokens, consecutive windows sharing
`data.doc_stride` tokens); the question is never truncated. Each feature carries:
    input_ids, attention_mask[, token_type_ids]
    start_positions, end_positions   the first answer's tokens, or the CLS position when the
                                     answer is not wholly inside this window (or there is none)
    context_mask  [seq]  1 on context tokens
    offset_mapping [seq, 2]  character span of each context token ([0, 0] elsewhere)
    cls_index, example_id, feature_id, length
and, only when the distillation teacher tokenizes differently (see "Across tokenizers"):
    teacher_input_ids, teacher_attention_mask[, teacher_token_type_ids]   one teacher window
    teacher_start_map, teacher_end_map  [teacher seq]  the student position that receives each
                         teacher position's start / end probability (-1: not in the softmax)
    teacher_covered [seq]  1 where the student position has a target (CLS + covered context)

Predictions take, over all windows of an example, the best-scoring start/end pair among the
`task.n_best` best starts and ends, inside the context, at most `task.max_answer_length` tokens.
With `version_2_with_negative`, the example's null score (the lowest start + end logit at CLS
over its windows) beats that span by more than `task.null_score_diff_threshold` -> "" (no
answer), and the metrics are SQuAD v2's (has-answer / no-answer splits and best thresholds).

Distillation compares start and end distributions over the context tokens of each window plus
CLS (see `QATask.kd_pairs`).

Across tokenizers (a RoBERTa-BNE or XLM-R teacher for an ALBETO student): teacher and student
tokenize each (question, context) independently, each with its own windows. Each student
window gets one teacher window (`pick_teacher_window`: the one covering most of the student
window's context characters; among those covering all of it, the one where it is most central)
and index maps built from both tokenizers' character offsets (`map_positions`). At the teacher
forward, `kd_targets(teacher=True)` moves the teacher's start/end probabilities onto the
student's positions (`move_probabilities`): a teacher token's start mass goes to the student
token where an answer starting at that token's first (non-space) character would start for the
student, its end mass where an answer ending at its last character would end, and mass that
falls outside the student window goes to the student's CLS ("not in this window"). The result
is renormalised over the student positions that have a target: CLS and the context tokens
inside the teacher window. So the teacher cache stores
targets already in the student's positions (its key includes the student tokenizer); the loop
and the loss do not change. See docs/qa-across-tokenizers.md for the rules and what they cost.

One concern over ~500 lines: windows, answer alignment (also across tokenizers, through
characters) and SQuAD scoring must use the same offsets.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch
from datasets import Dataset, DatasetDict, Features, List, Value

from transformers import AutoModelForQuestionAnswering

from distill.errors import DataError
from distill.tasks.metrics import answer_start_mismatch, squad_metrics, squad_v2_metrics
from distill.models import same_tokenizer
from distill.tasks.base import TEACHER_PREFIX, LogitPair, Task, column, require_columns
from distill.tasks.tagging import pad_lists

logger = logging.getLogger(__name__)

QA_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
# log-probability standing for "no mass": finite (no NaN in the loss), float16-safe for the
# cache, and exp() of it (or of it over any sensible temperature) is exactly 0 in float32.
LOG_ZERO = -1e4
# feature columns that exist only when the teacher tokenizes differently
CROSS_MAPS = ("teacher_start_map", "teacher_end_map")


def locate_answer(context: str, text: str, start: int) -> int | None:
    """The character start of `text` in `context`: `start` when it points at the text, else the
    occurrence nearest to `start` (datasets with shifted offsets), else None (not in context)."""
    if not text:
        return None
    if context[start : start + len(text)] == text:
        return start
    found, best = context.find(text), None
    while found >= 0:
        if best is None or abs(found - start) < abs(best - start):
            best = found
        found = context.find(text, found + 1)
    return best


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


def tokenize_windows(
    tok: Any,
    questions: Sequence[str],
    contexts: Sequence[str],
    max_length: int,
    stride: int,
    where: Sequence[str],
) -> list[list[Window]]:
    """Each row's windows, in context order, for one tokenizer.

    The question is never truncated: a row whose question leaves no room for the context is an
    error (`where[i]` names the row). Rows whose question leaves room for fewer than `stride`
    context tokens get a smaller stride of their own instead of failing the batch.
    """
    question_first = tok.padding_side == "right"
    room = max_length - tok.num_special_tokens_to_add(pair=True)
    q_lens = [len(ids) for ids in tok(list(questions), add_special_tokens=False)["input_ids"]]
    for i, n in enumerate(q_lens):
        if room - n < 1:
            raise DataError(
                f"{where[i]}: the question has {n} tokens and data.max_length={max_length} leaves "
                f"no room for the context with {type(tok).__name__}; questions are never "
                "truncated, so raise data.max_length."
            )

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


def _fit_width(t: torch.Tensor, width: int, fill: float | bool = 0) -> torch.Tensor:
    """Cut or right-pad axis 1 of a [batch, n] tensor to `width` (cached rows are padded to
    their own batch's width, not this one's)."""
    if t.size(1) >= width:
        return t[:, :width]
    return torch.cat([t, t.new_full((t.size(0), width - t.size(1)), fill)], dim=1)


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


class QATask(Task):
    family = "qa"
    pipeline_tag = "question-answering"
    default_metric = "f1"
    # start_logits / end_logits [seq] (+ kd_mask [seq] across tokenizers); a feature's seq axis
    # is `length` long (a batch column): the teacher cache trims rows to it.
    kd_target_keys = ("start_logits", "end_logits")
    kd_target_lengths = {"start_logits": "length", "end_logits": "length", "kd_mask": "length"}

    @property
    def metric_names(self) -> tuple[str, ...]:  # type: ignore[override]
        """What `compute_metrics` returns (checked against task.metric before training)."""
        names = ("exact_match", "f1", "examples", "answer_start_mismatches")
        if self.cfg.task.version_2_with_negative:
            for part in ("has_answer", "no_answer"):
                names += (f"{part}_exact_match", f"{part}_f1", f"{part}_examples")
            names += ("best_exact_match", "best_exact_match_threshold", "best_f1", "best_f1_threshold")
        return names

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        self.teacher_max_length: Optional[int] = None
        self.teacher_doc_stride: Optional[int] = None

    def setup(self, raw: DatasetDict) -> None:
        """Check columns, answers and texts of every split (fails naming split and row)."""
        self.id_col = column(self.cfg, "id", "id")
        self.question_col = column(self.cfg, "question", "question")
        self.context_col = column(self.cfg, "context", "context")
        self.answers_col = column(self.cfg, "answers", "answers")
        require_columns(
            raw,
            {"question": self.question_col, "context": self.context_col, "answers": self.answers_col},
        )
        v2 = self.cfg.task.version_2_with_negative
        for split, ds in raw.items():
            if len(ds) == 0:
                continue
            answers = ds[0][self.answers_col]
            if not isinstance(answers, dict) or not {"text", "answer_start"} <= set(answers):
                raise DataError(
                    f"split '{split}': column '{self.answers_col}' must hold "
                    f"{{text: [...], answer_start: [...]}} (flat SQuAD rows), got {answers!r}. "
                    "Nested SQuAD files (data -> paragraphs -> qas) load with data.format=squad."
                )
            for role, col in (("question", self.question_col), ("context", self.context_col)):
                bad = [i for i, text in enumerate(ds[col]) if not isinstance(text, str) or not text.strip()]
                if bad:
                    raise DataError(
                        f"split '{split}': {len(bad)} rows have a null or empty {role} (column "
                        f"'{col}'), first at row {bad[0]}{self._row_id(ds, bad[0])}. Fix or drop them."
                    )
            answerable = [has_answer(a) for a in ds[self.answers_col]]
            missing = [i for i, ok in enumerate(answerable) if not ok]
            if missing and not v2:
                raise DataError(
                    f"split '{split}': {len(missing)} of {len(ds)} questions have no answer (SQuAD v2 "
                    f"unanswerable questions), first at row {missing[0]}{self._row_id(ds, missing[0])}. "
                    "Set task.version_2_with_negative=true to train and score them (a question gets "
                    "no answer when its null score beats the best span by "
                    "task.null_score_diff_threshold), or drop them from the data."
                )
            if split in ("validation", "test") and not any(answerable):
                raise DataError(
                    f"split '{split}' has no answerable question ({len(ds)} rows, none with an "
                    f"answer in column '{self.answers_col}'): its F1 and exact match would say "
                    "nothing about answering. Use a split with answers or set "
                    f"data.splits.{split}=null."
                )
        self.labels = []

    def _row_id(self, ds: Dataset, i: int) -> str:
        return f" (id {ds[i][self.id_col]!r})" if self.id_col in ds.column_names else ""

    # --- tokenizers -------------------------------------------------------------------------
    def bind(self, tokenizer: Any, teacher_tokenizer: Any = None, plan_tokenizers: Sequence[Any] = ()) -> None:
        """Tokenizer of the trained model, and the teacher's. A teacher that tokenizes
        differently is aligned through the context's characters (see the module docstring).
        QA windows follow one teacher's tokenizer: further tokenizers to plan over are refused
        (several QA teachers share the student's tokenizer)."""
        if plan_tokenizers:
            raise ValueError(
                "QA windows follow the student's and one teacher's tokenizer; several teachers "
                "must share the student's tokenizer"
            )
        self.plan_tokenizers = []
        if teacher_tokenizer is None or same_tokenizer(tokenizer, teacher_tokenizer):
            self.tokenizer, self.teacher_tokenizer = tokenizer, None  # one set of features serves both
            self.kd_target_keys = type(self).kd_target_keys
            return
        self.bind_across(tokenizer, teacher_tokenizer)

    def bind_across(
        self,
        tokenizer: Any,
        teacher_tokenizer: Any,
        teacher_max_length: Optional[int] = None,
        teacher_doc_stride: Optional[int] = None,
    ) -> None:
        """Align a teacher through character offsets, even when the tokenizers agree (`bind`
        calls it when they differ; with equal tokenizers the mapped targets equal the teacher's
        own softmax, which the tests check). The teacher's windows take the given sizes, else
        `teacher.max_length` / `teacher.doc_stride`, else `data.max_length` / `data.doc_stride`."""
        for role, tok in (("student", tokenizer), ("teacher", teacher_tokenizer)):
            if not getattr(tok, "is_fast", False):
                raise DataError(
                    "QA distillation between tokenizers that differ moves the teacher's start/end "
                    f"probabilities through character offsets, and the {role}'s "
                    f"{type(tok).__name__} is a slow tokenizer with no offset mapping. Load a fast "
                    "tokenizer (use_fast=True; convert a SentencePiece one with the tokenizers "
                    "library) or use a teacher that shares the student's tokenizer."
                )
        if self.cfg.distill.kd_loss == "mse":
            raise DataError(
                "distill.kd_loss=mse compares raw logits position by position, which means nothing "
                "between tokenizers that split the context differently; QA across tokenizers "
                "compares distributions: use distill.kd_loss=kl or ce."
            )
        self.tokenizer, self.teacher_tokenizer = tokenizer, teacher_tokenizer
        self.teacher_max_length = teacher_max_length or self.cfg.teacher.max_length
        self.teacher_doc_stride = teacher_doc_stride or self.cfg.teacher.doc_stride
        self.kd_target_keys = (*type(self).kd_target_keys, "kd_mask")

    @property
    def across_tokenizers(self) -> bool:
        return self.teacher_tokenizer is not None

    def label_keys(self) -> tuple[str, ...]:
        return ("start_positions", "end_positions")

    def model_kwargs(self) -> dict[str, Any]:
        return {}

    def model_class(self) -> Any:
        return AutoModelForQuestionAnswering

    def _window_sizes(self, tok: Any, teacher: bool) -> tuple[int, int]:
        max_length = (teacher and self.teacher_max_length) or self.cfg.data.max_length
        stride = (teacher and self.teacher_doc_stride) or self.cfg.data.doc_stride
        return min(max_length, tok.model_max_length), stride

    # --- features -------------------------------------------------------------------------
    def preprocess(self, raw: Dataset, split: str) -> Dataset:
        if self.tokenizer is None:
            raise RuntimeError("QATask.preprocess needs a tokenizer: call bind() first")
        tok, ttok = self.tokenizer, self.teacher_tokenizer
        if not getattr(tok, "is_fast", False):
            raise DataError(f"QA needs a fast tokenizer (offset mapping); {type(tok).__name__} is not")
        # `split` is the role (train / validation / test), whatever source split it came from:
        # training drops answers that are not in their context; evaluation keeps every example.
        is_train = split == "train"
        relocated = dropped = 0
        coverage = [0, 0]  # student context tokens inside their teacher window, all of them

        def encode(rows: dict, idx: list[int]) -> dict:
            nonlocal relocated, dropped
            # Leading spaces in questions only waste window room (some datasets have many).
            questions = [q.lstrip() for q in rows[self.question_col]]
            contexts = rows[self.context_col]
            where = [f"row {i} of split '{split}'" for i in idx]
            student = tokenize_windows(tok, questions, contexts, *self._window_sizes(tok, False), where)
            teacher = None
            if ttok is not None:
                teacher = tokenize_windows(ttok, questions, contexts, *self._window_sizes(ttok, True), where)

            # Character span of each row's first answer (None: no answer, or not in the text).
            spans: list[tuple[int, int] | None] = []
            for i, answers in enumerate(rows[self.answers_col]):
                if not has_answer(answers):
                    spans.append(None)
                    continue
                text, given = answers["text"][0], int(answers["answer_start"][0])
                found = locate_answer(contexts[i], text, given)
                if found is None:
                    dropped += is_train  # nothing to learn from an answer that is not in the text
                elif found != given:
                    relocated += 1
                spans.append(None if found is None else (found, found + len(text)))
            out: dict[str, list] = {k: [] for k in (*QA_INPUTS, "offset_mapping", "context_mask")}
            for k in ("start_positions", "end_positions", "cls_index", "example_id"):
                out[k] = []
            if teacher is not None:
                for k in (*QA_INPUTS, "start_map", "end_map", "covered"):
                    out[TEACHER_PREFIX + k] = []
            for i, windows in enumerate(student):
                if is_train and has_answer(rows[self.answers_col][i]) and spans[i] is None:
                    continue
                t_bounds = [w.bounds() for w in teacher[i]] if teacher is not None else []
                for w in windows:
                    span = answer_tokens(w.offsets, w.context_mask, *spans[i]) if spans[i] else None
                    out["start_positions"].append(span[0] if span else w.cls_index)
                    out["end_positions"].append(span[1] if span else w.cls_index)
                    for key, value in w.inputs.items():
                        out[key].append(value)
                    out["offset_mapping"].append(w.offsets)
                    out["context_mask"].append(w.context_mask)
                    out["cls_index"].append(w.cls_index)
                    out["example_id"].append(idx[i])
                    if teacher is not None:
                        tw = teacher[i][pick_teacher_window(w.bounds(), t_bounds)]
                        start_map, end_map, covered = map_positions(contexts[i], w, tw)
                        for key, value in tw.inputs.items():
                            out[TEACHER_PREFIX + key].append(value)
                        out[TEACHER_PREFIX + "start_map"].append(start_map)
                        out[TEACHER_PREFIX + "end_map"].append(end_map)
                        out[TEACHER_PREFIX + "covered"].append(covered)
                        coverage[0] += sum(c for c, m in zip(covered, w.context_mask) if m)
                        coverage[1] += sum(w.context_mask)
            for prefix, t in (("", tok), (TEACHER_PREFIX, ttok)):
                if t is not None and "token_type_ids" not in t.model_input_names:
                    del out[prefix + "token_type_ids"]
            out["length"] = [len(ids) for ids in out["input_ids"]]
            return out

        ints = List(Value("int32"))
        schema = {key: ints for key in QA_INPUTS if key in tok.model_input_names}
        schema.update(offset_mapping=List(ints), context_mask=List(Value("int8")))
        schema.update({k: Value("int64") for k in ("start_positions", "end_positions", "cls_index", "example_id", "length")})
        if ttok is not None:
            schema.update({TEACHER_PREFIX + k: ints for k in QA_INPUTS if k in ttok.model_input_names})
            schema.update({k: ints for k in CROSS_MAPS})
            schema[TEACHER_PREFIX + "covered"] = List(Value("int8"))
        features = raw.map(
            encode,
            batched=True,
            with_indices=True,
            remove_columns=raw.column_names,
            features=Features(schema),  # declared types: Arrow skips inferring nested lists
            desc=f"tokenizing {split}",
            new_fingerprint=self.features_fingerprint(raw, split),
        )
        features = features.add_column("feature_id", list(range(len(features))))
        # Counted in this process; the map runs here unless datasets served it from its cache.
        if relocated or dropped:
            logger.warning(
                "%s: %d answers had an answer_start that does not point at their text and were "
                "found elsewhere in the context; %d answers not in the context were left out of "
                "training",
                split, relocated, dropped,
            )
        if coverage[1]:
            share = coverage[0] / coverage[1]
            hint = (
                ". A teacher whose tokenizer needs more tokens for the same text sees less of the "
                "context per window: raise teacher.max_length so its windows cover the student's"
            )
            (logger.warning if share < 0.9 else logger.info)(
                "%s: %.1f%% of the student's context tokens lie inside the teacher window that "
                "gives their window its targets; the others get no KD target%s",
                split, 100 * share, hint if share < 0.9 else "",
            )
        return features

    def features_fingerprint(self, raw: Dataset, split: str) -> str:
        """The base fingerprint plus the teacher's own window sizes (when set apart)."""
        base = super().features_fingerprint(raw, split)
        if self.teacher_tokenizer is None or (self.teacher_max_length, self.teacher_doc_stride) == (None, None):
            return base
        sizes = f"{base}:{self.teacher_max_length}:{self.teacher_doc_stride}"
        return hashlib.sha256(sizes.encode()).hexdigest()[:32]

    def collate(self, features: list[dict]) -> dict[str, torch.Tensor]:
        inputs = [{k: f[k] for k in QA_INPUTS if k in f} for f in features]
        batch = dict(self.tokenizer.pad(inputs, return_tensors="pt"))
        seq = batch["input_ids"].size(1)
        batch["context_mask"] = pad_lists([f["context_mask"] for f in features], 0, seq)  # [batch, seq]
        for key in ("start_positions", "end_positions", "cls_index", "example_id", "feature_id", "length"):
            batch[key] = torch.tensor([f[key] for f in features], dtype=torch.long)  # [batch]
        if self.teacher_tokenizer is not None:
            t_inputs = [{k: f[TEACHER_PREFIX + k] for k in QA_INPUTS if TEACHER_PREFIX + k in f} for f in features]
            padded = self.teacher_tokenizer.pad(t_inputs, return_tensors="pt")
            batch.update({TEACHER_PREFIX + k: v for k, v in padded.items()})  # [batch, t_seq]
            t_seq = padded["input_ids"].size(1)
            left = self.teacher_tokenizer.padding_side == "left"
            for key in CROSS_MAPS:
                rows = [f[key] for f in features]
                if left:  # the maps follow the teacher's tokens wherever its padding goes
                    rows = [[-1] * (t_seq - len(r)) + list(r) for r in rows]
                batch[key] = pad_lists(rows, -1, t_seq)  # [batch, t_seq]
            batch[TEACHER_PREFIX + "covered"] = pad_lists(
                [f[TEACHER_PREFIX + "covered"] for f in features], 0, seq
            )  # [batch, seq]
        return batch

    # --- distillation ---------------------------------------------------------------------
    def kd_targets(self, outputs: Any, batch: dict, teacher: bool) -> dict[str, torch.Tensor]:
        """Start/end logits [batch, seq]. Across tokenizers, the teacher's are log-probabilities
        already moved onto the student's positions, plus `kd_mask` [batch, seq]: the student
        positions that have a target (the student's own `kd_mask` is its KD class mask)."""
        if self.teacher_tokenizer is None:
            return {
                "start_logits": outputs.start_logits,  # [batch, seq]
                "end_logits": outputs.end_logits,  # [batch, seq]
            }
        if not teacher:
            return {
                "start_logits": outputs.start_logits,  # [batch, seq]
                "end_logits": outputs.end_logits,  # [batch, seq]
                "kd_mask": self.kd_class_mask(batch),  # [batch, seq]
            }
        covered = batch[TEACHER_PREFIX + "covered"].bool()  # [batch, seq]
        return {
            "start_logits": move_probabilities(outputs.start_logits, batch["teacher_start_map"], covered),
            "end_logits": move_probabilities(outputs.end_logits, batch["teacher_end_map"], covered),
            "kd_mask": covered,
        }

    def kd_class_mask(self, batch: dict) -> torch.Tensor:
        """Positions that take part in the KD softmaxes: the window's context tokens and CLS."""
        mask = batch["context_mask"].bool().clone()  # [batch, seq]
        rows = torch.arange(mask.size(0), device=mask.device)
        mask[rows, batch["cls_index"]] = True
        return mask

    def kd_pairs(self, student: dict, teacher: dict, batch: dict) -> list[LogitPair]:
        """Start and end distributions over the context tokens of each window, plus CLS.

        CLS stays in the class set: a window that does not hold the answer is trained (by the
        teacher's own fine-tuning) to point at CLS, and the teacher's CLS mass is what tells the
        student how little to trust this window's context. Without CLS the context logits of
        answerless windows would be free up to a shift, and spans from different windows of
        one example (compared by raw logit sums in post-processing) would not be comparable.
        Question tokens, SEP and padding are excluded from both softmaxes. Across tokenizers,
        the class set is further limited to the positions the teacher window covers
        (`kd_mask`), and the teacher's CLS target also holds the mass that fell outside the
        student window.
        """
        mask = self.kd_class_mask(batch)  # [batch, seq]
        seq = mask.size(1)
        if "kd_mask" in teacher:
            mask = mask & _fit_width(teacher["kd_mask"].bool().to(mask.device), seq, False)
        pairs = []
        for key in ("start_logits", "end_logits"):
            s = student[key]  # [batch, seq]
            t = _fit_width(teacher[key].to(s.dtype), seq)  # [batch, seq]
            pairs.append(LogitPair(s, t, class_mask=mask))
        return pairs

    # --- evaluation -----------------------------------------------------------------------
    def eval_outputs(self, outputs: Any, batch: dict) -> dict[str, torch.Tensor]:
        return {
            "start_logits": outputs.start_logits.float(),  # [batch, seq]
            "end_logits": outputs.end_logits.float(),  # [batch, seq]
            "feature_id": batch["feature_id"],  # [batch]
        }

    def _spans(self, outputs: dict[str, np.ndarray], features: Dataset, raw: Dataset) -> list[dict]:
        """Best span per example; with v2, `text` is "" when the null score wins."""
        start = np.asarray(outputs["start_logits"])  # [features, seq]
        end = np.asarray(outputs["end_logits"])  # [features, seq]
        if "feature_id" in outputs:  # put rows in feature order whatever order they came in
            order = np.argsort(np.asarray(outputs["feature_id"]).reshape(-1), kind="stable")
            start, end = start[order], end[order]
        if len(start) != len(features):
            raise ValueError(f"{len(start)} rows of QA outputs for {len(features)} features")
        spans = best_spans(
            start, end, features, raw[self.context_col],
            n_best=self.cfg.task.n_best, max_answer_length=self.cfg.task.max_answer_length,
        )
        for span in spans:
            span["span_text"] = span["text"]
            span["null_score_diff"] = span["null_score"] - span["score"]  # +inf without a span
            if self.cfg.task.version_2_with_negative and span["null_score_diff"] > self.cfg.task.null_score_diff_threshold:
                span["text"] = ""
        return spans

    def compute_metrics(
        self, outputs: dict[str, np.ndarray], features: Dataset, raw: Dataset
    ) -> dict[str, float]:
        """SQuAD exact_match / f1 (normalization from task.normalization) and the number of
        examples whose answer_start does not point at the answer text; with
        `version_2_with_negative`, SQuAD v2's metrics (see `distill.tasks.metrics.squad_v2_metrics`)."""
        spans = self._spans(outputs, features, raw)
        references = [[t for t in a["text"] if t.strip()] for a in raw[self.answers_col]]
        norm = self.cfg.task.normalization
        if self.cfg.task.version_2_with_negative:
            metrics = squad_v2_metrics(
                [s["span_text"] for s in spans],
                [s["null_score_diff"] for s in spans],
                references,
                threshold=self.cfg.task.null_score_diff_threshold,
                normalization=norm,
            )
        else:
            metrics = squad_metrics([s["text"] for s in spans], references, normalization=norm)
        metrics["answer_start_mismatches"] = float(
            sum(
                answer_start_mismatch(c, a["text"], a["answer_start"])
                for c, a in zip(raw[self.context_col], raw[self.answers_col])
            )
        )
        return metrics

    def predictions(self, outputs: dict[str, np.ndarray], features: Dataset, raw: Dataset) -> list:
        spans = self._spans(outputs, features, raw)
        ids = raw[self.id_col] if self.id_col in raw.column_names else list(range(len(raw)))
        rows = []
        for i, span in enumerate(spans):
            row = {
                "example_id": i,
                "id": ids[i],
                "question": raw[i][self.question_col],
                "prediction": span["text"],
                "answers": list(raw[i][self.answers_col]["text"]),
            }
            if self.cfg.task.version_2_with_negative:
                diff = span["null_score_diff"]
                row["null_score_diff"] = diff if math.isfinite(diff) else None  # None: no valid span
            rows.append(row)
        return rows
