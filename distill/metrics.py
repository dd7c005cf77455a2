"""Task metrics: SQuAD exact match / F1 (official normalization, or MLQA's Spanish rules),
seqeval entity scores and token accuracy for tagging.

All scores are fractions in [0, 1] (like classification accuracy); tables that follow the
papers' percentages multiply by 100 when they print.
"""

from __future__ import annotations

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
