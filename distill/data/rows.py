"""The roles of a task's raw columns, the words of raw text and where an answer lies in its
context: shared by the tasks, transfer sets (data/transfer.py) and augmentation (data/augment.py)."""

from __future__ import annotations

from typing import Mapping

import regex

from distill.errors import DataError

GOLD_ROLE = {"classification": "label", "tagging": "tags", "qa": "answers"}

# The word-split rule for raw text (tagging transfer sets, and the words augmentation replaces):
#   1. numbers with inner separators stay one word:       3,5   1.000.000   12:30
#   2. runs of letters, marks and digits, joined by inner hyphens or apostrophes, are one word:
#      canción   franco-alemán   l'ordinador   COVID-19
#   3. any other non-space character is a word of its own: ¿ ? ¡ ! , . ; " ( ) € %
# Whitespace only separates. "¿Dónde está?" -> ["¿", "Dónde", "está", "?"].
WORD_PATTERN = regex.compile(
    r"\p{N}+(?:[.,:]\p{N}+)+"
    r"|[\p{L}\p{M}\p{N}]+(?:[-'’][\p{L}\p{M}\p{N}]+)*"
    r"|\S"
)


def word_spans(text: str) -> list[tuple[int, int]]:
    """Character spans [start, end) of the words of `text` (see WORD_PATTERN for the rule)."""
    return [m.span() for m in WORD_PATTERN.finditer(text)]


def split_words(text: str) -> list[str]:
    """Raw text -> words by the documented rule: `split_words("¿Dónde está?")` =
    ["¿", "Dónde", "está", "?"]."""
    return [text[s:e] for s, e in word_spans(text)]


def task_columns(family: str, columns: Mapping[str, str]) -> dict[str, str]:
    """Role -> raw column of the task (its `data.columns` with the families' defaults)."""
    if family == "classification":
        out = {"text": columns.get("text", "text"), "label": columns.get("label", "label")}
        if columns.get("text_pair"):
            out["text_pair"] = columns["text_pair"]
        return out
    if family == "tagging":
        return {"tokens": columns.get("tokens", "tokens"), "tags": columns.get("tags", "tags")}
    if family == "qa":
        return {
            "id": columns.get("id", "id"),
            "question": columns.get("question", "question"),
            "context": columns.get("context", "context"),
            "answers": columns.get("answers", "answers"),
        }
    raise DataError(f"task.family={family!r} is not one of: classification, tagging, qa")


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
