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

from distill.errors import DataError
from distill.tasks.base import TEACHER_PREFIX, LogitPair, Task, column, require_columns


def label_names(raw: DatasetDict, label_col: str, train_split: str | None) -> list[str]:
    """Names from a ClassLabel feature, else the sorted unique values of the training split.

    A label present in an evaluation split but never seen in training is an error: the model
    would have no output for it.
    """
    first = raw[train_split] if train_split in raw else next(iter(raw.values()))
    feature = first.features[label_col]
    if isinstance(feature, ClassLabel):
        return list(feature.names)
    seen = sorted({str(v) for v in first[label_col]})
    for split, ds in raw.items():
        unseen = sorted({str(v) for v in ds[label_col]} - set(seen))
        if unseen:
            raise DataError(
                f"split '{split}' has labels never seen in training: {unseen[:10]} "
                f"(training labels: {seen[:20]}). Fix the data or drop those rows."
            )
    return seen


class ClassificationTask(Task):
    family = "classification"
    pipeline_tag = "text-classification"
    default_metric = "accuracy"
    metric_names = ("accuracy",)
    kd_target_keys = ("logits",)

    def setup(self, raw: DatasetDict) -> None:
        self.text_col = column(self.cfg, "text", "text")
        self.pair_col = self.cfg.data.columns.get("text_pair")
        self.label_col = column(self.cfg, "label", "label")
        needed = {"text": self.text_col, "label": self.label_col}
        if self.pair_col:
            needed["text_pair"] = self.pair_col
        require_columns(raw, needed)
        self.labels = label_names(raw, self.label_col, self.cfg.data.splits.train)
        self._is_classlabel = isinstance(
            next(iter(raw.values())).features[self.label_col], ClassLabel
        )

    def _label_id(self, value: Any) -> int:
        if self._is_classlabel:
            return int(value)
        return self.labels.index(str(value))

    def preprocess(self, raw: Dataset, split: str) -> Dataset:
        max_length = self.cfg.data.max_length
        label_index = {name: i for i, name in enumerate(self.labels)}

        def encode(rows: dict, idx: list[int]) -> dict:
            texts = [str(t) for t in rows[self.text_col]]
            pairs = [str(t) for t in rows[self.pair_col]] if self.pair_col else None
            out = dict(self.tokenizer(texts, pairs, truncation=True, max_length=max_length))
            if self.teacher_tokenizer is not None:
                t = self.teacher_tokenizer(texts, pairs, truncation=True, max_length=max_length)
                out.update({TEACHER_PREFIX + k: v for k, v in t.items()})
            if self._is_classlabel:
                out["labels"] = [int(v) for v in rows[self.label_col]]
            else:
                out["labels"] = [label_index[str(v)] for v in rows[self.label_col]]
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
