"""Token classification: one tag per pre-tokenized word (NER with BIO tags, POS with UPOS).

Example row (conll2002 `es`, with `data.columns: {tokens: tokens, tags: ner_tags}`):
    {"tokens": ["Juan", "vive", "en", "Madrid", "."], "ner_tags": [1, 0, 0, 5, 0]}
Tags may be ClassLabel ids (names from the feature), plain strings, or plain ids (ordered
numerically; `task.labels` names them). A CoNLL-U treebank (`data.format: conllu`) gives
`tokens` (FORM) and `tags` (UPOS); `data.columns: {tags: xpos}` trains on XPOS instead.

Features are windows of whole words: a sentence longer than `data.max_length` sub-tokens is cut
into overlapping word windows (overlap up to `data.doc_stride` sub-tokens, at most half a
window), every word is scored in exactly one window (the one where it has the most context on
both sides), and a single word longer than a window gets a window of its own, truncated after
its first sub-tokens. Each feature carries:
    input_ids, attention_mask[, token_type_ids]   the window, with special tokens
    labels        [seq]  the word's tag id on its first sub-token, -100 elsewhere (with
                         `task.label_all_tokens`, later sub-tokens get the I- form of a B- tag)
    word_starts   [num_words]  position of each window word's first sub-token, -1 when the
                         tokenizer keeps nothing of the word (e.g. a lone zero-width space)
    score_words   [num_words]  1 where this window is the one that scores the word
    word_offset, num_words, example_id, feature_id, length
    teacher_input_ids, teacher_attention_mask[, teacher_token_type_ids], teacher_word_starts
                         only when the teacher tokenizes differently (same word windows)
The windows fit every tokenizer's budget: the student's, the teacher's, and the other teachers'
(`plan_tokenizers`, when several teachers tokenize apart), so each teacher's copy of the
features has the same windows, hence the same feature ids.

Distillation is word level: logits at each word's first sub-token, for student and teacher
each through its own tokenizer's `word_starts`, compared on the words both tokenizations kept.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
import torch
from datasets import ClassLabel, Dataset, DatasetDict
from transformers import AutoModelForTokenClassification

from distill.tasks.metrics import seqeval_metrics, token_accuracy
from distill.data.read import column_list, is_null, label_problem, origin, refuse_or_drop
from distill.errors import DataError
from distill.data.labels import LabelSpace, label_space
from distill.models import tokenizer_digest
from distill.tasks.base import TEACHER_PREFIX, LogitPair, Task, column, require_columns, fit_width, pad_lists

logger = logging.getLogger(__name__)

IGNORE = -100  # label of positions the cross-entropy skips


def tag_space(raw: DatasetDict, tags_col: str, declared: list[str] = ()) -> LabelSpace:
    """The tag names of `tags_col` (`distill.data.labels`): a ClassLabel sequence's names, integer
    ids "0".."max" in numeric order, or the sorted tags of the training split; `declared`
    (task.labels) overrides names and order. A tag in an evaluation split that training never
    saw is an error: the model would have no output for it.
    """
    first = raw["train"] if "train" in raw else next(iter(raw.values()))
    inner = getattr(first.features[tags_col], "feature", None)  # item type of a List / LargeList
    names = list(inner.names) if isinstance(inner, ClassLabel) else None
    values = {
        split: ((row, tag) for row, tags in enumerate(column_list(ds, tags_col)) for tag in tags)
        for split, ds in raw.items()
    }
    return label_space(
        values, column=tags_col, declared=declared, feature_names=names, what="tag",
        where=lambda s: origin(raw, s),
    )


def sentence_problem(
    words: Any, tags: Any, num_classes: int | None = None, words_col: str = "tokens", tags_col: str = "tags"
) -> str | None:
    """Why a (words, tags) row cannot be trained on (None when it can): null or empty words,
    null or empty tags, or a different number of words and tags."""
    where = f"column '{words_col}'"
    if is_null(words):
        return f"{where} is null"
    if not isinstance(words, (list, tuple)):
        return f"{where} is a {type(words).__name__}, not a list of words"
    if not words:
        return f"{where} has no words"
    for j, word in enumerate(words):
        if is_null(word):
            return f"{where}: word {j} is null"
        if isinstance(word, str) and not word.strip():
            return f"{where}: word {j} is empty"
    where = f"column '{tags_col}'"
    if is_null(tags):
        return f"{where} is null"
    if not isinstance(tags, (list, tuple)):
        return f"{where} is a {type(tags).__name__}, not a list of tags"
    if len(tags) != len(words):
        return f"{len(words)} words ('{words_col}') but {len(tags)} tags ('{tags_col}')"
    for j, tag in enumerate(tags):
        problem = label_problem(tag)
        if num_classes is not None and not problem and not 0 <= int(tag) < num_classes:
            problem = f"is {tag!r}, not one of the {num_classes} classes"
        if problem:
            return f"{where}: tag {j} (of word {words[j]!r}) {problem}"
    return None


def plan_windows(
    counts: Sequence[Sequence[int]], budgets: Sequence[int], overlap: int
) -> list[tuple[int, int]]:
    """Word windows [start, end) that fit every tokenizer's budget of sub-tokens.

    `counts[k][i]` is the number of sub-tokens tokenizer k gives word i. Consecutive windows
    share trailing words worth at most `overlap` sub-tokens (for every tokenizer) and always
    move forward by at least one word; a word over budget gets a window of its own.
    """
    n = len(counts[0])
    windows: list[tuple[int, int]] = []
    start = 0
    while start < n:
        end, used = start, [0] * len(counts)
        while end < n and all(used[k] + counts[k][end] <= budgets[k] for k in range(len(counts))):
            for k in range(len(counts)):
                used[k] += counts[k][end]
            end += 1
        if end == start:  # one word longer than the window: alone, truncated when tokenized
            end = start + 1
        windows.append((start, end))
        if end >= n:
            break
        nxt, back = end, [0] * len(counts)
        while nxt - 1 > start and all(
            back[k] + counts[k][nxt - 1] <= overlap for k in range(len(counts))
        ):
            nxt -= 1
            for k in range(len(counts)):
                back[k] += counts[k][nxt]
        start = nxt
    return windows


def scoring_windows(counts: Sequence[int], windows: list[tuple[int, int]]) -> list[int]:
    """For each word, the index of the window that scores it: the one where the word has the
    most sub-tokens of context on its poorer side (ties: more context in all, then earlier)."""
    best: list[tuple[float, int]] = [(-1.0, -1)] * len(counts)
    for w, (start, end) in enumerate(windows):
        before, total = 0, sum(counts[start:end])
        for i in range(start, end):
            after = total - before - counts[i]
            score = min(before, after) + 0.01 * (before + after)
            if score > best[i][0]:
                best[i] = (score, w)
            before += counts[i]
    return [w for _, w in best]


def word_starts_of(word_ids: list[int | None], num_words: int) -> list[int]:
    """Position of each word's first sub-token (-1 for words the tokenizer dropped)."""
    starts = [-1] * num_words
    for pos, word in enumerate(word_ids):
        if word is not None and starts[word] < 0:
            starts[word] = pos
    return starts


def gather_words(logits: torch.Tensor, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at each word's first sub-token, and which words exist (start >= 0)."""
    mask = starts >= 0  # [batch, words]
    index = starts.clamp(min=0).unsqueeze(-1).expand(-1, -1, logits.size(-1))  # [batch, words, labels]
    words = logits.gather(1, index)  # [batch, words, labels]
    return words.masked_fill(~mask.unsqueeze(-1), 0.0), mask


class TaggingTask(Task):
    family = "tagging"
    pipeline_tag = "token-classification"
    default_metric = "f1"
    metric_names = ("f1", "precision", "recall", "accuracy")
    # word_logits [words, labels] and word_mask [words]; the word axis of a feature is
    # `num_words` long (a batch column): the teacher cache trims rows to it.
    kd_target_keys = ("word_logits", "word_mask")
    kd_target_lengths = {"word_logits": "num_words", "word_mask": "num_words"}

    def setup(self, raw: DatasetDict) -> None:
        """Check columns and rows, and read the tag names. A sentence with null or empty words
        or tags, or as many tags as words, stops the run naming split, file and row, or with
        `data.drop_invalid` is dropped from `raw` in place (the count is logged)."""
        self.tokens_col = column(self.data, "tokens", "tokens")
        self.tags_col = column(self.data, "tags", "tags")
        require_columns(raw, {"tokens": self.tokens_col, "tags": self.tags_col})
        train = raw["train"] if "train" in raw else next(iter(raw.values()))
        if not any(not is_null(t) for tags in column_list(train, self.tags_col) if tags for t in tags):
            raise DataError(
                f"column '{self.tags_col}' of {origin(raw, 'train')} holds no tags: every value "
                "is null (CoNLL-U writes '_' where a treebank has no tag). Pick another column "
                "with data.columns.tags=<column> (CoNLL-U files: tags = UPOS, or xpos)."
            )
        bad = {}
        for split, ds in raw.items():
            inner = getattr(ds.features[self.tags_col], "feature", None)
            classes = inner.num_classes if isinstance(inner, ClassLabel) else None
            rows = zip(column_list(ds, self.tokens_col), column_list(ds, self.tags_col))
            bad[split] = [
                (row, problem)
                for row, (words, tags) in enumerate(rows)
                if (problem := sentence_problem(words, tags, classes, self.tokens_col, self.tags_col))
            ]
        refuse_or_drop(raw, bad, self.data.drop_invalid)
        self.label_space = tag_space(raw, self.tags_col, list(self.settings.labels))
        self.labels = self.label_space.names
        index = {name: i for i, name in enumerate(self.labels)}
        # Later sub-tokens of a B-X word take I-X when it exists (label_all_tokens).
        self._inside = [
            index.get("I-" + name[2:], i) if name.startswith("B-") else i
            for i, name in enumerate(self.labels)
        ]

    def _tag_ids(self, tags: list[Any]) -> list[int]:
        return [self.label_space.id_of(t) for t in tags]

    def _fallback_label(self) -> str:
        """Prediction for a word no token represents (nothing to score it with)."""
        return "O" if "O" in self.labels else self.labels[0]

    # --- features -------------------------------------------------------------------------
    def _tokenizers(self) -> list[Any]:
        """The tokenizers whose inputs the features carry: the student's, then the teacher's."""
        tokenizers = [self.tokenizer]
        if self.teacher_tokenizer is not None:
            tokenizers.append(self.teacher_tokenizer)
        return tokenizers

    def _planning_tokenizers(self) -> list[Any]:
        """The tokenizers whose budgets the word windows fit: the bound ones and the other
        teachers' (`plan_tokenizers`), each once. `plan_windows` treats all but the first alike,
        so every copy of the task bound with the same set plans the same windows."""
        tokenizers = self._tokenizers()
        seen = {tokenizer_digest(t) for t in tokenizers}
        for tok in self.plan_tokenizers:
            digest = tokenizer_digest(tok)
            if digest not in seen:
                seen.add(digest)
                tokenizers.append(tok)
        return tokenizers

    def _max_length(self, tokenizer: Any) -> int:
        return min(self.data.max_length, tokenizer.model_max_length)

    def preprocess(self, raw: Dataset, split: str) -> Dataset:
        if self.tokenizer is None:
            raise RuntimeError("TaggingTask.preprocess needs a tokenizer: call bind() first")
        planning = self._planning_tokenizers()
        for tok in planning:
            if not getattr(tok, "is_fast", False):
                raise DataError(
                    f"tagging needs a fast tokenizer (word ids); {type(tok).__name__} is not. "
                    "Load it with use_fast=True or convert it with the tokenizers library."
                )
        tokenizers = self._tokenizers()
        budgets = [self._max_length(t) - t.num_special_tokens_to_add(pair=False) for t in planning]
        if min(budgets) < 2:
            raise DataError(f"data.max_length={self.data.max_length} leaves no room for words")
        overlap = min(self.data.doc_stride, min(budgets) // 2)
        label_all = self.settings.label_all_tokens

        def encode(rows: dict, idx: list[int]) -> dict:
            sentences = [[str(w) for w in words] for words in rows[self.tokens_col]]
            counts = []  # per planning tokenizer: sub-tokens of every word of every sentence
            for tok in planning:
                enc = tok(sentences, is_split_into_words=True, add_special_tokens=False)
                per_sentence = []
                for i, words in enumerate(sentences):
                    c = [0] * len(words)
                    for w in enc.word_ids(i):
                        if w is not None:
                            c[w] += 1
                    per_sentence.append(c)
                counts.append(per_sentence)

            out: dict[str, list] = {
                "example_id": [], "word_offset": [], "num_words": [], "score_words": [], "labels": []
            }
            spans: list[tuple[int, int, int]] = []  # (sentence in batch, start, end)
            for i, words in enumerate(sentences):
                if len(words) != len(rows[self.tags_col][i]):
                    raise DataError(
                        f"row {idx[i]} of split '{split}': {len(words)} tokens but "
                        f"{len(rows[self.tags_col][i])} tags"
                    )
                windows = plan_windows([c[i] for c in counts], budgets, overlap)
                owner = scoring_windows(counts[0][i], windows)
                for w, (start, end) in enumerate(windows):
                    spans.append((i, start, end))
                    out["example_id"].append(idx[i])
                    out["word_offset"].append(start)
                    out["num_words"].append(end - start)
                    out["score_words"].append([int(owner[j] == w) for j in range(start, end)])

            window_words = [sentences[i][s:e] for i, s, e in spans]
            for k, tok in enumerate(tokenizers):
                prefix = "" if k == 0 else TEACHER_PREFIX
                enc = tok(
                    window_words,
                    is_split_into_words=True,
                    truncation=True,
                    max_length=self._max_length(tok),
                )
                for key, values in enc.items():
                    out[prefix + key] = values
                out[prefix + "word_starts"] = [
                    word_starts_of(enc.word_ids(f), len(window_words[f])) for f in range(len(spans))
                ]
                if k == 0:
                    for f, (i, start, end) in enumerate(spans):
                        tag_ids = self._tag_ids(rows[self.tags_col][i][start:end])
                        labels, previous = [], None
                        for word in enc.word_ids(f):
                            if word is None:
                                labels.append(IGNORE)
                            elif word != previous:
                                labels.append(tag_ids[word])
                            else:
                                labels.append(self._inside[tag_ids[word]] if label_all else IGNORE)
                            previous = word
                        out["labels"].append(labels)
            out["length"] = [len(ids) for ids in out["input_ids"]]
            return out

        features = raw.map(
            encode,
            batched=True,
            with_indices=True,
            remove_columns=raw.column_names,
            desc=f"tokenizing {split}",
            new_fingerprint=self.features_fingerprint(raw, split),
        )
        features = features.add_column("feature_id", list(range(len(features))))
        extra = len(features) - sum(1 for words in raw[self.tokens_col] if words)
        if extra > 0:
            logger.info("%s: sentences longer than one window gave %d extra windows", split, extra)
        return features

    def collate(self, features: list[dict]) -> dict[str, torch.Tensor]:
        batch: dict[str, torch.Tensor] = {}
        for k, tok in enumerate(self._tokenizers()):
            prefix = "" if k == 0 else TEACHER_PREFIX
            inputs = [
                {key: f[prefix + key] for key in ("input_ids", "attention_mask", "token_type_ids") if prefix + key in f}
                for f in features
            ]
            padded = tok.pad(inputs, return_tensors="pt")
            batch.update({prefix + key: value for key, value in padded.items()})
            batch[prefix + "word_starts"] = pad_lists([f[prefix + "word_starts"] for f in features], -1)
        seq = batch["input_ids"].size(1)
        batch["labels"] = pad_lists([f["labels"] for f in features], IGNORE, seq)  # [batch, seq]
        batch["score_words"] = pad_lists([f["score_words"] for f in features], 0)  # [batch, words]
        for key in ("example_id", "feature_id", "length", "num_words", "word_offset"):
            batch[key] = torch.tensor([f[key] for f in features], dtype=torch.long)
        return batch

    def model_class(self) -> Any:
        return AutoModelForTokenClassification

    # --- distillation ---------------------------------------------------------------------
    def kd_targets(self, outputs: Any, batch: dict, teacher: bool) -> dict[str, torch.Tensor]:
        """Word-level logits [batch, words, labels] and word_mask [batch, words] (bool)."""
        use_teacher_starts = teacher and self.teacher_tokenizer is not None
        starts = batch[TEACHER_PREFIX + "word_starts" if use_teacher_starts else "word_starts"]
        words, mask = gather_words(outputs.logits, starts)
        return {"word_logits": words, "word_mask": mask}

    def kd_pairs(self, student: dict, teacher: dict, batch: dict) -> list[LogitPair]:
        """One pair over the window's words, rows limited to words both tokenizations kept."""
        s = student["word_logits"]  # [batch, words, labels]
        t = teacher["word_logits"].to(s.dtype)  # [batch, words', labels]
        s_mask = student["word_mask"].bool()  # [batch, words]
        t_mask = teacher["word_mask"].bool()  # [batch, words']
        if t.size(-1) != s.size(-1):
            raise ValueError(
                f"teacher has {t.size(-1)} labels but the student {s.size(-1)}: distillation "
                "needs both fine-tuned on the same tag set"
            )
        words = s.size(1)
        t, t_mask = fit_width(t, words, 0.0), fit_width(t_mask, words, False)
        keep = s_mask & t_mask  # [batch, words]
        labels = s.size(-1)
        return [LogitPair(s.reshape(-1, labels), t.reshape(-1, labels), row_mask=keep.reshape(-1))]

    # --- evaluation -----------------------------------------------------------------------
    def eval_outputs(self, outputs: Any, batch: dict) -> dict[str, torch.Tensor]:
        words, mask = gather_words(outputs.logits.float(), batch["word_starts"])
        return {
            "word_logits": words.masked_fill(~mask.unsqueeze(-1), IGNORE),  # [batch, words, labels]
            "feature_id": batch["feature_id"],  # [batch]
        }

    def _word_predictions(
        self, outputs: dict[str, np.ndarray], features: Dataset, raw: Dataset
    ) -> tuple[list[list[str]], list[list[str]], int]:
        """Predicted and gold tags for every word of every raw sentence, and how many words no
        token represented (they get the fallback tag, so the metric still counts them)."""
        gold = [[self.labels[t] for t in self._tag_ids(tags)] for tags in raw[self.tags_col]]
        pred: list[list[str | None]] = [[None] * len(g) for g in gold]
        cols = features.select_columns(["example_id", "word_offset", "word_starts", "score_words"])
        ex_ids, offsets = cols["example_id"], cols["word_offset"]
        starts, owners = cols["word_starts"], cols["score_words"]
        logits = np.asarray(outputs["word_logits"])  # [features, words, labels]
        feature_ids = outputs.get("feature_id")
        order = np.arange(len(logits)) if feature_ids is None else np.asarray(feature_ids).reshape(-1)
        best = logits.argmax(-1)  # [features, words]
        for row, fid in enumerate(order):
            fid = int(fid)
            ex, offset = ex_ids[fid], offsets[fid]
            for j, (start, own) in enumerate(zip(starts[fid], owners[fid])):
                if own and start >= 0:
                    pred[ex][offset + j] = self.labels[int(best[row, j])]
        missing = sum(p is None for sentence in pred for p in sentence)
        fallback = self._fallback_label()
        filled = [[fallback if p is None else p for p in sentence] for sentence in pred]
        return filled, gold, missing

    def compute_metrics(
        self, outputs: dict[str, np.ndarray], features: Dataset, raw: Dataset
    ) -> dict[str, float]:
        """seqeval entity f1/precision/recall and token accuracy, over every word of `raw`."""
        pred, gold, missing = self._word_predictions(outputs, features, raw)
        metrics = seqeval_metrics(gold, pred)
        metrics["accuracy"] = token_accuracy(gold, pred)
        metrics["words_without_tokens"] = float(missing)
        return metrics

    def predictions(self, outputs: dict[str, np.ndarray], features: Dataset, raw: Dataset) -> list:
        pred, gold, _ = self._word_predictions(outputs, features, raw)
        return [
            {"example_id": i, "tokens": list(tokens), "prediction": p, "label": g}
            for i, (tokens, p, g) in enumerate(zip(raw[self.tokens_col], pred, gold))
        ]
