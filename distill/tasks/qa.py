"""Extractive question answering (MLQA, SQAC, TAR/XQuAD), SQuAD format.

Example row (flat SQuAD layout; `distill.formats.read_squad` turns nested files into it):
    {"id": "q1", "title": "Madrid", "context": "Madrid es la capital de España.",
     "question": "¿Cuál es la capital de España?",
     "answers": {"text": ["Madrid"], "answer_start": [0]}}

Features are windows over the context (`data.max_length` tokens, consecutive windows sharing
`data.doc_stride` tokens); the question is never truncated. Each feature carries:
    input_ids, attention_mask[, token_type_ids]
    start_positions, end_positions   the first answer's tokens, or the CLS position when the
                                     answer is not wholly inside this window
    context_mask  [seq]  1 on context tokens
    offset_mapping [seq, 2]  character span of each context token ([0, 0] elsewhere)
    cls_index, example_id, feature_id, length
Predictions take, over all windows of an example, the best-scoring start/end pair among the
`task.n_best` best starts and ends, inside the context, at most `task.max_answer_length` tokens.
Distillation compares start and end distributions over the context tokens of each window,
plus CLS (see `QATask.kd_pairs`). Teacher and student must share the tokenizer.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
import torch
from datasets import Dataset, DatasetDict, Features, List, Value

from transformers import AutoModelForQuestionAnswering

from distill.errors import DataError
from distill.metrics import answer_start_mismatch, squad_metrics
from distill.models import same_tokenizer
from distill.tasks.base import LogitPair, Task, column, require_columns
from distill.tasks.tagging import pad_lists

logger = logging.getLogger(__name__)

QA_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def locate_answer(context: str, text: str, start: int) -> int | None:
    """The character start of `text` in `context`: `start` when it points at the text, else the
    occurrence nearest to `start` (datasets with shifted offsets), else None (not in context)."""
    if not text:
        return None
    if context[start : start + len(text)] == text:
        return start
    found, best = context.find(text), None
    while found >= 0:
        if best is None or abs(found - start) < abs(best - start):
            best = found
        found = context.find(text, found + 1)
    return best


def answer_tokens(
    offsets: Sequence[Sequence[int]], context_mask: Sequence[int], start_char: int, end_char: int
) -> tuple[int, int] | None:
    """Token span [start, end] covering characters [start_char, end_char) when the window's
    context holds all of them, else None."""
    positions = [i for i, m in enumerate(context_mask) if m]
    if not positions:
        return None
    first, last = positions[0], positions[-1]
    if offsets[first][0] > start_char or offsets[last][1] < end_char:
        return None
    start = first
    while start <= last and offsets[start][1] <= start_char:
        start += 1
    end = last
    while end >= first and offsets[end][0] >= end_char:
        end -= 1
    if start > end:
        return None
    return start, end


def best_spans(
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    features: Dataset,
    contexts: Sequence[str],
    n_best: int = 20,
    max_answer_length: int = 30,
) -> list[dict[str, Any]]:
    """Best answer span of every example over all its windows.

    `start_logits`/`end_logits` are [features, seq] in feature order (padding beyond a feature's
    length is ignored). Only context tokens are candidates; a span scores start + end logit.
    Returns per example {"text", "score", "start", "end"} (character offsets; "" when no
    valid span exists).
    """
    best: list[dict[str, Any]] = [
        {"text": "", "score": float("-inf"), "start": -1, "end": -1} for _ in contexts
    ]
    cols = features.select_columns(["example_id", "offset_mapping", "context_mask", "length"])
    for f, (ex, offsets, ctx, length) in enumerate(
        zip(cols["example_id"], cols["offset_mapping"], cols["context_mask"], cols["length"])
    ):
        valid = np.asarray(ctx[:length], dtype=bool)  # [length]
        if not valid.any():
            continue
        s = np.where(valid, start_logits[f, :length], -np.inf)  # [length]
        e = np.where(valid, end_logits[f, :length], -np.inf)  # [length]
        k = min(n_best, int(valid.sum()))
        starts = np.argsort(-s, kind="stable")[:k]
        ends = np.argsort(-e, kind="stable")[:k]
        for i in starts:
            for j in ends:
                if j < i or j - i + 1 > max_answer_length:
                    continue
                score = float(s[i] + e[j])
                if score > best[ex]["score"]:
                    lo, hi = offsets[i][0], offsets[j][1]
                    best[ex] = {"text": contexts[ex][lo:hi], "score": score, "start": lo, "end": hi}
    return best


class QATask(Task):
    family = "qa"
    pipeline_tag = "question-answering"
    default_metric = "f1"
    # start_logits / end_logits [seq]; a feature's seq axis is `length` long (a batch column):
    # the teacher cache trims rows to it.
    kd_target_keys = ("start_logits", "end_logits")
    kd_target_lengths = {"start_logits": "length", "end_logits": "length"}

    def setup(self, raw: DatasetDict) -> None:
        self.id_col = column(self.cfg, "id", "id")
        self.question_col = column(self.cfg, "question", "question")
        self.context_col = column(self.cfg, "context", "context")
        self.answers_col = column(self.cfg, "answers", "answers")
        require_columns(
            raw,
            {"question": self.question_col, "context": self.context_col, "answers": self.answers_col},
        )
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
        self.labels = []

    def bind(self, tokenizer: Any, teacher_tokenizer: Any = None) -> None:
        if teacher_tokenizer is not None and not same_tokenizer(tokenizer, teacher_tokenizer):
            raise DataError(
                "QA distillation needs teacher and student with the same tokenizer: start/end "
                f"logits are compared position by position, and the teacher's "
                f"{type(teacher_tokenizer).__name__} splits the context differently from the "
                f"student's {type(tokenizer).__name__}. Use a student of the teacher's family "
                "(e.g. ALBETO teacher -> ALBETO students) or a teacher with the student's tokenizer."
            )
        self.tokenizer = tokenizer
        self.teacher_tokenizer = None  # same tokenizer: the student's features serve both

    def label_keys(self) -> tuple[str, ...]:
        return ("start_positions", "end_positions")

    def model_kwargs(self) -> dict[str, Any]:
        return {}

    def model_class(self) -> Any:
        return AutoModelForQuestionAnswering

    # --- features -------------------------------------------------------------------------
    def preprocess(self, raw: Dataset, split: str) -> Dataset:
        if self.tokenizer is None:
            raise RuntimeError("QATask.preprocess needs a tokenizer: call bind() first")
        tok = self.tokenizer
        if not getattr(tok, "is_fast", False):
            raise DataError(f"QA needs a fast tokenizer (offset mapping); {type(tok).__name__} is not")
        question_first = tok.padding_side == "right"
        max_length = min(self.cfg.data.max_length, tok.model_max_length)
        stride = self.cfg.data.doc_stride
        room = max_length - tok.num_special_tokens_to_add(pair=True)
        is_train = split == self.cfg.data.splits.train
        relocated = dropped = 0

        def windows(questions: list[str], contexts: list[str], stride: int) -> Any:
            first, second = (questions, contexts) if question_first else (contexts, questions)
            return tok(
                first,
                second,
                truncation="only_second" if question_first else "only_first",
                max_length=max_length,
                stride=stride,
                return_overflowing_tokens=True,
                return_offsets_mapping=True,
            )

        def encode(rows: dict, idx: list[int]) -> dict:
            nonlocal relocated, dropped
            # Leading spaces in questions only waste window room (some datasets have many).
            questions = [q.lstrip() for q in rows[self.question_col]]
            contexts = rows[self.context_col]
            q_lens = [len(ids) for ids in tok(questions, add_special_tokens=False)["input_ids"]]
            for i, n in enumerate(q_lens):
                if room - n < 1:
                    raise DataError(
                        f"row {idx[i]} of split '{split}': the question has {n} tokens and "
                        f"data.max_length={max_length} leaves no room for the context; questions "
                        "are never truncated, so raise data.max_length."
                    )
            # The tokenizer needs stride < context room; rows with long questions get a
            # smaller stride of their own instead of failing the batch.
            normal = [i for i, n in enumerate(q_lens) if room - n > stride]
            encodings: list[tuple[Any, int, int]] = []  # (encoding, index in it, row in batch)
            if normal:
                enc = windows([questions[i] for i in normal], [contexts[i] for i in normal], stride)
                for j, sample in enumerate(enc["overflow_to_sample_mapping"]):
                    encodings.append((enc, j, normal[sample]))
            for i in sorted(set(range(len(questions))) - set(normal)):
                enc = windows([questions[i]], [contexts[i]], (room - q_lens[i]) // 2)
                encodings.extend((enc, j, i) for j in range(len(enc["input_ids"])))
            encodings.sort(key=lambda item: item[2])  # stable: windows stay in context order

            # Character span of each row's first answer (None: no answer, or not in the text).
            spans: list[tuple[int, int] | None] = []
            for i, answers in enumerate(rows[self.answers_col]):
                if not answers["text"]:
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
            context_id = 1 if question_first else 0
            for enc, j, i in encodings:
                answers = rows[self.answers_col][i]
                if is_train and answers["text"] and spans[i] is None:
                    continue
                sequence_ids = enc.sequence_ids(j)
                ids = enc["input_ids"][j]
                mask = [int(s == context_id) for s in sequence_ids]
                offsets = [list(o) if m else [0, 0] for o, m in zip(enc["offset_mapping"][j], mask)]
                cls = ids.index(tok.cls_token_id) if tok.cls_token_id in ids else 0
                span = answer_tokens(offsets, mask, *spans[i]) if spans[i] else None
                out["start_positions"].append(span[0] if span else cls)
                out["end_positions"].append(span[1] if span else cls)
                for key in QA_INPUTS:
                    if key in enc:
                        out[key].append(enc[key][j])
                out["offset_mapping"].append(offsets)
                out["context_mask"].append(mask)
                out["cls_index"].append(cls)
                out["example_id"].append(idx[i])
            if "token_type_ids" not in tok.model_input_names:
                del out["token_type_ids"]
            out["length"] = [len(ids) for ids in out["input_ids"]]
            return out

        ints = List(Value("int32"))
        schema = {key: ints for key in QA_INPUTS if key in tok.model_input_names}
        schema.update(offset_mapping=List(ints), context_mask=List(Value("int8")))
        schema.update({k: Value("int64") for k in ("start_positions", "end_positions", "cls_index", "example_id", "length")})
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
        return features

    def collate(self, features: list[dict]) -> dict[str, torch.Tensor]:
        inputs = [{k: f[k] for k in QA_INPUTS if k in f} for f in features]
        batch = dict(self.tokenizer.pad(inputs, return_tensors="pt"))
        seq = batch["input_ids"].size(1)
        batch["context_mask"] = pad_lists([f["context_mask"] for f in features], 0, seq)  # [batch, seq]
        for key in ("start_positions", "end_positions", "cls_index", "example_id", "feature_id", "length"):
            batch[key] = torch.tensor([f[key] for f in features], dtype=torch.long)  # [batch]
        return batch

    # --- distillation ---------------------------------------------------------------------
    def kd_targets(self, outputs: Any, batch: dict, teacher: bool) -> dict[str, torch.Tensor]:
        return {
            "start_logits": outputs.start_logits,  # [batch, seq]
            "end_logits": outputs.end_logits,  # [batch, seq]
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
        Question tokens, SEP and padding are excluded from both softmaxes.
        """
        mask = self.kd_class_mask(batch)  # [batch, seq]
        seq = mask.size(1)
        pairs = []
        for key in ("start_logits", "end_logits"):
            s = student[key]  # [batch, seq]
            t = teacher[key].to(s.dtype)  # [batch, seq'] (a cached row may be padded otherwise)
            if t.size(1) >= seq:
                t = t[:, :seq]
            else:
                t = torch.cat([t, t.new_zeros(t.size(0), seq - t.size(1))], dim=1)
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
        start = np.asarray(outputs["start_logits"])  # [features, seq]
        end = np.asarray(outputs["end_logits"])  # [features, seq]
        if "feature_id" in outputs:  # put rows in feature order whatever order they came in
            order = np.argsort(np.asarray(outputs["feature_id"]).reshape(-1), kind="stable")
            start, end = start[order], end[order]
        if len(start) != len(features):
            raise ValueError(f"{len(start)} rows of QA outputs for {len(features)} features")
        return best_spans(
            start, end, features, raw[self.context_col],
            n_best=self.cfg.task.n_best, max_answer_length=self.cfg.task.max_answer_length,
        )

    def compute_metrics(
        self, outputs: dict[str, np.ndarray], features: Dataset, raw: Dataset
    ) -> dict[str, float]:
        """SQuAD exact_match / f1 (normalization from task.normalization) and the number of
        examples whose answer_start does not point at the answer text."""
        spans = self._spans(outputs, features, raw)
        references = [a["text"] for a in raw[self.answers_col]]
        metrics = squad_metrics(
            [s["text"] for s in spans], references, normalization=self.cfg.task.normalization
        )
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
        return [
            {
                "example_id": i,
                "id": ids[i],
                "question": raw[i][self.question_col],
                "prediction": span["text"],
                "answers": list(raw[i][self.answers_col]["text"]),
            }
            for i, span in enumerate(spans)
        ]
