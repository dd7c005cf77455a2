"""The protocol every task family follows, so the training loop never branches on the task.

A task turns raw rows into features, tells the loop which logits distillation compares (and
where, through masks), and turns gathered model outputs into metrics. Every feature carries
`example_id` (the row's index in its raw split) and `feature_id` (its own index in the
feature split), so cached teacher outputs, resume and sharding never depend on batch order.

Tokenizers: `tokenizer` belongs to the model being trained. When a distillation teacher uses a
different tokenizer, features also carry the teacher's inputs under a `teacher_` prefix
(`teacher_input_ids`, `teacher_attention_mask`, ...), and `kd_pairs` aligns the two. Features
hold one teacher's inputs; with several teachers that tokenize apart, each other tokenizer gets
its own copy of the task and of the training features (loop/setup.py), and `plan_tokenizers`
names the tokenizers every copy must respect where a feature's extent depends on them (the word
windows of tagging), so that a feature id means the same student feature in every copy.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch
from datasets import Dataset, DatasetDict

from distill.config import DataConfig, TaskConfig
from distill.config.search_space import LOWER_IS_BETTER
from distill.errors import DataError
from distill.models import tokenizer_digest

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
TEACHER_PREFIX = "teacher_"


@dataclass
class LogitPair:
    """Student and teacher logits over the same classes, for one soft-label comparison.

    `row_mask` says which rows count ([N] bool, None = all); `class_mask` says which classes of
    each row take part in the softmax ([N, C] bool, None = all), e.g. the context positions of a
    QA window.
    """

    student: torch.Tensor  # [N, C]
    teacher: torch.Tensor  # [N, C]
    row_mask: Optional[torch.Tensor] = None  # [N]
    class_mask: Optional[torch.Tensor] = None  # [N, C]


class Task:
    """Base class with the shared parts; each family module subclasses it."""

    family: str = ""
    pipeline_tag: str = ""
    default_metric: str = ""
    # what compute_metrics returns (with "loss", which evaluation adds): checked before training
    metric_names: tuple[str, ...] = ()
    # metrics where lower is better; everything else is maximized
    lower_is_better: tuple[str, ...] = LOWER_IS_BETTER
    # per-feature tensors `kd_targets` returns, with their shape after the batch dimension
    kd_target_keys: tuple[str, ...] = ()

    def __init__(self, settings: TaskConfig, data: DataConfig):
        self.settings = settings  # the recipe's task section
        self.data = data  # the recipe's data section: columns, lengths, invalid rows
        self.labels: list[str] = []
        self.tokenizer: Any = None
        self.teacher_tokenizer: Any = None
        self.plan_tokenizers: list[Any] = []

    # --- data -----------------------------------------------------------------------------
    def setup(self, raw: DatasetDict) -> None:
        """Check columns and read label names from the raw splits (fails with a clear error)."""
        raise NotImplementedError

    def bind(
        self, tokenizer: Any, teacher_tokenizer: Any = None, plan_tokenizers: Sequence[Any] = (),
        teacher_windows: tuple[Optional[int], Optional[int]] = (None, None), teacher_key: str = "teacher",
    ) -> None:
        """Tokenizer of the trained model, and the teacher's when it tokenizes differently.
        `plan_tokenizers`: further tokenizers (other teachers') whose lengths shape the features
        as the two bound ones do, without their inputs being stored (see the module docstring).
        `teacher_windows`: the teacher's own (max_length, doc_stride), read by QA only (its
        teacher sees the context in windows of its own tokens); `teacher_key` names that teacher
        in the recipe (`teacher`, `teachers[1]`) for messages."""
        self.tokenizer = tokenizer
        self.teacher_tokenizer = teacher_tokenizer
        self.plan_tokenizers = list(plan_tokenizers)

    def check_windows(self, raw: DatasetDict) -> None:
        """Before any stage trains: every row of `raw` fits the bound tokenizers' windows (QA:
        every question leaves room for context). Nothing to check by default."""

    def preprocess(self, raw: Dataset, split: str) -> Dataset:
        """Raw rows -> features (with `example_id`, `feature_id`, `length`, labels)."""
        raise NotImplementedError

    def features_fingerprint(self, raw: Dataset, split: str) -> str:
        """A name for `preprocess`'s output that covers everything it depends on: the raw split,
        every tokenizer (bound or planned over), the task and data settings and the label names.
        Given to `Dataset.map(new_fingerprint=...)`, it lets datasets reuse cached features
        without hashing the tokenizer object (seconds per split for a 30k vocabulary)."""
        h = hashlib.sha256()
        for part in (
            raw._fingerprint,
            type(self).__name__,
            _code_digest(type(self)),  # an upgrade that changes preprocessing never reads stale features
            split,
            tokenizer_digest(self.tokenizer),
            tokenizer_digest(self.teacher_tokenizer),
            # the further tokenizers the features were planned over (as a set: their order never matters)
            *(sorted({tokenizer_digest(t) for t in self.plan_tokenizers}) if self.plan_tokenizers else ()),
            json.dumps([asdict(self.settings), asdict(self.data), self.labels], sort_keys=True, default=str),
        ):
            h.update(str(part).encode())
        return h.hexdigest()[:32]

    def collate(self, features: list[dict]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    # --- models ---------------------------------------------------------------------------
    def model_class(self) -> Any:
        raise NotImplementedError

    def model_kwargs(self) -> dict[str, Any]:
        """Extra `from_pretrained` arguments (num_labels, id2label, label2id)."""
        if not self.labels:
            return {}
        return {
            "num_labels": len(self.labels),
            "id2label": dict(enumerate(self.labels)),
            "label2id": {name: i for i, name in enumerate(self.labels)},
        }

    def model_inputs(self, batch: dict[str, torch.Tensor], teacher: bool = False) -> dict:
        """The keyword arguments of the model's forward: inputs (+ gold labels for the trained
        model, so `outputs.loss` is the task's cross-entropy)."""
        if teacher and self.teacher_tokenizer is not None:
            return {
                k: batch[TEACHER_PREFIX + k] for k in MODEL_INPUTS if TEACHER_PREFIX + k in batch
            }
        inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
        if not teacher:
            inputs.update({k: batch[k] for k in self.label_keys() if k in batch})
        return inputs

    def label_keys(self) -> tuple[str, ...]:
        return ("labels",)

    # --- distillation ---------------------------------------------------------------------
    def kd_targets(self, outputs: Any, batch: dict, teacher: bool) -> dict[str, torch.Tensor]:
        """Per-feature logits distillation compares, in a layout both models share (this is
        what the teacher cache stores)."""
        raise NotImplementedError

    def kd_pairs(self, student: dict, teacher: dict, batch: dict) -> list[LogitPair]:
        """Pairs of student/teacher logits to compare; the KD loss averages over them."""
        raise NotImplementedError

    # --- evaluation -----------------------------------------------------------------------
    def eval_outputs(self, outputs: Any, batch: dict) -> dict[str, torch.Tensor]:
        """Per-feature tensors to gather across processes for scoring."""
        raise NotImplementedError

    def compute_metrics(
        self, outputs: dict[str, np.ndarray], features: Dataset, raw: Dataset
    ) -> dict[str, float]:
        """Gathered outputs (in feature order) -> metrics, e.g. {"accuracy": 0.91}."""
        raise NotImplementedError

    def predictions(self, outputs: dict[str, np.ndarray], features: Dataset, raw: Dataset) -> list:
        """Human-readable predictions per raw example (written beside the metrics)."""
        return []

    @property
    def metric(self) -> str:
        return self.settings.metric or self.default_metric

    def greater_is_better(self, metric: str) -> bool:
        return metric not in self.lower_is_better


def _code_digest(cls: type) -> str:
    """A hash of the source files that define a task's preprocessing (its module and this one)."""
    import sys
    from pathlib import Path

    h = hashlib.sha256()
    for module in sorted({cls.__module__, __name__}):
        h.update(Path(sys.modules[module].__file__).read_bytes())
    return h.hexdigest()[:16]


def column(data: DataConfig, role: str, default: str) -> str:
    """The dataset column that plays `role` for the task (data.columns maps roles to columns)."""
    return data.columns.get(role, default)


def require_columns(raw: DatasetDict, needed: dict[str, str], where: str = "data.columns") -> None:
    """Fail early, naming the split, the missing column and the columns that exist."""
    for split, ds in raw.items():
        for role, col in needed.items():
            if col not in ds.column_names:
                raise DataError(
                    f"split '{split}' has no column '{col}' (needed as {role}); it has "
                    f"{ds.column_names}. Map it in the recipe with {where}.{role}=<column>"
                )


def pad_lists(rows: list[list[int]], value: int, length: int | None = None) -> torch.Tensor:
    """Right-pad integer lists into a [len(rows), length] LongTensor."""
    length = max((len(r) for r in rows), default=0) if length is None else length
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            out[i, : len(row)] = torch.tensor(row[:length], dtype=torch.long)
    return out


def fit_width(t: torch.Tensor, width: int, fill: float | bool = 0) -> torch.Tensor:
    """Cut or right-pad axis 1 of a [batch, n, ...] tensor to `width`: a cached teacher row is
    padded to its own batch's width, not this one's."""
    if t.size(1) >= width:
        return t[:, :width]
    pad = t.new_full((t.size(0), width - t.size(1), *t.shape[2:]), fill)
    return torch.cat([t, pad], dim=1)


def concat_padded(chunks: list[np.ndarray]) -> np.ndarray:
    """Per-batch arrays whose axis 1 (sequence or words) differs, right-padded with -100 (the
    ignore index every task's postprocessing skips) and joined along the batch axis."""
    if chunks[0].ndim == 1:
        return np.concatenate(chunks)
    width = max(c.shape[1] for c in chunks)
    padded = []
    for c in chunks:
        pad = [(0, 0)] * c.ndim
        pad[1] = (0, width - c.shape[1])
        padded.append(np.pad(c, pad, constant_values=-100))
    return np.concatenate(padded)
