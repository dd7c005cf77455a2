"""Label names from data, read one way for every task family that has labels.

A label column holds one of three kinds, and the kind decides the model's `id2label`:
- a `ClassLabel` feature (Hub datasets): its names, in its order;
- integer ids (`0, 1, 2, ...`): the id is the class, names "0".."max" in numeric order (never
  as strings, where "10" would sort before "2" and mis-map a teacher fine-tuned elsewhere);
- names (strings): sorted (numerically when every name is digits).
`task.labels` in the recipe overrides the names and their order: ids index into it, and names
must all be in it.

Refused, with the values and where they are: a column that mixes kinds (`1` and `"pos"`),
fractional values (a regression target), names that differ only by case or surrounding spaces
(`"Pos"`, `"pos "`), and labels of an evaluation split that training never saw (the model would
have no output for them). Null and empty values are row problems, found before this runs
(`distill.data.read.invalid_rows`).
"""

from __future__ import annotations

import difflib
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import numpy as np

from distill.errors import DataError

_DIGITS = re.compile(r"[0-9]+")
_KIND_WORDS = {"int": "integer ids", "str": "names", "bool": "booleans"}


@dataclass
class LabelSpace:
    """The label names in id order, and how a raw value becomes an id."""

    names: list[str]
    kind: str  # "classlabel" | "ids" | "names"
    # classlabel: the feature's names, which the raw ids index (they may be reordered by task.labels)
    feature_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._index = {name: i for i, name in enumerate(self.names)}

    def id_of(self, value: Any) -> int:
        if self.kind == "classlabel":
            return self._index[self.feature_names[int(value)]]
        if self.kind == "ids":
            return int(value)
        return self._index[str(value)]


def _kind(value: Any) -> str:
    if isinstance(value, (bool, np.bool_)):
        return "bool"
    if isinstance(value, (int, np.integer)):
        return "int"
    if isinstance(value, (float, np.floating)):
        return "int" if float(value).is_integer() else "float"
    if isinstance(value, str):
        return "str"
    return type(value).__name__


def _key(value: Any, kind: str) -> Any:
    return int(value) if kind == "int" else str(value)


def _sorted_names(names: Iterable[str]) -> list[str]:
    names = list(names)
    if names and all(_DIGITS.fullmatch(n) for n in names):
        return sorted(names, key=lambda n: (int(n), n))
    return sorted(names)


def label_space(
    values: dict[str, Iterable[tuple[int, Any]]],
    *,
    column: str,
    declared: Iterable[str] = (),
    feature_names: Optional[list[str]] = None,
    what: str = "label",
    where: Callable[[str], str] = lambda split: f"split '{split}'",
) -> LabelSpace:
    """Read the label names of a column.

    `values`: split -> (row, value) for every label value of that split (a tagging row gives one
    pair per word); the split "train" defines what training saw. `declared` is `task.labels`;
    `feature_names` the ClassLabel names when the column has them; `where(split)` names a split
    and its file in messages.
    """
    declared = list(declared)
    if feature_names is not None:
        if declared:
            missing = [n for n in feature_names if n not in declared]
            if missing:
                raise DataError(
                    f"task.labels {declared} lacks {what}s of column '{column}': {missing[:10]} "
                    f"(the dataset names {feature_names}); list every one of them"
                )
            return LabelSpace(declared, "classlabel", list(feature_names))
        return LabelSpace(list(feature_names), "classlabel", list(feature_names))

    # first place each distinct value appears, per kind
    first: dict[str, dict[Any, tuple[str, int]]] = defaultdict(dict)
    in_split: dict[str, set] = defaultdict(set)
    for split, pairs in values.items():
        for row, value in pairs:
            kind = _kind(value)
            if kind == "float":
                raise DataError(
                    f"{where(split)}, row {row}: {what} {value!r} of column '{column}' is not a class: "
                    f"{what}s are names or integer ids (a fractional value is a regression "
                    "target, which is not a task distill trains)"
                )
            if kind not in _KIND_WORDS:
                raise DataError(
                    f"{where(split)}, row {row}: {what} {value!r} of column '{column}' is a {kind}, "
                    f"not a class name or id"
                )
            key = _key(value, kind)
            first[kind].setdefault(key, (split, row))
            in_split[split].add((kind, key))

    def at(kind: str, key: Any) -> str:
        split, row = first[kind][key]
        return f"{key!r} ({where(split)}, row {row})"

    if len(first) > 1:
        parts = [
            f"{_KIND_WORDS[kind]} " + ", ".join(at(kind, k) for k in list(keys)[:3])
            for kind, keys in sorted(first.items())
        ]
        raise DataError(
            f"column '{column}' mixes {what} kinds: " + "; ".join(parts) + ". Use one kind for "
            f"every row: all names or all integer ids (with task.labels naming the ids)."
        )
    if not first:
        raise DataError(f"column '{column}' holds no {what}s")
    (kind, keys), = first.items()

    if kind == "str":
        groups: dict[str, list[str]] = defaultdict(list)
        for key in keys:
            groups[key.strip().casefold()].append(key)
        clashes = [sorted(g) for g in groups.values() if len(g) > 1]
        if clashes:
            shown = "; ".join(" vs ".join(at(kind, k) for k in group) for group in clashes[:5])
            raise DataError(
                f"column '{column}' has {what}s that differ only by case or surrounding spaces: "
                f"{shown}. They would become separate classes; write each {what} one way."
            )

    train = {key for k, key in in_split.get("train", set())}
    if kind == "int":
        negative = sorted(k for k in keys if k < 0)
        if negative:
            raise DataError(f"column '{column}' has negative {what} ids: {at(kind, negative[0])}")
        if declared:
            over = sorted(k for k in keys if k >= len(declared))
            if over:
                raise DataError(
                    f"task.labels names {len(declared)} {what}s (ids 0..{len(declared) - 1}) but "
                    f"column '{column}' has id {at(kind, over[0])}"
                )
            return LabelSpace(declared, "ids")
        if not train:
            raise DataError(f"column '{column}' of the training split holds no {what}s")
        top = max(train)
        space = LabelSpace([str(i) for i in range(top + 1)], "ids")
        known = set(range(top + 1))
    else:
        if declared:
            unknown = [k for k in keys if k not in set(declared)]
            if unknown:
                hints = []
                for k in unknown[:5]:
                    near = [d for d in declared if d.strip().casefold() == k.strip().casefold()]
                    near = near or difflib.get_close_matches(k, declared, n=1, cutoff=0.6)
                    hints.append(at(kind, k) + (f" (did you mean {near[0]!r}?)" if near else ""))
                raise DataError(
                    f"column '{column}' has {what}s that are not in task.labels {declared}: "
                    + ", ".join(hints)
                )
            return LabelSpace(declared, "names")
        if not train:
            raise DataError(f"column '{column}' of the training split holds no {what}s")
        space = LabelSpace(_sorted_names(train), "names")
        known = train
    for split in values:
        unseen = sorted({key for k, key in in_split.get(split, set())} - known, key=str)
        if unseen:
            raise DataError(
                f"split '{split}' has {what}s never seen in training: {[str(u) for u in unseen[:10]]} "
                f"(first: {at(kind, unseen[0])}; training {what}s: {space.names[:30]}). The model "
                f"would have no output for them: fix the data, drop those rows, or name every "
                f"{what} in task.labels."
            )
    return space
