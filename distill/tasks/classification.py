"""Text and text-pair classification (MLDoc, PAWS-X, XNLI).

Example row (XNLI, with `data.columns: {text: premise, text_pair: hypothesis}`):
    {"premise": "El gato duerme.", "hypothesis": "Un animal descansa.", "label": 0}
Features: input_ids, attention_mask[, token_type_ids], labels, example_id, feature_id, length.
Distillation compares the sequence logits, one row per example.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from datasets import ClassLabel, Dataset, DatasetDict
from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding

from distill.data.read import column_list, invalid_rows, label_problem, origin, refuse_or_drop, text_problem
from distill.data.labels import LabelSpace, label_space
from distill.tasks.base import TEACHER_PREFIX, LogitPair, Task, column, require_columns


def label_space_of(raw: DatasetDict, label_col: str, declared: list[str] = ()) -> LabelSpace:
    """The label names of `label_col` (`distill.data.labels`): a ClassLabel's names, integer ids in
    numeric order, or sorted names; `declared` (task.labels) overrides names and order.

    A label present in an evaluation split but never seen in training is an error: the model
    would have no output for it.
    """
    first = raw["train"] if "train" in raw else next(iter(raw.values()))
    feature = first.features[label_col]
    names = list(feature.names) if isinstance(feature, ClassLabel) else None
    values = {split: enumerate(column_list(ds, label_col)) for split, ds in raw.items()}
    return label_space(
        values, column=label_col, declared=declared, feature_names=names, where=lambda s: origin(raw, s)
    )


def label_names(raw: DatasetDict, label_col: str, declared: list[str] = ()) -> list[str]:
    """The label names in id order (see `label_space_of`)."""
    return label_space_of(raw, label_col, declared).names


class ClassificationTask(Task):
    family = "classification"
    pipeline_tag = "text-classification"
    default_metric = "accuracy"
    metric_names = ("accuracy",)
    kd_target_keys = ("logits",)

    def setup(self, raw: DatasetDict) -> None:
        """Check columns and rows, and read the label names. Rows with a null or empty text or
        label stop the run naming split, file and row, or with `data.drop_invalid` are dropped
        from `raw` in place (the count is logged)."""
        self.text_col = column(self.data, "text", "text")
        self.pair_col = self.data.columns.get("text_pair")
        self.label_col = column(self.data, "label", "label")
        needed = {"text": self.text_col, "label": self.label_col}
        if self.pair_col:
            needed["text_pair"] = self.pair_col
        require_columns(raw, needed)
        bad = {}
        for split, ds in raw.items():
            checks = {self.text_col: text_problem, self.label_col: self._label_check(ds)}
            if self.pair_col:
                checks[self.pair_col] = text_problem
            bad[split] = invalid_rows(ds, checks)
        refuse_or_drop(raw, bad, self.data.drop_invalid)
        self.label_space = label_space_of(raw, self.label_col, list(self.settings.labels))
        self.labels = self.label_space.names

    def _label_check(self, ds: Dataset):
        """The row check of the label column: a ClassLabel id must be one of its classes."""
        feature = ds.features[self.label_col]
        if not isinstance(feature, ClassLabel):
            return label_problem

        def check(value: Any) -> str | None:
            if value is None or not 0 <= int(value) < feature.num_classes:
                return f"is {value!r}, not one of the {feature.num_classes} classes (no gold label)"
            return None

        return check

    def preprocess(self, raw: Dataset, split: str) -> Dataset:
        max_length = self.data.max_length
        label_id = self.label_space.id_of

        def encode(rows: dict, idx: list[int]) -> dict:
            texts = [str(t) for t in rows[self.text_col]]
            pairs = [str(t) for t in rows[self.pair_col]] if self.pair_col else None
            out = dict(self.tokenizer(texts, pairs, truncation=True, max_length=max_length))
            if self.teacher_tokenizer is not None:
                t = self.teacher_tokenizer(texts, pairs, truncation=True, max_length=max_length)
                out.update({TEACHER_PREFIX + k: v for k, v in t.items()})
            out["labels"] = [label_id(v) for v in rows[self.label_col]]
            out["example_id"] = idx
            out["feature_id"] = idx
            out["length"] = [len(ids) for ids in out["input_ids"]]
            return out

        return raw.map(
            encode,
            batched=True,
            with_indices=True,
            remove_columns=raw.column_names,
            desc=f"tokenizing {split}",
            new_fingerprint=self.features_fingerprint(raw, split),
        )

    def collate(self, features: list[dict]) -> dict[str, torch.Tensor]:
        student = [{k: f[k] for k in f if not k.startswith(TEACHER_PREFIX)} for f in features]
        batch = DataCollatorWithPadding(self.tokenizer, return_tensors="pt")(student)
        if self.teacher_tokenizer is not None:
            teacher = [
                {k[len(TEACHER_PREFIX):]: f[k] for k in f if k.startswith(TEACHER_PREFIX)}
                for f in features
            ]
            padded = DataCollatorWithPadding(self.teacher_tokenizer, return_tensors="pt")(teacher)
            batch.update({TEACHER_PREFIX + k: v for k, v in padded.items()})
        return dict(batch)

    def model_class(self) -> Any:
        return AutoModelForSequenceClassification

    def kd_targets(self, outputs: Any, batch: dict, teacher: bool) -> dict[str, torch.Tensor]:
        return {"logits": outputs.logits}  # [batch, labels]

    def kd_pairs(self, student: dict, teacher: dict, batch: dict) -> list[LogitPair]:
        return [LogitPair(student["logits"], teacher["logits"])]

    def eval_outputs(self, outputs: Any, batch: dict) -> dict[str, torch.Tensor]:
        return {
            "logits": outputs.logits.float(),  # [batch, labels]
            "labels": batch["labels"],
            "feature_id": batch["feature_id"],
        }

    def compute_metrics(
        self, outputs: dict[str, np.ndarray], features: Dataset, raw: Dataset
    ) -> dict[str, float]:
        preds = outputs["logits"].argmax(-1)
        return {"accuracy": float((preds == outputs["labels"]).mean())}

    def predictions(self, outputs: dict[str, np.ndarray], features: Dataset, raw: Dataset) -> list:
        preds = outputs["logits"].argmax(-1)
        return [
            {"example_id": int(i), "prediction": self.labels[p], "label": self.labels[g]}
            for i, p, g in zip(outputs["feature_id"], preds, outputs["labels"])
        ]
