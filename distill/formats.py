"""Readers for local files that the `datasets` builders cannot read as they are shipped.

- CoNLL text (`token tag` per line, blank line between sentences, `-DOCSTART-` ignored), as
  CoNLL-2002 NER and many POS corpora come:  -> rows `{tokens: [...], tags: [...]}`.
- SQuAD JSON, either the original nested layout (`data -> paragraphs -> qas`, as MLQA, XQuAD,
  SQAC and TAR ship it) or flat rows (json list / jsonl):  -> flat rows
  `{id, title, context, question, answers: {text: [...], answer_start: [...]}}`, the layout of
  the Hub's SQuAD-style datasets, so the QA task reads one shape whatever the source.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from datasets import Dataset, Features, List, Value

CONLL_FEATURES = Features({"tokens": List(Value("string")), "tags": List(Value("string"))})
SQUAD_FEATURES = Features(
    {
        "id": Value("string"),
        "title": Value("string"),
        "context": Value("string"),
        "question": Value("string"),
        "answers": {"text": List(Value("string")), "answer_start": List(Value("int32"))},
    }
)


def _conll_sentences(path: Path) -> Iterator[dict[str, list[str]]]:
    tokens: list[str] = []
    tags: list[str] = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            fields = line.split()
            if not fields or fields[0] == "-DOCSTART-":
                if tokens:
                    yield {"tokens": tokens, "tags": tags}
                tokens, tags = [], []
                continue
            if len(fields) < 2:
                raise ValueError(
                    f"{path}:{number}: expected 'token tag' (whitespace-separated), got "
                    f"{line.strip()!r}. Each non-blank line needs a token and its tag; "
                    "sentences are separated by blank lines."
                )
            # CoNLL-2002 has `token tag`, CoNLL-2003 `token pos chunk tag`: the tag is last.
            tokens.append(fields[0])
            tags.append(fields[-1])
    if tokens:
        yield {"tokens": tokens, "tags": tags}


def read_conll(path: str | Path) -> Dataset:
    """A CoNLL text file -> Dataset with columns `tokens` and `tags` (tags as strings)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CoNLL file not found: {path}")
    rows = list(_conll_sentences(path))
    if not rows:
        raise ValueError(f"{path}: no sentences found (expected 'token tag' lines)")
    return Dataset.from_list(rows, features=CONLL_FEATURES)


def _answers(raw: Any, where: str) -> dict[str, list]:
    """Answers as a dict of lists, from either a list of {text, answer_start} or a dict of lists."""
    if raw is None:
        return {"text": [], "answer_start": []}
    if isinstance(raw, dict):
        texts, starts = list(raw.get("text", [])), list(raw.get("answer_start", []))
    elif isinstance(raw, list):
        try:
            texts = [a["text"] for a in raw]
            starts = [a["answer_start"] for a in raw]
        except (KeyError, TypeError):
            raise ValueError(
                f"{where}: each answer must be an object with 'text' and 'answer_start', "
                f"got {raw[:2]!r}"
            ) from None
    else:
        raise ValueError(f"{where}: 'answers' must be a list or a dict of lists, got {raw!r}")
    if len(texts) != len(starts):
        raise ValueError(
            f"{where}: {len(texts)} answer texts but {len(starts)} answer_start values"
        )
    return {"text": [str(t) for t in texts], "answer_start": [int(s) for s in starts]}


def _nested_rows(data: list[dict], path: Path) -> Iterator[dict]:
    for a, article in enumerate(data):
        title = str(article.get("title", ""))
        for p, paragraph in enumerate(article.get("paragraphs", [])):
            if "context" not in paragraph:
                raise ValueError(f"{path}: data[{a}].paragraphs[{p}] has no 'context'")
            context = paragraph["context"]
            for q, qa in enumerate(paragraph.get("qas", [])):
                where = f"{path}: data[{a}].paragraphs[{p}].qas[{q}]"
                if "question" not in qa:
                    raise ValueError(f"{where} has no 'question'")
                yield {
                    "id": str(qa.get("id", f"{a}-{p}-{q}")),
                    "title": title,
                    "context": context,
                    "question": qa["question"],
                    "answers": _answers(qa.get("answers"), where),
                }


def _flat_rows(rows: list[dict], path: Path) -> Iterator[dict]:
    for i, row in enumerate(rows):
        where = f"{path}: row {i}"
        if not isinstance(row, dict):
            raise ValueError(f"{where} is not an object: {row!r}")
        missing = [k for k in ("context", "question") if k not in row]
        if missing:
            raise ValueError(
                f"{where} lacks {missing}; flat SQuAD rows need id, title, context, question, "
                f"answers (it has {sorted(row)})"
            )
        yield {
            "id": str(row.get("id", i)),
            "title": str(row.get("title") or ""),
            "context": row["context"],
            "question": row["question"],
            "answers": _answers(row.get("answers"), where),
        }


def read_squad(path: str | Path) -> Dataset:
    """A SQuAD-format file (nested JSON, flat JSON list or jsonl) -> flat rows
    `id, title, context, question, answers{text: list, answer_start: list}`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SQuAD file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        try:
            records: Any = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: line {err.lineno}: not valid JSON ({err.msg})") from None
    else:
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{path}: not valid JSON at line {err.lineno} ({err.msg}); one object per line "
                "needs the .jsonl extension"
            ) from None
    if isinstance(records, dict):
        if "data" not in records:
            raise ValueError(
                f"{path}: a JSON object needs a 'data' list (SQuAD layout); keys: {sorted(records)}"
            )
        records = records["data"]
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a list of articles or rows, got {type(records).__name__}")
    nested = bool(records) and isinstance(records[0], dict) and "paragraphs" in records[0]
    rows = list(_nested_rows(records, path) if nested else _flat_rows(records, path))
    if not rows:
        raise ValueError(f"{path}: no questions found")
    return Dataset.from_list(rows, features=SQUAD_FEATURES)
