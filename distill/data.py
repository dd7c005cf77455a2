"""Raw data: a `datasets.DatasetDict` with the recipe's train / validation / test splits.

Sources: a Hub dataset id (+ config name, revision), a local file or folder, or one local file per
split (`data.files`). Local formats: jsonl, json, csv, tsv, parquet (via `datasets`), CoNLL text
and SQuAD JSON (nested or flat; via `distill.formats`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from datasets import Dataset, DatasetDict, load_dataset

from distill.config import Config
from distill.errors import DataError

SPLITS = ("train", "validation", "test")
_EXT = {
    ".jsonl": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
    ".conll": "conll",
    ".txt": "conll",
}


def _format_of(path: Path, declared: Optional[str]) -> str:
    if declared:
        return declared
    fmt = _EXT.get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"cannot tell the format of {path}: set data.format (jsonl, json, csv, tsv, conll, squad)")
    return fmt


def _looks_like_squad(path: Path) -> bool:
    """A nested SQuAD file starts with {"data": [...]} (and often a version key)."""
    with open(path, encoding="utf-8") as f:
        head = f.read(4096).lstrip()
    return head.startswith("{") and '"data"' in head and '"paragraphs"' in head


def read_file(path: str | Path, fmt: Optional[str] = None, column_names: list[str] = ()) -> Dataset:
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    fmt = _format_of(path, fmt)
    if fmt == "json" and _looks_like_squad(path):
        fmt = "squad"
    if fmt in ("conll", "squad"):
        from distill import formats

        return formats.read_conll(path) if fmt == "conll" else formats.read_squad(path)
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
        raise DataError(f"could not read {path} as {fmt}: {err}") from None


def _from_hub(source: str, name: Optional[str], revision: Optional[str]) -> DatasetDict:
    try:
        loaded = load_dataset(source, name, revision=revision)
    except Exception as err:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        why = (
            "HF_HUB_OFFLINE is set and the dataset is not in the local cache"
            if offline
            else f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        )
        raise DataError(
            f"cannot load dataset '{source}'"
            + (f" (config '{name}')" if name else "")
            + (f" at revision '{revision}'" if revision else "")
            + f": {why}. Check data.source / data.name / data.revision, or use local files "
            "with data.files.train=... (see the recipe's header comment)."
        ) from None
    if not isinstance(loaded, DatasetDict):
        loaded = DatasetDict({"train": loaded})
    return loaded


def load_raw(cfg: Config) -> DatasetDict:
    """The recipe's splits as a DatasetDict keyed train / validation / test (absent ones left out)."""
    d = cfg.data
    wanted = {role: getattr(d.splits, role) for role in SPLITS if getattr(d.splits, role)}
    if d.files:
        unknown = sorted(set(d.files) - set(SPLITS))
        if unknown:
            raise DataError(f"data.files has unknown split(s) {unknown}; use train, validation, test")
        out = {role: read_file(path, d.format, d.column_names) for role, path in d.files.items()}
    elif d.source and Path(d.source).is_file():
        out = {"train": read_file(d.source, d.format, d.column_names)}
    elif d.source and Path(d.source).is_dir():
        # a folder holding train.* / validation.* / test.* files
        out = {}
        for role, split_name in wanted.items():
            matches = sorted(p for p in Path(d.source).iterdir() if p.stem == split_name)
            if matches:
                out[role] = read_file(matches[0], d.format, d.column_names)
        if not out:
            raise DataError(f"{d.source} holds no files named {list(wanted.values())} (.jsonl, .csv, ...)")
    elif d.source:
        hub = _from_hub(d.source, d.name, d.revision)
        out = {}
        for role, split_name in wanted.items():
            if split_name in hub:
                out[role] = hub[split_name]
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
            continue
        hub = _from_hub(spec.source, spec.name, spec.revision)
        if spec.split not in hub:
            raise DataError(
                f"data.split_sources.{role}: dataset '{spec.source}' has no split '{spec.split}'; "
                f"it has {list(hub)}"
            )
        out[role] = hub[spec.split]

    if "validation" not in out and d.validation_from_train and "train" in out:
        parts = out["train"].train_test_split(test_size=d.validation_from_train, seed=cfg.seed)
        out["train"], out["validation"] = parts["train"], parts["test"]
    for role, ds in out.items():
        if len(ds) == 0:
            where = f" ({d.files[role]})" if role in d.files else ""
            raise DataError(f"split '{role}' is empty{where}; check the file or data.splits.{role}")
    if "train" not in out:
        raise DataError("no training split: set data.splits.train or data.files.train")
    return DatasetDict(out)


def subsample(raw: DatasetDict, cfg: Config) -> DatasetDict:
    """Apply data.max_train_samples / max_eval_samples (the first N rows, deterministic)."""
    out = {}
    for role, ds in raw.items():
        limit = cfg.data.max_train_samples if role == "train" else cfg.data.max_eval_samples
        out[role] = ds.select(range(min(limit, len(ds)))) if limit else ds
    return DatasetDict(out)
