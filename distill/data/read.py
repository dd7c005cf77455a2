"""Raw data: a `datasets.DatasetDict` with the recipe's train / validation / test splits.

Sources: a Hub dataset id (+ config name, revision), a local file or folder, or one local file per
split (`data.files`). Local formats: jsonl, json, csv, tsv, parquet (via `datasets`), CoNLL text,
CoNLL-U and SQuAD JSON (nested or flat; via `distill.data.formats`). Text files are read as UTF-8
(a byte-order mark is fine); a byte that is not UTF-8 stops the run naming the file and line.

The splits come back as `RawSplits`, which remembers where each split came from, so that a
task's row checks (`invalid_rows` + `refuse_or_drop`) can name the file of a bad row.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Optional

from datasets import Dataset, DatasetDict, load_dataset

from distill.config import DataConfig
from distill.errors import DataError

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
FORMATS = ("jsonl", "json", "csv", "tsv", "parquet", "conll", "conllu", "squad")
_EXT = {
    ".jsonl": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
    ".conll": "conll",
    ".conllu": "conllu",
    ".txt": "conll",
}


class RawSplits(DatasetDict):
    """The recipe's raw splits, plus `origins`: split -> where its rows came from (a file
    path, or a Hub dataset and split), for error messages that name the file of a bad row."""

    def __init__(self, splits: dict[str, Dataset], origins: Optional[dict[str, str]] = None):
        super().__init__(splits)
        self.origins: dict[str, str] = dict(origins or {})


def origin(raw: DatasetDict, split: str) -> str:
    """`split 'train' (path/to/train.jsonl)`: the split and, when known, where it came from."""
    where = getattr(raw, "origins", {}).get(split)
    return f"split '{split}'" + (f" ({where})" if where else "")


# --- local files ------------------------------------------------------------------------------


def _format_of(path: Path, declared: Optional[str]) -> str:
    if declared:
        return declared
    fmt = _EXT.get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"cannot tell the format of {path}: set data.format ({', '.join(FORMATS)})")
    return fmt


def _looks_like_squad(path: Path) -> bool:
    """A nested SQuAD file starts with {"data": [...]} (and often a version key)."""
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        head = f.read(4096).lstrip()
    return head.startswith("{") and '"data"' in head and '"paragraphs"' in head


def _first_bad_json_line(path: Path) -> Optional[str]:
    """`path:line: reason` of the first jsonl line that is not a JSON object, if any."""
    from distill.data.formats import text_lines

    for number, line in text_lines(path):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            return f"{path}:{number}: not valid JSON ({err.msg} at column {err.colno})"
        if not isinstance(value, dict):
            return f"{path}:{number}: expected one JSON object per line, got {type(value).__name__}"
    return None


def read_file(path: str | Path, fmt: Optional[str] = None, column_names: list[str] = ()) -> Dataset:
    """One local file as a Dataset, in the declared format or the one its extension names."""
    from distill.data import formats

    path = Path(path)
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if path.is_dir():
        raise DataError(f"{path} is a folder; data.files.<split> names one file (a folder goes in data.source)")
    fmt = _format_of(path, fmt)
    if fmt == "json" and _looks_like_squad(path):
        fmt = "squad"
    if fmt == "conll":
        return formats.read_conll(path)
    if fmt == "conllu":
        return formats.read_conllu(path)
    if fmt == "squad":
        return formats.read_squad(path)
    if fmt != "parquet":
        formats.check_utf8(path)  # the datasets builders' decode errors name no line
    kwargs: dict = {}
    builder = {"jsonl": "json", "tsv": "csv"}.get(fmt, fmt)
    if fmt == "tsv":
        kwargs["sep"] = "\t"
    if column_names and builder == "csv":
        kwargs.update(names=list(column_names), header=None)
        if fmt == "tsv":
            kwargs["quoting"] = 3  # csv.QUOTE_NONE: MLDoc texts hold bare quotes
    try:
        return load_dataset(builder, data_files=str(path), split="train", **kwargs)
    except Exception as err:
        if "corresponds to no data" in str(err) or path.stat().st_size == 0:
            return Dataset.from_dict({})  # reported as an empty split by load_raw
        if fmt == "jsonl":
            bad = _first_bad_json_line(path)
            if bad:
                raise DataError(bad) from None
        if fmt == "json":
            try:
                json.loads(formats.read_text(path))
            except json.JSONDecodeError as bad:
                raise DataError(
                    f"{path}:{bad.lineno}: not valid JSON ({bad.msg} at column {bad.colno}); one "
                    "object per line needs the .jsonl extension or data.format=jsonl"
                ) from None
        cause = err.__cause__ or err.__context__ or err
        raise DataError(f"could not read {path} as {fmt}: {cause}") from None


def hub_failure(err: Exception) -> str:
    """Why a dataset could not be loaded from the Hub, in a few words."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return "HF_HUB_OFFLINE is set and the dataset is not in the local cache"
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


def _from_hub(source: str, name: Optional[str], revision: Optional[str]) -> DatasetDict:
    try:
        loaded = load_dataset(source, name, revision=revision)
    except Exception as err:
        raise DataError(
            f"cannot load dataset '{source}'"
            + (f" (config '{name}')" if name else "")
            + (f" at revision '{revision}'" if revision else "")
            + f": {hub_failure(err)}. Check data.source / data.name / data.revision, or use local files "
            "with data.files.train=... (see the recipe's header comment)."
        ) from None
    if not isinstance(loaded, DatasetDict):
        loaded = DatasetDict({"train": loaded})
    return loaded


def _hub_origin(source: str, name: Optional[str], split: str) -> str:
    return f"dataset '{source}'" + (f" config '{name}'" if name else "") + f", split '{split}'"


def _hold_out(train: Dataset, amount: float, seed: int, where: str) -> tuple[Dataset, Dataset]:
    """Split a validation set off train: `amount` < 1 is a fraction of it, >= 1 a row count."""
    size: float | int = int(amount) if amount >= 1 else amount
    n = len(train)
    held = size if isinstance(size, int) else math.ceil(size * n)
    if held >= n or held < 1:
        raise DataError(
            f"data.validation_from_train={amount:g} would hold out {held} of the {n} training rows "
            f"of {where}; leave at least one row on each side (a fraction in (0, 1) or a row count)"
        )
    parts = train.train_test_split(test_size=size, seed=seed)
    return parts["train"], parts["test"]


def load_raw(data: DataConfig, seed: int) -> RawSplits:
    """The recipe's splits keyed train / validation / test (absent ones left out)."""
    d = data
    wanted = {role: getattr(d.splits, role) for role in SPLITS if getattr(d.splits, role)}
    origins: dict[str, str] = {}
    if d.files:
        unknown = sorted(set(d.files) - set(SPLITS))
        if unknown:
            raise DataError(f"data.files has unknown split(s) {unknown}; use train, validation, test")
        out = {role: read_file(path, d.format, d.column_names) for role, path in d.files.items()}
        origins.update({role: str(path) for role, path in d.files.items()})
    elif d.source and Path(d.source).is_file():
        out = {"train": read_file(d.source, d.format, d.column_names)}
        origins["train"] = d.source
    elif d.source and Path(d.source).is_dir():
        # a folder holding train.* / validation.* / test.* files
        out = {}
        for role, split_name in wanted.items():
            matches = sorted(p for p in Path(d.source).iterdir() if p.stem == split_name and p.is_file())
            if matches:
                out[role] = read_file(matches[0], d.format, d.column_names)
                origins[role] = str(matches[0])
        if not out:
            raise DataError(f"{d.source} holds no files named {list(wanted.values())} (.jsonl, .csv, ...)")
    elif d.source:
        hub = _from_hub(d.source, d.name, d.revision)
        out = {}
        for role, split_name in wanted.items():
            if split_name in hub:
                out[role] = hub[split_name]
                origins[role] = _hub_origin(d.source, d.name, split_name)
            elif role != "validation" or not d.validation_from_train:
                raise DataError(
                    f"dataset '{d.source}' has no split '{split_name}' (for {role}); it has "
                    f"{list(hub)}. Set data.splits.{role}=<name> (or null to skip it)."
                )
    elif d.split_sources:
        out = {}
    else:
        raise DataError("no data: set data.source (Hub id or local path) or data.files.<split>=<file>")
    for role, spec in d.split_sources.items():
        if role not in SPLITS:
            raise DataError(f"data.split_sources has unknown split '{role}'; use train, validation, test")
        if Path(spec.source).is_file():
            out[role] = read_file(spec.source, d.format, d.column_names)
            origins[role] = spec.source
            continue
        hub = _from_hub(spec.source, spec.name, spec.revision)
        if spec.split not in hub:
            raise DataError(
                f"data.split_sources.{role}: dataset '{spec.source}' has no split '{spec.split}'; "
                f"it has {list(hub)}"
            )
        out[role] = hub[spec.split]
        origins[role] = _hub_origin(spec.source, spec.name, spec.split)

    if "train" not in out:
        raise DataError("no training split: set data.splits.train or data.files.train")
    if d.validation_from_train:
        if "validation" in out:
            logger.info(
                "data.validation_from_train=%g is not used: %s is the validation split",
                d.validation_from_train, origins.get("validation", "the dataset's own split"),
            )
        else:
            train_origin = origins.get("train", "the training split")
            out["train"], out["validation"] = _hold_out(
                out["train"], d.validation_from_train, seed, train_origin
            )
            origins["validation"] = f"held out from {train_origin}"
    for role, ds in out.items():
        if len(ds) == 0:
            where = f" ({origins[role]})" if role in origins else ""
            raise DataError(f"split '{role}' is empty{where}; check the file or data.splits.{role}")
    return RawSplits(out, origins)


def subsample(raw: DatasetDict, data: DataConfig, seed: int) -> RawSplits:
    """Apply data.max_train_samples / max_eval_samples (the first N rows, deterministic)."""
    out = {}
    for role, ds in raw.items():
        limit = data.max_train_samples if role == "train" else data.max_eval_samples
        out[role] = ds.select(range(min(limit, len(ds)))) if limit else ds
    return RawSplits(out, getattr(raw, "origins", {}))


# --- rows a task cannot use -------------------------------------------------------------------


def is_null(value: Any) -> bool:
    """None, or a float NaN (what pandas puts in an empty csv cell of a numeric column)."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def text_problem(value: Any) -> Optional[str]:
    """Why `value` cannot be a text input (None when it can)."""
    if is_null(value):
        return "is null"
    if isinstance(value, str):
        return None if value.strip() else "is empty"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return None  # a csv column of numbers-as-text: read as its digits
    return f"is a {type(value).__name__}, not a text"


def label_problem(value: Any) -> Optional[str]:
    """Why `value` cannot be a class label (None when it can). Types are checked across the
    whole column later (`distill.data.labels`); a negative id is a row without a gold label."""
    if is_null(value):
        return "is null"
    if isinstance(value, str):
        return None if value.strip() else "is empty"
    if isinstance(value, (list, dict)):
        return f"is a {type(value).__name__}, not a class"
    if isinstance(value, int) and not isinstance(value, bool) and value < 0:
        return f"is {value} (a negative id marks a row without a gold label)"
    return None


def column_list(ds: Dataset, col: str) -> list:
    """A column as a Python list in one read (iterating `ds[col]` row by row is ~100x slower)."""
    values = ds[col]
    return values if isinstance(values, list) else values[:]


def invalid_rows(ds: Dataset, checks: dict[str, Callable[[Any], Optional[str]]]) -> list[tuple[int, str]]:
    """(row, "column 'x' is null") for every row where a column's check finds a problem."""
    bad: dict[int, str] = {}
    for col, check in checks.items():
        for row, value in enumerate(column_list(ds, col)):
            if row not in bad:
                problem = check(value)
                if problem:
                    bad[row] = f"column '{col}' {problem}"
    return sorted(bad.items())


def refuse_or_drop(raw: DatasetDict, bad: dict[str, list[tuple[int, str]]], drop: bool) -> None:
    """Stop naming the split, file and first bad rows, or (with `data.drop_invalid`) drop them
    from `raw` in place and say how many went, per split."""
    bad = {split: rows for split, rows in bad.items() if rows}
    if not bad:
        return
    if not drop:
        lines = []
        for split, rows in bad.items():
            shown = "; ".join(f"row {row}: {why}" for row, why in rows[:3])
            more = f" (and {len(rows) - 3} more rows)" if len(rows) > 3 else ""
            lines.append(f"{origin(raw, split)}: {shown}{more}")
        raise DataError(
            "rows that cannot be used: " + " | ".join(lines) + ". Fix them, or set "
            "data.drop_invalid=true to drop such rows (their count is printed)."
        )
    for split, rows in bad.items():
        ds = raw[split]
        drop_rows = {row for row, _ in rows}
        keep = [i for i in range(len(ds)) if i not in drop_rows]
        if not keep:
            raise DataError(f"{origin(raw, split)}: every row is invalid ({rows[0][1]} in row {rows[0][0]})")
        raw[split] = ds.select(keep)
        logger.warning(
            "%s: dropped %d of %d rows that cannot be used (data.drop_invalid=true); first: row %d %s",
            origin(raw, split), len(rows), len(ds), rows[0][0], rows[0][1],
        )
