"""The published results of "Speedy Gonzales: A Collection of Fast Task-Specific Models for
Spanish", as data: the Summary table (parameters, speedup, score) and the All results table
(test-set scores per task), so `distill report --compare-published` can put them beside ours.

Scores are in percent, as printed: accuracy for classification, seqeval F1 for tagging and
(F1, exact match) for QA. A model's Score is the mean of its 8 task scores, QA counted by F1.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

FINETUNED = "finetuned"
DISTILLED = "distilled"
BLOCKS = (FINETUNED, DISTILLED)
BLOCK_TITLES = {FINETUNED: "Fine-tuning", DISTILLED: "Task-specific Knowledge Distillation"}

# The metrics a table cell shows, per task family (QA: "F1 / EM").
FAMILY_METRICS: dict[str, tuple[str, ...]] = {
    "classification": ("accuracy",),
    "tagging": ("f1",),
    "qa": ("f1", "exact_match"),
}


@dataclass(frozen=True)
class TaskInfo:
    """A task of the study: its key (our `task.name`), column title, family and other names."""

    key: str
    title: str
    family: str
    aliases: tuple[str, ...] = ()


TASKS: tuple[TaskInfo, ...] = (
    TaskInfo("mldoc", "MLDoc", "classification"),
    TaskInfo("pawsx", "PAWS-X", "classification", ("paws-x", "paws")),
    TaskInfo("xnli", "XNLI", "classification"),
    TaskInfo("pos", "POS", "tagging", ("upos", "ancora")),
    TaskInfo("ner", "NER", "tagging", ("conll2002",)),
    TaskInfo("mlqa", "MLQA", "qa", ("qa-mlqa",)),
    TaskInfo("sqac", "SQAC", "qa", ("qa-sqac",)),
    TaskInfo("tar", "TAR / XQuAD", "qa", ("xquad", "qa-tar", "tar-xquad")),
)
TASK_KEYS = tuple(t.key for t in TASKS)

Cell = Union[float, tuple[float, float]]  # accuracy / F1, or (F1, EM) for QA


@dataclass(frozen=True)
class PublishedModel:
    """One row of the published tables (a model in one block)."""

    key: str  # our catalog-style name (albeto-base-6)
    title: str  # as printed (ALBETO base-6)
    hub_id: str  # the pretrained model the row starts from
    parameters: str  # as printed ("12M")
    speedup: float  # MACs of BETO / MACs of the model, batch 1, seq 512
    score: float  # mean of the 8 task scores (QA by F1), as printed
    results: dict[str, Cell]  # task key -> cell

    def task_score(self, task: str) -> Optional[float]:
        """The number the Score averages for `task` (QA: F1), None when not published."""
        cell = self.results.get(task)
        if cell is None:
            return None
        return cell[0] if isinstance(cell, tuple) else cell


def _row(key: str, title: str, hub_id: str, parameters: str, speedup: float, score: float,
         cells: tuple[Cell, ...]) -> PublishedModel:
    if len(cells) != len(TASKS):
        raise ValueError(f"{title}: {len(cells)} cells for {len(TASKS)} tasks")
    return PublishedModel(key, title, hub_id, parameters, speedup, score, dict(zip(TASK_KEYS, cells)))


_DCC = "dccuchile"
# Cells in TASKS order: MLDoc, PAWS-X, XNLI, POS, NER, MLQA, SQAC, TAR / XQuAD.
_FINETUNED_ROWS = (
    _row("beto-uncased", "BETO uncased", f"{_DCC}/bert-base-spanish-wwm-uncased", "110M", 1.00, 81.02,
         (96.38, 84.25, 77.76, 97.81, 80.85, (64.12, 40.83), (72.22, 53.45), (74.81, 54.62))),
    _row("beto", "BETO cased", f"{_DCC}/bert-base-spanish-wwm-cased", "110M", 1.00, 84.82,
         (96.65, 89.80, 81.98, 98.95, 87.14, (67.65, 43.38), (78.65, 60.94), (77.81, 56.97))),
    _row("distilbeto", "DistilBETO", f"{_DCC}/distilbert-base-spanish-uncased", "67M", 2.00, 76.73,
         (96.35, 75.80, 76.59, 97.67, 78.13, (57.97, 35.50), (64.41, 45.34), (66.97, 46.55))),
    _row("albeto-tiny", "ALBETO tiny", f"{_DCC}/albert-tiny-spanish", "5M", 18.05, 74.97,
         (95.82, 80.20, 73.43, 97.34, 75.42, (51.84, 28.28), (59.28, 39.16), (66.43, 45.71))),
    _row("albeto-base", "ALBETO base", f"{_DCC}/albert-base-spanish", "12M", 0.99, 83.25,
         (96.07, 87.95, 79.88, 98.21, 82.89, (66.12, 41.10), (77.71, 59.84), (77.18, 57.05))),
    _row("albeto-large", "ALBETO large", f"{_DCC}/albert-large-spanish", "18M", 0.28, 82.02,
         (92.22, 86.05, 78.94, 97.98, 82.36, (65.56, 40.98), (76.36, 56.54), (76.72, 56.21))),
    _row("albeto-xlarge", "ALBETO xlarge", f"{_DCC}/albert-xlarge-spanish", "59M", 0.07, 84.13,
         (95.70, 89.05, 81.68, 98.20, 81.42, (68.26, 43.76), (78.64, 59.26), (80.15, 59.66))),
    _row("albeto-xxlarge", "ALBETO xxlarge", f"{_DCC}/albert-xxlarge-spanish", "223M", 0.03, 85.17,
         (96.85, 89.85, 82.42, 98.43, 83.06, (70.17, 45.99), (81.49, 62.67), (79.13, 58.40))),
    _row("bertin", "BERTIN", "bertin-project/bertin-roberta-base-spanish", "125M", 1.00, 83.97,
         (96.47, 88.65, 80.50, 99.02, 85.66, (66.06, 42.16), (78.42, 60.05), (77.05, 57.14))),
    _row("roberta-bne-base", "RoBERTa BNE base", "PlanTL-GOB-ES/roberta-base-bne", "125M", 1.00, 84.83,
         (96.82, 89.90, 81.12, 99.00, 86.80, (67.31, 44.50), (80.53, 62.72), (77.16, 55.46))),
    _row("roberta-bne-large", "RoBERTa BNE large", "PlanTL-GOB-ES/roberta-large-bne", "355M", 0.28, 68.42,
         (97.00, 90.00, 51.62, 61.83, 21.47, (67.69, 44.88), (80.41, 62.14), (77.34, 56.97))),
)
_DISTILLED_ROWS = (
    _row("albeto-tiny", "ALBETO tiny", f"{_DCC}/albert-tiny-spanish", "5M", 18.05, 76.49,
         (96.40, 85.05, 75.99, 97.36, 72.51, (54.17, 32.22), (63.03, 43.35), (67.47, 46.13))),
    _row("albeto-base-2", "ALBETO base-2", f"{_DCC}/albert-base-2-spanish", "12M", 5.96, 72.98,
         (96.20, 76.75, 73.65, 97.17, 69.69, (48.62, 26.17), (58.40, 39.00), (63.41, 42.35))),
    _row("albeto-base-4", "ALBETO base-4", f"{_DCC}/albert-base-4-spanish", "12M", 2.99, 80.06,
         (96.35, 86.40, 78.68, 97.60, 74.58, (62.19, 38.28), (71.41, 52.87), (73.31, 52.43))),
    _row("albeto-base-6", "ALBETO base-6", f"{_DCC}/albert-base-6-spanish", "12M", 1.99, 82.70,
         (96.40, 88.45, 81.66, 97.82, 78.41, (66.35, 42.01), (76.99, 59.00), (75.59, 56.72))),
    _row("albeto-base-8", "ALBETO base-8", f"{_DCC}/albert-base-8-spanish", "12M", 1.49, 83.78,
         (96.70, 89.75, 82.55, 97.96, 80.23, (67.39, 42.94), (77.79, 59.63), (77.89, 56.72))),
    _row("albeto-base-10", "ALBETO base-10", f"{_DCC}/albert-base-10-spanish", "12M", 1.19, 84.32,
         (96.88, 89.95, 82.26, 98.00, 81.10, (68.29, 44.29), (79.89, 62.04), (78.21, 56.21))),
)

MODELS: dict[str, dict[str, PublishedModel]] = {
    FINETUNED: {m.key: m for m in _FINETUNED_ROWS},
    DISTILLED: {m.key: m for m in _DISTILLED_ROWS},
}


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def task_info(name: str) -> Optional[TaskInfo]:
    """The study task a run's `task.name` stands for (pawsx, PAWS-X, qa-sqac, ...), or None."""
    wanted = _norm(name)
    for task in TASKS:
        if wanted in {_norm(task.key), _norm(task.title), *(_norm(a) for a in task.aliases)}:
            return task
    return None


def find_model(block: str, ref: str) -> Optional[PublishedModel]:
    """The published row of `ref` in `block`: matched by catalog name, hub id, or a local
    folder named like the hub id's last part (a downloaded albert-tiny-spanish). None if absent."""
    if block not in MODELS:
        raise KeyError(f"unknown block '{block}'; blocks are {', '.join(BLOCKS)}")
    rows = MODELS[block]
    if ref in rows:
        return rows[ref]
    base = Path(ref.rstrip("/")).name
    for model in rows.values():
        if ref == model.hub_id or base == model.hub_id.split("/")[-1]:
            return model
    return None
