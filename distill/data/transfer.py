"""Transfer sets: unlabelled rows the teacher labels for the student, and the student's training
rows built from them (labelled ∪ transfer ∪ augmented).

A transfer source is a `data.transfer` entry: local `files` or a Hub `source`, with the task's
input columns (classification: text [+ text_pair]; tagging: pre-split tokens or raw text split
by `split_words`; QA: question + context). Its rows get the task's raw columns, a gold-label
placeholder the task's `preprocess` accepts, and `has_gold=False`:

    classification  {"premise": "Llegó tarde.", "hypothesis": "No llegó.", "label": <placeholder>,
                     "has_gold": false}
    tagging         {"tokens": ["Llegó", "a", "Lima", "."], "tags": ["O", "O", "O", "O"], "has_gold": false}
    qa              {"id": "transfer0-17", "question": "...", "context": "...",
                     "answers": {"text": [], "answer_start": []}, "has_gold": false}

The leak filter drops every non-gold row (transfer or augmented) whose normalised text equals a
validation or test row (evaluation must never see its own rows in training) and every row that
repeats a labelled training row or an earlier non-gold row (a duplicate only re-weights a row).
Normalisation: Unicode NFKC, casefold, all whitespace removed; pairs compare both sides, QA the
question and the context; tagging the words joined. Rows are compared by a 64-bit hash of that
key (numpy arrays, so 8M rows cost 64 MB, not a Python set of strings).

`build_student_train_rows` is the one call the data pipeline makes; `mark_gold` then carries
`has_gold` from raw rows to features and puts the ignore index in their gold targets, and
`GoldCollate` puts it in every batch. `check_transfer` is the preflight check of the entries.

Reading every kind of transfer source, the leak filter and the per-row gold mask agree on the
same row keys and columns. Transfer rows never carry labels: the teacher labels them.
"""

from __future__ import annotations

import hashlib
import logging
import unicodedata
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np
from datasets import Dataset, DatasetDict, Features, LargeList, List, Value, concatenate_datasets, load_dataset

from distill.errors import DataError
from distill.data.rows import GOLD_ROLE, split_words, task_columns

log = logging.getLogger("distill")

HAS_GOLD = "has_gold"  # bool column: True on labelled rows, False on transfer and augmented rows
IGNORE_INDEX = -100  # classification / tagging labels of rows without gold (the CE skips them)
# QA start/end positions of rows without gold: beyond any sequence, so the QA head's loss (which
# clamps positions to the sequence length and ignores that index) skips them.
IGNORE_POSITION = 1 << 30
EVAL_SPLITS = ("validation", "test")

def _train_columns(family: str, cols: dict[str, str], train: Dataset) -> list[str]:
    """The raw columns the task reads (QA's id only when the split has one)."""
    out = [c for role, c in cols.items() if not (family == "qa" and role == "id")]
    missing = [c for c in out if c not in train.column_names]
    if missing:
        raise DataError(
            f"the training split has no column(s) {missing}; it has {train.column_names}. "
            "Map them with data.columns.<role>=<column>"
        )
    if family == "qa" and cols["id"] in train.column_names:
        out.append(cols["id"])
    return [c for c in train.column_names if c in out]  # the split's own column order


def gold_placeholder(family: str, train: Dataset, label_col: str) -> Any:
    """A gold value the task's preprocess accepts for rows without one (masked out of the loss):
    classification: the first training row's label; tagging: the first training tag (repeated
    per word); QA: no answer."""
    if family == "qa":
        return {"text": [], "answer_start": []}
    if family == "classification":
        return train[0][label_col]
    for tags in train.select_columns([label_col]).iter(batch_size=256):
        for row in tags[label_col]:
            if row:
                return row[0]
    raise DataError(f"the training split's column '{label_col}' holds no tags")


# ---------------------------------------------------------------------------------------------
# Keys: normalised text, hashed to 64 bits
# ---------------------------------------------------------------------------------------------


def normalize(text: Any) -> str:
    """NFKC, casefold, every whitespace removed: the text a leak or duplicate is judged on."""
    return "".join(unicodedata.normalize("NFKC", str(text or "")).casefold().split())


def _key_parts(family: str, cols: dict[str, str], batch: dict, i: int) -> str:
    if family == "classification":
        key = normalize(batch[cols["text"]][i])
        if "text_pair" in cols:
            key += "\x1f" + normalize(batch[cols["text_pair"]][i])
        return key
    if family == "tagging":
        return normalize("".join(str(w) for w in batch[cols["tokens"]][i]))
    return normalize(batch[cols["question"]][i]) + "\x1f" + normalize(batch[cols["context"]][i])


def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def row_keys(ds: Dataset, family: str, cols: dict[str, str], batch_size: int = 10_000) -> np.ndarray:
    """One uint64 key per row of `ds` ([rows]), read in batches."""
    roles = {"classification": ("text", "text_pair"), "tagging": ("tokens",), "qa": ("question", "context")}
    needed = [cols[r] for r in roles[family] if r in cols]
    out = np.empty(len(ds), dtype=np.uint64)
    at = 0
    for batch in ds.select_columns(needed).iter(batch_size=batch_size):
        n = len(batch[needed[0]])
        out[at : at + n] = [_hash64(_key_parts(family, cols, batch, i)) for i in range(n)]
        at += n
    return out


def context_keys(ds: Dataset, context_col: str, batch_size: int = 10_000) -> np.ndarray:
    out = np.empty(len(ds), dtype=np.uint64)
    at = 0
    for batch in ds.select_columns([context_col]).iter(batch_size=batch_size):
        values = batch[context_col]
        out[at : at + len(values)] = [_hash64(normalize(v)) for v in values]
        at += len(values)
    return out


def filter_rows(
    keys: np.ndarray, eval_keys: np.ndarray, seen_keys: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Which rows to keep, given their keys ([rows] uint64).

    Returns (kept, leaked, duplicates) row indices: `leaked` rows equal an evaluation row;
    `duplicates` (of the rest) equal a row in `seen_keys` or an earlier row of `keys`.
    """
    leak = np.isin(keys, eval_keys)  # [rows]
    first = np.zeros(len(keys), dtype=bool)  # [rows]
    first[np.unique(keys, return_index=True)[1]] = True
    dup = ~leak & (np.isin(keys, seen_keys) | ~first)  # [rows]
    return np.flatnonzero(~leak & ~dup), np.flatnonzero(leak), np.flatnonzero(dup)


# ---------------------------------------------------------------------------------------------
# Reading transfer sources
# ---------------------------------------------------------------------------------------------

TEXT_FEATURES = Features({"text": Value("string")})
TOKENS_FEATURES = Features({"tokens": List(Value("string"))})
_TRANSFER_EXT = {".txt": "text", ".text": "text", ".conll": "conll"}


def _text_lines(path: str, stamp: Any) -> Iterator[dict]:
    """One example per non-empty line (`stamp` only keys the datasets cache to the file)."""
    with open(path, encoding="utf-8-sig") as handle:
        for line in handle:
            line = line.strip()
            if line:
                yield {"text": line}


def _conll_tokens(path: str, stamp: Any) -> Iterator[dict]:
    """CoNLL-style text: one token per line (its first field; tags, if any, ignored), a blank
    line between sentences, -DOCSTART- lines skipped."""
    tokens: list[str] = []
    with open(path, encoding="utf-8-sig") as handle:
        for line in handle:
            fields = line.split()
            if not fields or fields[0] == "-DOCSTART-":
                if tokens:
                    yield {"tokens": tokens}
                tokens = []
                continue
            tokens.append(fields[0])
    if tokens:
        yield {"tokens": tokens}


def read_transfer_file(path: str | Path, fmt: Optional[str], where: str) -> Dataset:
    """A local file of unlabelled rows: `text` (one example per line; the default for .txt),
    `conll` (tokens, tags optional) or any format `distill.data.read.read_file` reads."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{where}: file not found: {path}")
    fmt = fmt or _TRANSFER_EXT.get(path.suffix.lower())
    if fmt in ("text", "conll"):
        from distill.data.formats import check_utf8

        try:  # the generator's decode error would reach the user as "error generating the dataset"
            check_utf8(path)
        except DataError as err:
            raise DataError(f"{where}: {err}") from None
        stat = path.stat()
        generator, features = (_text_lines, TEXT_FEATURES) if fmt == "text" else (_conll_tokens, TOKENS_FEATURES)
        try:
            return Dataset.from_generator(
                generator,
                features=features,
                gen_kwargs={"path": str(path.resolve()), "stamp": (stat.st_size, stat.st_mtime_ns)},
            )
        except Exception as err:  # an empty file gives an empty generator
            if stat.st_size == 0 or "corresponds to no data" in str(err) or "empty" in str(err).lower():
                return Dataset.from_dict({k: [] for k in features}, features=features)
            raise DataError(f"{where}: could not read {path} as {fmt}: {err}") from None
    from distill.data import read as data_mod

    try:
        return data_mod.read_file(path, fmt)
    except DataError as err:
        raise DataError(f"{where}: {err}") from None
    except ValueError as err:  # the format readers' own messages name the line
        raise DataError(f"{where}: {err}") from None


def _read_hub(source: str, name: Optional[str], split: str, revision: Optional[str], where: str) -> Dataset:
    try:
        return load_dataset(source, name, split=split, revision=revision)
    except Exception as err:
        from distill.data.read import hub_failure

        raise DataError(
            f"{where}: cannot load split '{split}' of dataset '{source}'"
            + (f" (config '{name}')" if name else "")
            + (f" at revision '{revision}'" if revision else "")
            + f": {hub_failure(err)}. Check its source / name / split / revision, or use local files."
        ) from None


def read_transfer_source(src: Any, index: int) -> Dataset:
    """The rows of one `data.transfer` entry as they are stored (columns not yet mapped)."""
    where = f"data.transfer[{index}]"
    if src.files:
        parts = [read_transfer_file(f, src.format, where) for f in src.files]
        first = parts[0]
        for f, part in zip(src.files[1:], parts[1:]):
            if sorted(part.column_names) != sorted(first.column_names):
                raise DataError(
                    f"{where}: {f} has columns {part.column_names} but {src.files[0]} has "
                    f"{first.column_names}; the files of one entry must share their columns"
                )
        ds = concatenate_datasets([p.cast(first.features) for p in parts]) if len(parts) > 1 else first
    elif Path(src.source).is_file():
        ds = read_transfer_file(src.source, src.format, where)
    else:
        ds = _read_hub(src.source, src.name, src.split, src.revision, where)
    if src.max_samples:
        ds = ds.select(range(min(src.max_samples, len(ds))))
    return ds


def _source_column(ds: Dataset, where: str, role: str, col: str) -> str:
    if col not in ds.column_names:
        raise DataError(
            f"{where}: no column '{col}' for {role}; the source has {ds.column_names}. "
            f"Map it with {where}.columns.{role}=<column>"
        )
    return col


def _check_text_column(ds: Dataset, where: str, role: str, col: str, words: bool) -> None:
    """Refuse a mapped column whose values are not text (numbers, lists, nulls): read as text
    they would become their digits or their repr (labelled columns are refused alike)."""
    feature = ds.features[col]
    if words and getattr(feature, "dtype", None) in ("string", "large_string"):
        return  # text where words are expected: map_transfer_rows says to map it as text
    inner = getattr(feature, "feature", None) if words else feature
    if words and not isinstance(feature, (List, LargeList)):
        inner = None
    if getattr(inner, "dtype", None) in ("string", "large_string"):
        return
    values = ds.select_columns([col]).select(range(min(len(ds), 1000)))[col]
    row, value = next(((i, v) for i, v in enumerate(values) if v is not None), (0, None))
    kind = "only nulls" if value is None else f"{type(value).__name__} values (row {row}: {str(value)[:60]!r})"
    want = "lists of words" if words else "text"
    raise DataError(
        f"{where}: column '{col}' ({role}) holds {kind}, not {want}: read as text they would train "
        f"the student on their repr. Map the right column with {where}.columns.{role}=<column> "
        f"(the source has {ds.column_names})"
    )


def map_transfer_rows(
    ds: Dataset,
    family: str,
    cols: dict[str, str],
    entry_columns: Mapping[str, str],
    template: Features,
    placeholder: Any,
    index: int,
) -> Dataset:
    """Source rows -> the task's raw columns (`template` types) + a gold placeholder +
    `has_gold=False`. Rows with an empty text are dropped."""
    where = f"data.transfer[{index}]"
    if len(ds) == 0:
        raise DataError(f"{where} holds no rows")
    mapping: dict[str, str] = {}  # task role -> source column
    split_text = False
    if family == "classification":
        for role in ("text", "text_pair"):
            if role in cols:
                mapping[role] = _source_column(ds, where, role, entry_columns.get(role, cols[role]))
        if "text_pair" in entry_columns and "text_pair" not in cols:
            raise DataError(
                f"{where}.columns.text_pair is set but the task has no text pair (data.columns.text_pair)"
            )
    elif family == "tagging":
        tokens_col = entry_columns.get("tokens", cols["tokens"])
        if "text" in entry_columns:
            split_text, mapping["tokens"] = True, _source_column(ds, where, "text", entry_columns["text"])
        elif tokens_col in ds.column_names:
            mapping["tokens"] = tokens_col
        elif "text" in ds.column_names:
            split_text, mapping["tokens"] = True, "text"
            log.info("%s: no '%s' column; splitting its 'text' column into words", where, tokens_col)
        else:
            raise DataError(
                f"{where}: no column '{tokens_col}' of pre-split tokens and no 'text' column; the "
                f"source has {ds.column_names}. Map one with {where}.columns.tokens=<column> "
                f"(lists of words) or {where}.columns.text=<column> (raw text, split into words)"
            )
    else:
        for role in ("question", "context"):
            mapping[role] = _source_column(ds, where, role, entry_columns.get(role, cols[role]))
        id_col = entry_columns.get("id", cols["id"])
        if "id" in entry_columns:
            _source_column(ds, where, "id", id_col)
        if id_col in ds.column_names:
            mapping["id"] = id_col

    for role, col in mapping.items():
        if role != "id":
            _check_text_column(ds, where, "text" if split_text else role, col, words=family == "tagging" and not split_text)
    first = ds[0]
    if family == "tagging" and not split_text:
        value = first[mapping["tokens"]]
        if not isinstance(value, (list, tuple)):
            raise DataError(
                f"{where}: column '{mapping['tokens']}' holds {type(value).__name__} values, not "
                f"lists of words; for raw text use {where}.columns.text={mapping['tokens']}"
            )
    out_features = Features({**template, HAS_GOLD: Value("bool")})
    gold_col = cols[GOLD_ROLE[family]]
    id_feature = template.get(cols["id"]) if family == "qa" else None
    string_ids = getattr(id_feature, "dtype", "") in ("string", "large_string")

    def convert(batch: dict, idx: list[int]) -> dict:
        out: dict[str, list] = {name: [] for name in out_features}
        for i, row_index in enumerate(idx):
            if family == "classification":
                texts = {r: batch[c][i] for r, c in mapping.items()}
                if any(t is None or not str(t).strip() for t in texts.values()):
                    continue
                for role, text in texts.items():
                    out[cols[role]].append(str(text))
                out[gold_col].append(placeholder)
            elif family == "tagging":
                value = batch[mapping["tokens"]][i]
                if value is None:
                    continue
                if split_text:
                    words = split_words(str(value))
                else:
                    if isinstance(value, str):
                        raise DataError(
                            f"{where}: row {row_index} of column '{mapping['tokens']}' is a string, "
                            "not a list of words"
                        )
                    words = [str(w) for w in value if w is not None and str(w).strip()]
                if not words:
                    continue
                out[cols["tokens"]].append(words)
                out[gold_col].append([placeholder] * len(words))
            else:
                question, context = batch[mapping["question"]][i], batch[mapping["context"]][i]
                if not question or not str(question).strip() or not context or not str(context).strip():
                    continue
                out[cols["question"]].append(str(question))
                out[cols["context"]].append(str(context))
                out[gold_col].append(placeholder)
                if cols["id"] in out_features:
                    given = batch[mapping["id"]][i] if "id" in mapping else None
                    if string_ids:
                        given = f"transfer{index}-{row_index}" if given is None else str(given)
                    out[cols["id"]].append(given)
            out[HAS_GOLD].append(False)
        return out

    return ds.map(
        convert,
        batched=True,
        with_indices=True,
        remove_columns=ds.column_names,
        features=out_features,
        desc=f"reading data.transfer[{index}]",
    )


# ---------------------------------------------------------------------------------------------
# The student's training rows
# ---------------------------------------------------------------------------------------------


def _log_filter(what: str, total: int, leaked: np.ndarray, dups: np.ndarray, empty: int, rows: Dataset) -> None:
    log.info(
        "%s: %d rows; dropped %d that duplicate validation/test rows, %d that repeat a training "
        "or earlier row, %d empty",
        what, total, len(leaked), len(dups), empty,
    )
    if len(leaked):
        shown = rows.select(leaked[:3].tolist())
        log.info("%s: first rows dropped as evaluation leaks: %s", what, [dict(r) for r in shown])


def build_student_train_rows(
    raw: DatasetDict,
    family: str,
    columns: Mapping[str, str],
    transfer: Sequence[Any] = (),
    augment: Any = None,
    augment_model: Optional[str] = None,
    cache_dir: str | Path = "augment_cache",
    seed: int = 42,
    train_split: str = "train",
) -> tuple[Dataset, dict[str, int]]:
    """The student's training rows: labelled ∪ transfer ∪ augmented, with `has_gold`.

    raw: the task's raw splits (train + the evaluation splits the leak filter compares with).
    columns: the task's `data.columns`. transfer: `data.transfer` entries. augment: the
    `augment` section (None or copies=0: off); augment_model: the model whose vocabulary and
    embeddings (or MLM head) propose words when `augment.model` is unset (the teacher).
    Labelled rows come first (row i < counts["labelled"] has gold), keeping only the task's
    columns. Returns the rows and {labelled, transfer, augmented, leaked_dropped,
    duplicates_dropped, empty_dropped}.
    """
    if train_split not in raw:
        raise DataError(f"no '{train_split}' split to add transfer rows to; splits: {list(raw)}")
    cols = task_columns(family, columns)
    train = raw[train_split]
    keep = _train_columns(family, cols, train)
    template = Features({c: train.features[c] for c in keep})
    labelled = train.select_columns(keep)
    labelled = labelled.add_column(HAS_GOLD, np.ones(len(labelled), dtype=bool))
    counts = {
        "labelled": len(labelled), "transfer": 0, "augmented": 0,
        "leaked_dropped": 0, "duplicates_dropped": 0, "empty_dropped": 0,
    }
    evals = [raw[s] for s in raw if s != train_split]
    eval_keys = (
        np.unique(np.concatenate([row_keys(ds, family, cols) for ds in evals]))
        if evals else np.empty(0, dtype=np.uint64)
    )
    eval_contexts = (
        np.unique(np.concatenate([context_keys(ds, cols["context"]) for ds in evals]))
        if family == "qa" and evals else None
    )
    seen = np.unique(row_keys(labelled, family, cols))
    placeholder = gold_placeholder(family, train, cols[GOLD_ROLE[family]])

    def add_filtered(rows: Dataset, what: str, empty: int = 0) -> Dataset:
        nonlocal seen
        keys = row_keys(rows, family, cols)
        kept, leaked, dups = filter_rows(keys, eval_keys, seen)
        _log_filter(what, len(rows) + empty, leaked, dups, empty, rows)
        if eval_contexts is not None and len(kept):
            shared = int(np.isin(context_keys(rows.select(kept), cols["context"]), eval_contexts).sum())
            if shared:
                log.info("%s: %d kept rows ask other questions about a validation/test context", what, shared)
        counts["leaked_dropped"] += len(leaked)
        counts["duplicates_dropped"] += len(dups)
        counts["empty_dropped"] += empty
        seen = np.unique(np.concatenate([seen, keys[kept]]))
        return rows if len(kept) == len(rows) else rows.select(kept)

    parts = [labelled]
    for i, src in enumerate(transfer):
        source_rows = read_transfer_source(src, i)
        rows = map_transfer_rows(source_rows, family, cols, dict(src.columns), template, placeholder, i)
        rows = add_filtered(rows, f"data.transfer[{i}]", empty=len(source_rows) - len(rows))
        counts["transfer"] += len(rows)
        parts.append(rows)

    if augment is not None and augment.copies > 0:
        from distill.data.augment import augment_rows

        inputs = concatenate_datasets(parts) if augment.include_transfer and len(parts) > 1 else labelled
        model = augment.model or augment_model
        if not model:
            raise DataError(
                "augment.copies > 0 needs a model for the candidate words: set augment.model "
                "(method=embedding defaults to the teacher)"
            )
        generated = augment_rows(
            inputs.remove_columns([HAS_GOLD]),
            family,
            columns,
            augment,
            model,
            cache_dir=Path(augment.cache_dir or cache_dir),
            seed=seed if augment.seed is None else augment.seed,
        )
        generated = generated.remove_columns(["source_index"])
        generated = generated.add_column(HAS_GOLD, np.zeros(len(generated), dtype=bool))
        generated = add_filtered(generated.cast(Features({**template, HAS_GOLD: Value("bool")})), "augmented rows")
        counts["augmented"] = len(generated)
        parts.append(generated)

    rows = concatenate_datasets(parts) if len(parts) > 1 else labelled
    log.info(
        "student training rows: %d labelled, %d transfer, %d augmented (%d leaks of validation/test "
        "rows dropped)",
        counts["labelled"], counts["transfer"], counts["augmented"], counts["leaked_dropped"],
    )
    return rows, counts


# ---------------------------------------------------------------------------------------------
# From raw rows to features
# ---------------------------------------------------------------------------------------------


def mark_gold(features: Dataset, rows: Dataset) -> Dataset:
    """Carry `has_gold` from raw rows to their features (through `example_id`), and give the
    features of rows without gold the ignore value in their gold targets: `labels` -> -100
    (classification, every token of a tagging window), `start_positions` / `end_positions` ->
    IGNORE_POSITION (QA). The model's own loss then skips them; a batch with no gold row at
    all still needs the loss term to return 0 (the head's mean would be 0/0)."""
    if HAS_GOLD not in rows.column_names:
        return features
    gold = np.asarray(rows.with_format("numpy", columns=[HAS_GOLD])[HAS_GOLD], dtype=bool)  # [rows]

    def mark(batch: dict) -> dict:
        ok = gold[np.asarray(batch["example_id"], dtype=np.int64)]  # [batch]
        batch[HAS_GOLD] = ok.tolist()
        if "labels" in batch:
            batch["labels"] = [
                lab if g else ([IGNORE_INDEX] * len(lab) if isinstance(lab, list) else IGNORE_INDEX)
                for lab, g in zip(batch["labels"], ok)
            ]
        for key in ("start_positions", "end_positions"):
            if key in batch:
                batch[key] = [p if g else IGNORE_POSITION for p, g in zip(batch[key], ok)]
        return batch

    return features.map(mark, batched=True, desc="marking rows without gold labels")


class GoldCollate:
    """A task's collate whose batches also carry `has_gold` ([batch] bool) when the features do
    (a class, not a closure, so DataLoader workers can pickle it)."""

    def __init__(self, collate: Any):
        self.collate = collate

    def __call__(self, features: list[dict]) -> dict:
        batch = self.collate(features)
        if features and HAS_GOLD in features[0] and HAS_GOLD not in batch:
            import torch

            batch[HAS_GOLD] = torch.tensor([bool(f[HAS_GOLD]) for f in features], dtype=torch.bool)
        return batch


def check_transfer(
    raw: DatasetDict,
    family: str,
    columns: Mapping[str, str],
    transfer: Sequence[Any],
    train_split: str = "train",
    rows: int = 100,
) -> None:
    """Preflight: every `data.transfer` entry can be read and its columns map to the task's
    (first `rows` rows converted), so a bad entry fails before the teacher trains."""
    if not transfer:
        return
    cols = task_columns(family, columns)
    train = raw[train_split]
    keep = _train_columns(family, cols, train)
    template = Features({c: train.features[c] for c in keep})
    placeholder = gold_placeholder(family, train, cols[GOLD_ROLE[family]])
    for i, src in enumerate(transfer):
        ds = read_transfer_source(src, i)
        head = ds.select(range(min(rows, len(ds))))
        map_transfer_rows(head, family, cols, dict(src.columns), template, placeholder, i)
