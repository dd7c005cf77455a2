"""Readers for local files that the `datasets` builders cannot read as they are shipped, and
the text checks every local reader shares.

- CoNLL text (`token tag` per line, blank line between sentences, `-DOCSTART-` ignored), as
  CoNLL-2002 NER and many POS corpora come:  -> rows `{tokens: [...], tags: [...]}`.
- CoNLL-U, the format Universal Dependencies treebanks ship in (10 tab-separated columns
  ID FORM LEMMA UPOS XPOS FEATS HEAD DEPREL DEPS MISC; `#` comment lines; multiword-token
  lines `3-4` and empty nodes `5.1` skipped):  -> rows
  `{sent_id, tokens: FORM, tags: UPOS, upos: UPOS, xpos: XPOS}` (`_` becomes null). Tagging
  reads `tags` (UPOS) by default; `data.columns: {tags: xpos}` trains on XPOS instead.
- SQuAD JSON, either the original nested layout (`data -> paragraphs -> qas`, as MLQA, XQuAD,
  SQAC and TAR ship it) or flat rows (json list / jsonl):  -> flat rows
  `{id, title, context, question, answers: {text: [...], answer_start: [...]}}`, the layout of
  the Hub's SQuAD-style datasets, so the QA task reads one shape whatever the source.

Every text file is read as UTF-8 with an optional byte-order mark; a byte that is not UTF-8 is
reported with the file and line, never decoded into a wrong character.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator

from datasets import Dataset, Features, List, Value

from distill.errors import DataError

CONLL_FEATURES = Features({"tokens": List(Value("string")), "tags": List(Value("string"))})
CONLLU_FEATURES = Features(
    {
        "sent_id": Value("string"),
        "tokens": List(Value("string")),
        "tags": List(Value("string")),
        "upos": List(Value("string")),
        "xpos": List(Value("string")),
    }
)
SQUAD_FEATURES = Features(
    {
        "id": Value("string"),
        "title": Value("string"),
        "context": Value("string"),
        "question": Value("string"),
        "answers": {"text": List(Value("string")), "answer_start": List(Value("int32"))},
    }
)

BOM = b"\xef\xbb\xbf"
CONLLU_COLUMNS = ("ID", "FORM", "LEMMA", "UPOS", "XPOS", "FEATS", "HEAD", "DEPREL", "DEPS", "MISC")
_WORD_ID = re.compile(r"[1-9][0-9]*")
_MULTIWORD_ID = re.compile(r"[1-9][0-9]*-[1-9][0-9]*")
_EMPTY_NODE_ID = re.compile(r"[0-9]+\.[1-9][0-9]*")


# --- text: UTF-8, byte-order mark, lines ----------------------------------------------------


def _not_utf8(path: Path, line: int, chunk: bytes, err: UnicodeDecodeError) -> DataError:
    byte = chunk[err.start]
    column = err.start - (chunk.rfind(b"\n", 0, err.start) + 1) + 1
    return DataError(
        f"{path}:{line}: not valid UTF-8 (byte 0x{byte:02x} at column {column}). Save the file "
        "as UTF-8, e.g. `iconv -f latin1 -t utf-8 FILE > FILE.utf8` for a Latin-1 file."
    )


def _refuse_utf16(path: Path, head: bytes) -> None:
    if head[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise DataError(
            f"{path}: the file is UTF-16 (it starts with a UTF-16 byte-order mark); save it as "
            "UTF-8, e.g. `iconv -f utf-16 -t utf-8 FILE > FILE.utf8`"
        )


def check_utf8(path: str | Path, chunk_size: int = 1 << 22) -> None:
    """Fail naming the file and line when `path` is not UTF-8 (a leading BOM is fine).

    Run before handing a text file to a `datasets` builder, whose decode errors give neither.
    Reads the file once in chunks cut at line ends, so the line number of a bad byte is exact.
    """
    path = Path(path)
    lines_before, rest = 0, b""
    with path.open("rb") as handle:
        first = True
        while True:
            block = handle.read(chunk_size)
            if first:
                _refuse_utf16(path, block)
                first = False
            data = rest + block
            cut = data.rfind(b"\n") + 1 if block else len(data)
            part, rest = data[:cut], data[cut:]
            try:
                part.decode("utf-8")
            except UnicodeDecodeError as err:
                line = lines_before + part.count(b"\n", 0, err.start) + 1
                raise _not_utf8(path, line, part, err) from None
            lines_before += part.count(b"\n")
            if not block:
                return


def text_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """(line number, line without its end) for every line of a UTF-8 text file; a BOM on the
    first line is dropped, and a byte that is not UTF-8 fails naming the file and line."""
    path = Path(path)
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if number == 1:
                _refuse_utf16(path, raw)
                if raw.startswith(BOM):
                    raw = raw[len(BOM):]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise _not_utf8(path, number, raw, err) from None
            yield number, line.rstrip("\r\n")


def read_text(path: str | Path) -> str:
    """A whole UTF-8 text file as a string, without a leading BOM (errors name the line)."""
    path = Path(path)
    data = path.read_bytes()
    _refuse_utf16(path, data)
    if data.startswith(BOM):
        data = data[len(BOM):]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        start = data.rfind(b"\n", 0, err.start) + 1
        end = data.find(b"\n", err.start)
        chunk = data[start : end if end >= 0 else len(data)]
        moved = UnicodeDecodeError(err.encoding, chunk, err.start - start, err.end - start, err.reason)
        raise _not_utf8(path, line, chunk, moved) from None


# --- CoNLL ------------------------------------------------------------------------------------


def _looks_like_conllu(line: str) -> bool:
    fields = line.split("\t")
    return len(fields) == 10 and bool(
        _WORD_ID.fullmatch(fields[0]) or _MULTIWORD_ID.fullmatch(fields[0]) or _EMPTY_NODE_ID.fullmatch(fields[0])
    )


def _conll_sentences(path: Path) -> Iterator[dict[str, list[str]]]:
    tokens: list[str] = []
    tags: list[str] = []
    for number, line in text_lines(path):
        fields = line.split()
        if not fields or fields[0] == "-DOCSTART-":
            if tokens:
                yield {"tokens": tokens, "tags": tags}
            tokens, tags = [], []
            continue
        if _looks_like_conllu(line):
            raise DataError(
                f"{path}:{number}: this is CoNLL-U (10 tab-separated columns starting with the "
                f"word ID {fields[0]!r}), not 'token tag' CoNLL: read as CoNLL it would train on "
                "the ID column as words. Set data.format=conllu (or name the file *.conllu)."
            )
        if len(fields) < 2:
            raise DataError(
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
        raise DataError(f"{path}: no sentences found (expected 'token tag' lines)")
    return Dataset.from_list(rows, features=CONLL_FEATURES)


def _conllu_value(value: str) -> str | None:
    """CoNLL-U writes an unspecified value as `_`."""
    return None if value == "_" else value


def _conllu_sentences(path: Path) -> Iterator[dict[str, Any]]:
    sentence: dict[str, Any] = {}
    sent_id: str | None = None
    count = 0

    def finish() -> Iterator[dict[str, Any]]:
        nonlocal count
        if sentence.get("tokens"):
            count += 1
            yield {"sent_id": sent_id or str(count), **sentence}

    for number, line in text_lines(path):
        if not line.strip():
            yield from finish()
            sentence, sent_id = {}, None
            continue
        if line.startswith("#"):
            key, _, value = line[1:].partition("=")
            if key.strip() == "sent_id" and not sentence.get("tokens"):
                sent_id = value.strip()
            continue
        fields = line.split("\t")
        if len(fields) != 10:
            # `token tag` (CoNLL-2002) or `token pos chunk tag` (CoNLL-2003) lines
            looks_conll = len(fields) < 10 and 2 <= len(line.split()) <= 4
            hint = " It looks like 'token tag' CoNLL: set data.format=conll." if looks_conll else ""
            raise DataError(
                f"{path}:{number}: expected 10 tab-separated CoNLL-U columns "
                f"({' '.join(CONLLU_COLUMNS)}), got {len(fields)}: {line[:80]!r}.{hint}"
            )
        word_id = fields[0]
        if _MULTIWORD_ID.fullmatch(word_id) or _EMPTY_NODE_ID.fullmatch(word_id):
            continue  # `del` = `de` + `el`: the words follow on their own lines; empty nodes have no form
        if not _WORD_ID.fullmatch(word_id):
            raise DataError(
                f"{path}:{number}: the ID column holds {word_id!r}; CoNLL-U word lines start with "
                "1, 2, 3, ... (multiword tokens '3-4', empty nodes '5.1')"
            )
        tokens = sentence.setdefault("tokens", [])
        if int(word_id) != len(tokens) + 1:
            raise DataError(
                f"{path}:{number}: word ID {word_id} where {len(tokens) + 1} was expected; each "
                "sentence numbers its words from 1 and ends with a blank line"
            )
        tokens.append(fields[1])
        upos, xpos = _conllu_value(fields[3]), _conllu_value(fields[4])
        sentence.setdefault("tags", []).append(upos)
        sentence.setdefault("upos", []).append(upos)
        sentence.setdefault("xpos", []).append(xpos)
    yield from finish()


def read_conllu(path: str | Path) -> Dataset:
    """A CoNLL-U file -> Dataset with columns `sent_id`, `tokens` (FORM), `tags` and `upos`
    (UPOS), `xpos` (XPOS); one row per sentence, unspecified (`_`) tags as null."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CoNLL-U file not found: {path}")
    rows = list(_conllu_sentences(path))
    if not rows:
        raise DataError(f"{path}: no sentences found (expected CoNLL-U word lines)")
    return Dataset.from_list(rows, features=CONLLU_FEATURES)


# --- SQuAD ------------------------------------------------------------------------------------


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
            raise DataError(
                f"{where}: each answer must be an object with 'text' and 'answer_start', "
                f"got {raw[:2]!r}"
            ) from None
    else:
        raise DataError(f"{where}: 'answers' must be a list or a dict of lists, got {raw!r}")
    if len(texts) != len(starts):
        raise DataError(
            f"{where}: {len(texts)} answer texts but {len(starts)} answer_start values"
        )
    return {"text": [str(t) for t in texts], "answer_start": [int(s) for s in starts]}


def _nested_rows(data: list[dict], path: Path) -> Iterator[dict]:
    for a, article in enumerate(data):
        title = str(article.get("title", ""))
        for p, paragraph in enumerate(article.get("paragraphs", [])):
            if "context" not in paragraph:
                raise DataError(f"{path}: data[{a}].paragraphs[{p}] has no 'context'")
            context = paragraph["context"]
            for q, qa in enumerate(paragraph.get("qas", [])):
                where = f"{path}: data[{a}].paragraphs[{p}].qas[{q}]"
                if "question" not in qa:
                    raise DataError(f"{where} has no 'question'")
                yield {
                    "id": str(qa.get("id", f"{a}-{p}-{q}")),
                    "title": title,
                    "context": context,
                    "question": qa["question"],
                    "answers": _answers(qa.get("answers"), where),
                }


def _flat_rows(rows: list[Any], path: Path, lines: list[int] | None = None) -> Iterator[dict]:
    for i, row in enumerate(rows):
        where = f"{path}:{lines[i]}: row {i}" if lines else f"{path}: row {i}"
        if not isinstance(row, dict):
            raise DataError(f"{where} is not an object: {row!r}")
        missing = [k for k in ("context", "question") if k not in row]
        if missing:
            raise DataError(
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
    lines: list[int] | None = None
    if path.suffix == ".jsonl":
        records: Any = []
        lines = []
        for number, line in text_lines(path):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number}: not valid JSON ({err.msg})") from None
            lines.append(number)
    else:
        try:
            records = json.loads(read_text(path))
        except json.JSONDecodeError as err:
            raise DataError(
                f"{path}: not valid JSON at line {err.lineno} ({err.msg}); one object per line "
                "needs the .jsonl extension"
            ) from None
    if isinstance(records, dict):
        if "data" not in records:
            raise DataError(
                f"{path}: a JSON object needs a 'data' list (SQuAD layout); keys: {sorted(records)}"
            )
        records = records["data"]
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a list of articles or rows, got {type(records).__name__}")
    nested = bool(records) and isinstance(records[0], dict) and "paragraphs" in records[0]
    rows = list(_nested_rows(records, path) if nested else _flat_rows(records, path, lines))
    if not rows:
        raise DataError(f"{path}: no questions found")
    return Dataset.from_list(rows, features=SQUAD_FEATURES)
