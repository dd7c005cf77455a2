"""Task metrics: SQuAD exact match / F1 (official normalization, or MLQA's Spanish rules; SQuAD
v2 with unanswerable questions and its best-threshold search),
seqeval entity scores and token accuracy for tagging.

All scores are fractions in [0, 1] (like classification accuracy); tables that follow the
papers' percentages multiply by 100 when they print.
"""

from __future__ import annotations

import math
import re
import string
import unicodedata
import warnings
from collections import Counter
from typing import Iterable, Sequence

from seqeval.metrics import f1_score, precision_score, recall_score

NORMALIZATIONS = ("squad", "mlqa")
_ARTICLES = {
    "squad": re.compile(r"\b(a|an|the)\b"),
    "mlqa": re.compile(r"\b(un|una|unos|unas|el|la|los|las)\b"),  # MLQA's Spanish articles
}
_ASCII_PUNCT = frozenset(string.punctuation)


def _is_punct(ch: str, unicode_punct: bool) -> bool:
    # MLQA strips every Unicode punctuation character (category P*: ¿ ¡ « » — ...) besides
    # ASCII punctuation; the SQuAD script strips ASCII punctuation only.
    if ch in _ASCII_PUNCT:
        return True
    return unicode_punct and unicodedata.category(ch).startswith("P")


def normalize_answer(text: str, normalization: str = "squad") -> str:
    """Lowercase, drop punctuation, drop articles, collapse whitespace (the official order).

    `squad`: ASCII punctuation and English articles (SQuAD v1.1 script); `mlqa`: Unicode
    punctuation and Spanish articles el/la/los/las/un/una/unos/unas (MLQA's script for es).
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(
            f"unknown answer normalization {normalization!r}; use one of {NORMALIZATIONS}"
        )
    text = text.lower()
    text = "".join(ch for ch in text if not _is_punct(ch, normalization == "mlqa"))
    text = _ARTICLES[normalization].sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, truth: str, normalization: str = "squad") -> float:
    """1.0 when the normalized strings are equal, else 0.0."""
    return float(normalize_answer(prediction, normalization) == normalize_answer(truth, normalization))


def token_f1(prediction: str, truth: str, normalization: str = "squad") -> float:
    """Bag-of-tokens F1 between normalized prediction and truth (0 when nothing is shared)."""
    pred = normalize_answer(prediction, normalization).split()
    gold = normalize_answer(truth, normalization).split()
    common = Counter(pred) & Counter(gold)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def squad_metrics(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    normalization: str = "squad",
) -> dict[str, float]:
    """Mean over examples of the best EM / F1 against any reference answer.

    Examples without reference answers cannot be scored and are left out; `examples` says how
    many were scored.
    """
    if len(predictions) != len(references):
        raise ValueError(
            f"{len(predictions)} predictions for {len(references)} references; one each expected"
        )
    em_total = f1_total = 0.0
    scored = 0
    for pred, truths in zip(predictions, references):
        if not truths:
            continue
        scored += 1
        em_total += max(exact_match(pred, t, normalization) for t in truths)
        f1_total += max(token_f1(pred, t, normalization) for t in truths)
    return {
        "exact_match": em_total / scored if scored else 0.0,
        "f1": f1_total / scored if scored else 0.0,
        "examples": float(scored),
    }


def _best_threshold(
    raw_scores: Sequence[float], diffs: Sequence[float], has_answer: Sequence[bool], answered: Sequence[bool]
) -> tuple[float, float]:
    """(best mean score, its threshold) over every threshold t of the rule "no answer when
    diff > t" (SQuAD v2's `find_best_thresh`, with equal diffs moved together).

    Starting from "every question unanswered" (each no-answer question scores 1), answering the
    questions in increasing diff order adds an answerable question's raw score and costs an
    unanswerable one its point when a span was predicted (`answered`). Questions with an
    infinite diff (no valid span) are never answered. When answering nothing is best the
    threshold lies below every finite diff (the smallest minus 1).
    """
    n = len(raw_scores)
    current = best = float(sum(not h for h in has_answer))
    finite = sorted((d, i) for i, d in enumerate(diffs) if math.isfinite(d))
    threshold = (finite[0][0] - 1.0) if finite else 0.0
    k = 0
    while k < len(finite):
        d = finite[k][0]
        while k < len(finite) and finite[k][0] == d:
            i = finite[k][1]
            current += raw_scores[i] if has_answer[i] else -float(answered[i])
            k += 1
        if current > best:
            best, threshold = current, d
    return (best / n if n else 0.0), threshold


def squad_v2_metrics(
    span_texts: Sequence[str],
    null_score_diffs: Sequence[float],
    references: Sequence[Sequence[str]],
    threshold: float = 0.0,
    normalization: str = "squad",
) -> dict[str, float]:
    """SQuAD v2 scores, with unanswerable questions (no reference answer).

    Each question has its best non-null span (`span_texts`, "" when none is valid) and
    `null_score_diffs` = null score - best span score; it is answered "" (no answer) when
    diff > `threshold`. An answerable question scores its best EM / F1 against the references
    (0 for ""); an unanswerable one scores 1 when the answer normalizes to "" and 0 otherwise.
    Returns exact_match / f1 over all questions, the same over `has_answer_*` and `no_answer_*`
    questions with their counts, and `best_exact_match` / `best_f1` with the threshold that
    reaches each (the official script's best-threshold search).
    """
    if not len(span_texts) == len(null_score_diffs) == len(references):
        raise ValueError(
            f"{len(span_texts)} spans, {len(null_score_diffs)} null score differences and "
            f"{len(references)} references; one each per question expected"
        )
    has = [bool(refs) for refs in references]
    raw = {"exact_match": [], "f1": []}  # scores of the non-null span
    final = {"exact_match": [], "f1": []}  # scores after the threshold
    answered = [bool(normalize_answer(t, normalization)) for t in span_texts]
    for text, diff, refs, answerable in zip(span_texts, null_score_diffs, references, has):
        for key, fn in (("exact_match", exact_match), ("f1", token_f1)):
            if answerable:
                score = max(fn(text, r, normalization) for r in refs)
                raw[key].append(score)
                final[key].append(0.0 if diff > threshold else score)
            else:
                empty = not normalize_answer(text, normalization)
                raw[key].append(float(empty))
                final[key].append(1.0 if diff > threshold or empty else 0.0)
    n = len(references)
    n_has = sum(has)
    out: dict[str, float] = {"examples": float(n), "has_answer_examples": float(n_has), "no_answer_examples": float(n - n_has)}
    for key in ("exact_match", "f1"):
        out[key] = sum(final[key]) / n if n else 0.0
        out[f"has_answer_{key}"] = sum(v for v, h in zip(final[key], has) if h) / n_has if n_has else 0.0
        out[f"no_answer_{key}"] = sum(v for v, h in zip(final[key], has) if not h) / (n - n_has) if n > n_has else 0.0
        out[f"best_{key}"], out[f"best_{key}_threshold"] = _best_threshold(raw[key], null_score_diffs, has, answered)
    return out


def answer_start_mismatch(context: str, texts: Sequence[str], starts: Sequence[int]) -> bool:
    """True when some answer's `answer_start` does not point at its text in the context."""
    return any(context[s : s + len(t)] != t for t, s in zip(texts, starts))


def is_bio(labels: Iterable[str]) -> bool:
    """Whether every label is O or has a B-/I-/E-/S- prefix (entity tags seqeval understands)."""
    return all(l == "O" or (len(l) > 2 and l[0] in "BIES" and l[1] == "-") for l in labels)


def seqeval_metrics(
    y_true: Sequence[Sequence[str]], y_pred: Sequence[Sequence[str]]
) -> dict[str, float]:
    """Entity-level precision / recall / F1 with seqeval's default (conlleval) rules.

    On non-BIO tags (UPOS) seqeval's number is not an entity score, but it is what published
    POS results report, so it is computed anyway; its per-tag warnings are silenced.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*seems not to be NE tag")
        warnings.filterwarnings("ignore", category=UserWarning, module="seqeval")
        return {
            "f1": float(f1_score(y_true, y_pred, zero_division=0)),
            "precision": float(precision_score(y_true, y_pred, zero_division=0)),
            "recall": float(recall_score(y_true, y_pred, zero_division=0)),
        }


def token_accuracy(y_true: Sequence[Sequence[str]], y_pred: Sequence[Sequence[str]]) -> float:
    """Fraction of words whose predicted tag equals the gold tag, over all sentences."""
    total = correct = 0
    for i, (gold, pred) in enumerate(zip(y_true, y_pred)):
        if len(gold) != len(pred):
            raise ValueError(f"sentence {i}: {len(gold)} gold tags but {len(pred)} predicted")
        total += len(gold)
        correct += sum(g == p for g, p in zip(gold, pred))
    return correct / total if total else 0.0
