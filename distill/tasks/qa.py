"""Extractive question answering (MLQA, SQAC, TAR/XQuAD), SQuAD format (v1.1, or v2.0 with
unanswerable questions when `task.version_2_with_negative=true`).

Example row (flat SQuAD layout; `distill.data.formats.read_squad` turns nested files into it):
    {"id": "q1", "title": "Madrid", "context": "Madrid es la capital de España.",
     "question": "¿Cuál es la capital de España?",
     "answers": {"text": ["Madrid"], "answer_start": [0]}}
(an unanswerable SQuAD v2 row has `"answers": {"text": [], "answer_start": []}`).

Features are windows over the context (`data.max_length` tokens, consecutive windows sharing
`data.doc_stride` tokens); the question is never truncated. Each feature carries:
    input_ids, attention_mask[, token_type_ids]
    start_positions, end_positions   the first answer's tokens, or the CLS position when the
                                     answer is not wholly inside this window (or there is none)
    context_mask  [seq]  1 on context tokens
    offset_mapping [seq, 2]  character span of each context token ([0, 0] elsewhere)
    cls_index, example_id, feature_id, length
and, only when the distillation teacher tokenizes differently (see "Across tokenizers"):
    teacher_input_ids, teacher_attention_mask[, teacher_token_type_ids]   one teacher window
    teacher_start_map, teacher_end_map  [teacher seq]  the student position that receives each
                         teacher position's start / end probability (-1: not in the softmax)
    teacher_covered [seq]  1 where the student position has a target (CLS + covered context)

Predictions take, over all windows of an example, the best-scoring start/end pair among the
`task.n_best` best starts and ends, inside the context, at most `task.max_answer_length` tokens.
With `version_2_with_negative`, the example's null score (the lowest start + end logit at CLS
over its windows) beats that span by more than `task.null_score_diff_threshold` -> "" (no
answer), and the metrics are SQuAD v2's (has-answer / no-answer splits and best thresholds).

Distillation compares start and end distributions over the context tokens of each window plus
CLS (see `QATask.kd_pairs`).

Across tokenizers (a RoBERTa-BNE or XLM-R teacher for an ALBETO student): teacher and student
tokenize each (question, context) independently, each with its own windows. Each student
window gets one teacher window (`pick_teacher_window`: the one covering most of the student
window's context characters; among those covering all of it, the one where it is most central)
and index maps built from both tokenizers' character offsets (`map_positions`). At the teacher
forward, `kd_targets(teacher=True)` moves the teacher's start/end probabilities onto the
student's positions (`move_probabilities`): a teacher token's start mass goes to the student
token where an answer starting at that token's first (non-space) character would start for the
student, its end mass where an answer ending at its last character would end, and mass that
falls outside the student window goes to the student's CLS ("not in this window"). The result
is renormalised over the student positions that have a target: CLS and the context tokens
inside the teacher window. So the teacher cache stores
targets already in the student's positions (its key includes the student tokenizer); the loop
and the loss do not change. See docs/qa-across-tokenizers.md for the rules and what they cost.

Windows, answer alignment (also across tokenizers, through characters) and span search live in
tasks/qa_spans.py; scoring in tasks/metrics.py. All of them use the same character offsets.
"""

from __future__ import annotations

import hashlib
import logging
import math
from typing import Any, Optional, Sequence

import numpy as np
import torch
from datasets import Dataset, DatasetDict, Features, List, Value

from transformers import AutoModelForQuestionAnswering

from distill.data.rows import locate_answer
from distill.errors import DataError, StageError
from distill.tasks.metrics import answer_start_mismatch, squad_metrics, squad_v2_metrics
from distill.models import same_tokenizer
from distill.tasks.base import TEACHER_PREFIX, LogitPair, Task, column, fit_width, pad_lists, require_columns

logger = logging.getLogger(__name__)
from distill.tasks.qa_spans import (
    CROSS_MAPS,
    QA_INPUTS,
    answer_tokens,
    best_spans,
    has_answer,
    map_positions,
    move_probabilities,
    pick_teacher_window,
    question_lengths,
    tokenize_windows,
)


class QATask(Task):
    family = "qa"
    pipeline_tag = "question-answering"
    default_metric = "f1"
    # start_logits / end_logits [seq] (+ kd_mask [seq] across tokenizers); a feature's seq axis
    # is `length` long (a batch column): the teacher cache trims rows to it.
    kd_target_keys = ("start_logits", "end_logits")
    kd_target_lengths = {"start_logits": "length", "end_logits": "length", "kd_mask": "length"}

    @property
    def metric_names(self) -> tuple[str, ...]:  # type: ignore[override]
        """What `compute_metrics` returns (checked against task.metric before training)."""
        names = ("exact_match", "f1", "examples", "answer_start_mismatches")
        if self.settings.version_2_with_negative:
            for part in ("has_answer", "no_answer"):
                names += (f"{part}_exact_match", f"{part}_f1", f"{part}_examples")
            names += ("best_exact_match", "best_exact_match_threshold", "best_f1", "best_f1_threshold")
        return names

    def __init__(self, settings: Any, data: Any):
        super().__init__(settings, data)
        self.teacher_max_length: Optional[int] = None
        self.teacher_doc_stride: Optional[int] = None
        self.teacher_key = "teacher"  # how the recipe names the teacher (its windows' messages)

    def setup(self, raw: DatasetDict) -> None:
        """Check columns, answers and texts of every split (fails naming split and row)."""
        self.id_col = column(self.data, "id", "id")
        self.question_col = column(self.data, "question", "question")
        self.context_col = column(self.data, "context", "context")
        self.answers_col = column(self.data, "answers", "answers")
        require_columns(
            raw,
            {"question": self.question_col, "context": self.context_col, "answers": self.answers_col},
        )
        v2 = self.settings.version_2_with_negative
        for split, ds in raw.items():
            if len(ds) == 0:
                continue
            answers = ds[0][self.answers_col]
            if not isinstance(answers, dict) or not {"text", "answer_start"} <= set(answers):
                raise DataError(
                    f"split '{split}': column '{self.answers_col}' must hold "
                    f"{{text: [...], answer_start: [...]}} (flat SQuAD rows), got {answers!r}. "
                    "Nested SQuAD files (data -> paragraphs -> qas) load with data.format=squad."
                )
            for role, col in (("question", self.question_col), ("context", self.context_col)):
                bad = [i for i, text in enumerate(ds[col]) if not isinstance(text, str) or not text.strip()]
                if bad:
                    raise DataError(
                        f"split '{split}': {len(bad)} rows have a null or empty {role} (column "
                        f"'{col}'), first at row {bad[0]}{self._row_id(ds, bad[0])}. Fix or drop them."
                    )
            answerable = [has_answer(a) for a in ds[self.answers_col]]
            missing = [i for i, ok in enumerate(answerable) if not ok]
            if missing and not v2:
                raise DataError(
                    f"split '{split}': {len(missing)} of {len(ds)} questions have no answer (SQuAD v2 "
                    f"unanswerable questions), first at row {missing[0]}{self._row_id(ds, missing[0])}. "
                    "Set task.version_2_with_negative=true to train and score them (a question gets "
                    "no answer when its null score beats the best span by "
                    "task.null_score_diff_threshold), or drop them from the data."
                )
            if split in ("validation", "test") and not any(answerable):
                raise DataError(
                    f"split '{split}' has no answerable question ({len(ds)} rows, none with an "
                    f"answer in column '{self.answers_col}'): its F1 and exact match would say "
                    "nothing about answering. Use a split with answers or set "
                    f"data.splits.{split}=null."
                )
        self.labels = []

    def _row_id(self, ds: Dataset, i: int) -> str:
        return f" (id {ds[i][self.id_col]!r})" if self.id_col in ds.column_names else ""

    # --- tokenizers -------------------------------------------------------------------------
    def bind(
        self, tokenizer: Any, teacher_tokenizer: Any = None, plan_tokenizers: Sequence[Any] = (),
        teacher_windows: tuple[Optional[int], Optional[int]] = (None, None), teacher_key: str = "teacher",
    ) -> None:
        """Tokenizer of the trained model, and the teacher's. A teacher that tokenizes
        differently is aligned through the context's characters (see the module docstring), in
        windows of its own `teacher_windows` = (max_length, doc_stride) when given (`teacher_key`:
        how the recipe names that teacher, for messages).
        QA windows follow one teacher's tokenizer: further tokenizers to plan over are refused
        (several QA teachers share the student's tokenizer). The trained model's tokenizer must
        pad on the right: the context mask, answer positions and CLS index are built for that."""
        if getattr(tokenizer, "padding_side", "right") == "left":
            raise StageError(
                f"the tokenizer {getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__} "
                f"({type(tokenizer).__name__}) pads on the left, but QA features place the context "
                "mask, answer positions and CLS index for right padding, so every batch would be "
                "misaligned. Save the tokenizer with \"padding_side\": \"right\" in its "
                "tokenizer_config.json, or use a model whose tokenizer pads on the right."
            )
        self.teacher_key = teacher_key
        if plan_tokenizers:
            raise ValueError(
                "QA windows follow the student's and one teacher's tokenizer; several teachers "
                "must share the student's tokenizer"
            )
        self.plan_tokenizers = []
        if teacher_tokenizer is None or same_tokenizer(tokenizer, teacher_tokenizer):
            self.tokenizer, self.teacher_tokenizer = tokenizer, None  # one set of features serves both
            self.kd_target_keys = type(self).kd_target_keys
            return
        self.bind_across(tokenizer, teacher_tokenizer, *teacher_windows)

    def bind_across(
        self,
        tokenizer: Any,
        teacher_tokenizer: Any,
        teacher_max_length: Optional[int] = None,
        teacher_doc_stride: Optional[int] = None,
    ) -> None:
        """Align a teacher through character offsets, even when the tokenizers agree (`bind`
        calls it when they differ; with equal tokenizers the mapped targets equal the teacher's
        own softmax, which the tests check). The teacher's windows take the given sizes, else
        `data.max_length` / `data.doc_stride`."""
        for role, tok in (("student", tokenizer), ("teacher", teacher_tokenizer)):
            if not getattr(tok, "is_fast", False):
                raise DataError(
                    "QA distillation between tokenizers that differ moves the teacher's start/end "
                    f"probabilities through character offsets, and the {role}'s "
                    f"{type(tok).__name__} is a slow tokenizer with no offset mapping. Load a fast "
                    "tokenizer (use_fast=True; convert a SentencePiece one with the tokenizers "
                    "library) or use a teacher that shares the student's tokenizer."
                )
        self.tokenizer, self.teacher_tokenizer = tokenizer, teacher_tokenizer
        self.teacher_max_length = teacher_max_length
        self.teacher_doc_stride = teacher_doc_stride
        self.kd_target_keys = (*type(self).kd_target_keys, "kd_mask")

    @property
    def across_tokenizers(self) -> bool:
        return self.teacher_tokenizer is not None

    def label_keys(self) -> tuple[str, ...]:
        return ("start_positions", "end_positions")

    def model_kwargs(self) -> dict[str, Any]:
        return {}

    def model_class(self) -> Any:
        return AutoModelForQuestionAnswering

    def _window_sizes(self, tok: Any, teacher: bool) -> tuple[int, int, str]:
        """(max_length, doc_stride, the key that sets max_length) of one side's windows."""
        own = teacher and self.teacher_max_length
        max_length = own or self.data.max_length
        stride = (teacher and self.teacher_doc_stride) or self.data.doc_stride
        return min(max_length, tok.model_max_length), stride, f"{self.teacher_key}.max_length" if own else "data.max_length"

    def check_windows(self, raw: DatasetDict) -> None:
        """Before any stage trains: every question of every split leaves room for context in
        the student's windows and, across tokenizers, in the teacher's (DataError naming the
        split, the row and the key to raise)."""
        sides = [(self.tokenizer, False)] + ([(self.teacher_tokenizer, True)] if self.teacher_tokenizer is not None else [])
        for split, ds in raw.items():
            questions = [str(q or "").lstrip() for q in ds[self.question_col]]
            where = [f"row {i} of split '{split}'" for i in range(len(questions))]
            for tok, teacher in sides:
                max_length, _, key = self._window_sizes(tok, teacher)
                question_lengths(tok, questions, max_length, where, key)

    # --- features -------------------------------------------------------------------------
    def preprocess(self, raw: Dataset, split: str) -> Dataset:
        if self.tokenizer is None:
            raise RuntimeError("QATask.preprocess needs a tokenizer: call bind() first")
        tok, ttok = self.tokenizer, self.teacher_tokenizer
        if not getattr(tok, "is_fast", False):
            raise DataError(f"QA needs a fast tokenizer (offset mapping); {type(tok).__name__} is not")
        # `split` is the role (train / validation / test), whatever source split it came from:
        # training drops answers that are not in their context; evaluation keeps every example.
        is_train = split == "train"
        relocated = dropped = 0
        coverage = [0, 0]  # student context tokens inside their teacher window, all of them

        def encode(rows: dict, idx: list[int]) -> dict:
            nonlocal relocated, dropped
            # Leading spaces in questions only waste window room (some datasets have many).
            questions = [q.lstrip() for q in rows[self.question_col]]
            contexts = rows[self.context_col]
            where = [f"row {i} of split '{split}'" for i in idx]
            max_length, stride, key = self._window_sizes(tok, False)
            student = tokenize_windows(tok, questions, contexts, max_length, stride, where, key)
            teacher = None
            if ttok is not None:
                max_length, stride, key = self._window_sizes(ttok, True)
                teacher = tokenize_windows(ttok, questions, contexts, max_length, stride, where, key)

            # Character span of each row's first answer (None: no answer, or not in the text).
            spans: list[tuple[int, int] | None] = []
            for i, answers in enumerate(rows[self.answers_col]):
                if not has_answer(answers):
                    spans.append(None)
                    continue
                text, given = answers["text"][0], int(answers["answer_start"][0])
                found = locate_answer(contexts[i], text, given)
                if found is None:
                    dropped += is_train  # nothing to learn from an answer that is not in the text
                elif found != given:
                    relocated += 1
                spans.append(None if found is None else (found, found + len(text)))
            out: dict[str, list] = {k: [] for k in (*QA_INPUTS, "offset_mapping", "context_mask")}
            for k in ("start_positions", "end_positions", "cls_index", "example_id"):
                out[k] = []
            if teacher is not None:
                for k in (*QA_INPUTS, "start_map", "end_map", "covered"):
                    out[TEACHER_PREFIX + k] = []
            for i, windows in enumerate(student):
                if is_train and has_answer(rows[self.answers_col][i]) and spans[i] is None:
                    continue
                t_bounds = [w.bounds() for w in teacher[i]] if teacher is not None else []
                for w in windows:
                    span = answer_tokens(w.offsets, w.context_mask, *spans[i]) if spans[i] else None
                    out["start_positions"].append(span[0] if span else w.cls_index)
                    out["end_positions"].append(span[1] if span else w.cls_index)
                    for key, value in w.inputs.items():
                        out[key].append(value)
                    out["offset_mapping"].append(w.offsets)
                    out["context_mask"].append(w.context_mask)
                    out["cls_index"].append(w.cls_index)
                    out["example_id"].append(idx[i])
                    if teacher is not None:
                        tw = teacher[i][pick_teacher_window(w.bounds(), t_bounds)]
                        start_map, end_map, covered = map_positions(contexts[i], w, tw)
                        for key, value in tw.inputs.items():
                            out[TEACHER_PREFIX + key].append(value)
                        out[TEACHER_PREFIX + "start_map"].append(start_map)
                        out[TEACHER_PREFIX + "end_map"].append(end_map)
                        out[TEACHER_PREFIX + "covered"].append(covered)
                        coverage[0] += sum(c for c, m in zip(covered, w.context_mask) if m)
                        coverage[1] += sum(w.context_mask)
            for prefix, t in (("", tok), (TEACHER_PREFIX, ttok)):
                if t is not None and "token_type_ids" not in t.model_input_names:
                    del out[prefix + "token_type_ids"]
            out["length"] = [len(ids) for ids in out["input_ids"]]
            return out

        ints = List(Value("int32"))
        schema = {key: ints for key in QA_INPUTS if key in tok.model_input_names}
        schema.update(offset_mapping=List(ints), context_mask=List(Value("int8")))
        schema.update({k: Value("int64") for k in ("start_positions", "end_positions", "cls_index", "example_id", "length")})
        if ttok is not None:
            schema.update({TEACHER_PREFIX + k: ints for k in QA_INPUTS if k in ttok.model_input_names})
            schema.update({k: ints for k in CROSS_MAPS})
            schema[TEACHER_PREFIX + "covered"] = List(Value("int8"))
        features = raw.map(
            encode,
            batched=True,
            with_indices=True,
            remove_columns=raw.column_names,
            features=Features(schema),  # declared types: Arrow skips inferring nested lists
            desc=f"tokenizing {split}",
            new_fingerprint=self.features_fingerprint(raw, split),
        )
        features = features.add_column("feature_id", list(range(len(features))))
        # Counted in this process; the map runs here unless datasets served it from its cache.
        if relocated or dropped:
            logger.warning(
                "%s: %d answers had an answer_start that does not point at their text and were "
                "found elsewhere in the context; %d answers not in the context were left out of "
                "training",
                split, relocated, dropped,
            )
        if coverage[1]:
            share = coverage[0] / coverage[1]
            hint = (
                ". A teacher whose tokenizer needs more tokens for the same text sees less of the "
                "context per window: raise teacher.max_length so its windows cover the student's"
            )
            (logger.warning if share < 0.9 else logger.info)(
                "%s: %.1f%% of the student's context tokens lie inside the teacher window that "
                "gives their window its targets; the others get no KD target%s",
                split, 100 * share, hint if share < 0.9 else "",
            )
        return features

    def features_fingerprint(self, raw: Dataset, split: str) -> str:
        """The base fingerprint plus the teacher's own window sizes (when set apart)."""
        base = super().features_fingerprint(raw, split)
        if self.teacher_tokenizer is None or (self.teacher_max_length, self.teacher_doc_stride) == (None, None):
            return base
        sizes = f"{base}:{self.teacher_max_length}:{self.teacher_doc_stride}"
        return hashlib.sha256(sizes.encode()).hexdigest()[:32]

    def collate(self, features: list[dict]) -> dict[str, torch.Tensor]:
        inputs = [{k: f[k] for k in QA_INPUTS if k in f} for f in features]
        batch = dict(self.tokenizer.pad(inputs, return_tensors="pt"))
        seq = batch["input_ids"].size(1)
        batch["context_mask"] = pad_lists([f["context_mask"] for f in features], 0, seq)  # [batch, seq]
        for key in ("start_positions", "end_positions", "cls_index", "example_id", "feature_id", "length"):
            batch[key] = torch.tensor([f[key] for f in features], dtype=torch.long)  # [batch]
        if self.teacher_tokenizer is not None:
            t_inputs = [{k: f[TEACHER_PREFIX + k] for k in QA_INPUTS if TEACHER_PREFIX + k in f} for f in features]
            padded = self.teacher_tokenizer.pad(t_inputs, return_tensors="pt")
            batch.update({TEACHER_PREFIX + k: v for k, v in padded.items()})  # [batch, t_seq]
            t_seq = padded["input_ids"].size(1)
            left = self.teacher_tokenizer.padding_side == "left"
            for key in CROSS_MAPS:
                rows = [f[key] for f in features]
                if left:  # the maps follow the teacher's tokens wherever its padding goes
                    rows = [[-1] * (t_seq - len(r)) + list(r) for r in rows]
                batch[key] = pad_lists(rows, -1, t_seq)  # [batch, t_seq]
            batch[TEACHER_PREFIX + "covered"] = pad_lists(
                [f[TEACHER_PREFIX + "covered"] for f in features], 0, seq
            )  # [batch, seq]
        return batch

    # --- distillation ---------------------------------------------------------------------
    def kd_targets(self, outputs: Any, batch: dict, teacher: bool) -> dict[str, torch.Tensor]:
        """Start/end logits [batch, seq]. Across tokenizers, the teacher's are log-probabilities
        already moved onto the student's positions, plus `kd_mask` [batch, seq]: the student
        positions that have a target (the student's own `kd_mask` is its KD class mask)."""
        if self.teacher_tokenizer is None:
            return {
                "start_logits": outputs.start_logits,  # [batch, seq]
                "end_logits": outputs.end_logits,  # [batch, seq]
            }
        if not teacher:
            return {
                "start_logits": outputs.start_logits,  # [batch, seq]
                "end_logits": outputs.end_logits,  # [batch, seq]
                "kd_mask": self.kd_class_mask(batch),  # [batch, seq]
            }
        covered = batch[TEACHER_PREFIX + "covered"].bool()  # [batch, seq]
        return {
            "start_logits": move_probabilities(outputs.start_logits, batch["teacher_start_map"], covered),
            "end_logits": move_probabilities(outputs.end_logits, batch["teacher_end_map"], covered),
            "kd_mask": covered,
        }

    def kd_class_mask(self, batch: dict) -> torch.Tensor:
        """Positions that take part in the KD softmaxes: the window's context tokens and CLS."""
        mask = batch["context_mask"].bool().clone()  # [batch, seq]
        rows = torch.arange(mask.size(0), device=mask.device)
        mask[rows, batch["cls_index"]] = True
        return mask

    def kd_pairs(self, student: dict, teacher: dict, batch: dict) -> list[LogitPair]:
        """Start and end distributions over the context tokens of each window, plus CLS.

        CLS stays in the class set: a window that does not hold the answer is trained (by the
        teacher's own fine-tuning) to point at CLS, and the teacher's CLS mass is what tells the
        student how little to trust this window's context. Without CLS the context logits of
        answerless windows would be free up to a shift, and spans from different windows of
        one example (compared by raw logit sums in post-processing) would not be comparable.
        Question tokens, SEP and padding are excluded from both softmaxes. Across tokenizers,
        the class set is further limited to the positions the teacher window covers
        (`kd_mask`), and the teacher's CLS target also holds the mass that fell outside the
        student window.
        """
        mask = self.kd_class_mask(batch)  # [batch, seq]
        seq = mask.size(1)
        if "kd_mask" in teacher:
            mask = mask & fit_width(teacher["kd_mask"].bool().to(mask.device), seq, False)
        pairs = []
        for key in ("start_logits", "end_logits"):
            s = student[key]  # [batch, seq]
            t = fit_width(teacher[key].to(s.dtype), seq)  # [batch, seq]
            pairs.append(LogitPair(s, t, class_mask=mask))
        return pairs

    # --- evaluation -----------------------------------------------------------------------
    def eval_outputs(self, outputs: Any, batch: dict) -> dict[str, torch.Tensor]:
        return {
            "start_logits": outputs.start_logits.float(),  # [batch, seq]
            "end_logits": outputs.end_logits.float(),  # [batch, seq]
            "feature_id": batch["feature_id"],  # [batch]
        }

    def _spans(self, outputs: dict[str, np.ndarray], features: Dataset, raw: Dataset) -> list[dict]:
        """Best span per example; with v2, `text` is "" when the null score wins."""
        start = np.asarray(outputs["start_logits"])  # [features, seq]
        end = np.asarray(outputs["end_logits"])  # [features, seq]
        if "feature_id" in outputs:  # put rows in feature order whatever order they came in
            order = np.argsort(np.asarray(outputs["feature_id"]).reshape(-1), kind="stable")
            start, end = start[order], end[order]
        if len(start) != len(features):
            raise ValueError(f"{len(start)} rows of QA outputs for {len(features)} features")
        spans = best_spans(
            start, end, features, raw[self.context_col],
            n_best=self.settings.n_best, max_answer_length=self.settings.max_answer_length,
        )
        for span in spans:
            span["span_text"] = span["text"]
            span["null_score_diff"] = span["null_score"] - span["score"]  # +inf without a span
            if self.settings.version_2_with_negative and span["null_score_diff"] > self.settings.null_score_diff_threshold:
                span["text"] = ""
        return spans

    def compute_metrics(
        self, outputs: dict[str, np.ndarray], features: Dataset, raw: Dataset
    ) -> dict[str, float]:
        """SQuAD exact_match / f1 (normalization from task.normalization) and the number of
        examples whose answer_start does not point at the answer text; with
        `version_2_with_negative`, SQuAD v2's metrics (see `distill.tasks.metrics.squad_v2_metrics`)."""
        spans = self._spans(outputs, features, raw)
        references = [[t for t in a["text"] if t.strip()] for a in raw[self.answers_col]]
        norm = self.settings.normalization
        if self.settings.version_2_with_negative:
            metrics = squad_v2_metrics(
                [s["span_text"] for s in spans],
                [s["null_score_diff"] for s in spans],
                references,
                threshold=self.settings.null_score_diff_threshold,
                normalization=norm,
            )
        else:
            metrics = squad_metrics([s["text"] for s in spans], references, normalization=norm)
        metrics["answer_start_mismatches"] = float(
            sum(
                answer_start_mismatch(c, a["text"], a["answer_start"])
                for c, a in zip(raw[self.context_col], raw[self.answers_col])
            )
        )
        return metrics

    def predictions(self, outputs: dict[str, np.ndarray], features: Dataset, raw: Dataset) -> list:
        spans = self._spans(outputs, features, raw)
        ids = raw[self.id_col] if self.id_col in raw.column_names else list(range(len(raw)))
        rows = []
        for i, span in enumerate(spans):
            row = {
                "example_id": i,
                "id": ids[i],
                "question": raw[i][self.question_col],
                "prediction": span["text"],
                "answers": list(raw[i][self.answers_col]["text"]),
            }
            if self.settings.version_2_with_negative:
                diff = span["null_score_diff"]
                row["null_score_diff"] = diff if math.isfinite(diff) else None  # None: no valid span
            rows.append(row)
        return rows
