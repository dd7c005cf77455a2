"""Trimming the student's vocabulary in a student or baseline stage (`student.vocab.trim`).

The student keeps the special tokens and the pieces of the stage's own training rows (the
labelled rows; in the student stage the transfer and augmented rows too), of the files in
`student.vocab.corpus` and of `student.vocab.keep` (`distill.models.vocab`). A baseline trains
on the labelled rows only, so its vocabulary is theirs: name the transfer files in
`student.vocab.corpus` to give the baseline the student's vocabulary.

Teachers of the student's own (untrimmed) tokenizer read the student's inputs through the id
table. With `min_count=1` every piece of the training rows is kept, so the trimmed tokenizer
splits every training row exactly as the teacher's does and only the ids differ: the teacher
gets the same rows of its embedding matrix, its outputs on the training rows are unchanged, and
the stage stays a one-tokenizer stage (the hidden, attention and relation terms work). With
`min_count > 1` the student splits some training rows unlike the teacher: the teacher keeps its
own tokenizer and the stage distils across tokenizers, as with any student of another
tokenizer; the terms that compare token positions are refused.

metrics.json's info records `vocab`: pieces and parameters before and after, and for each
evaluation split how many pieces its text makes and the share of them that are the unknown
token, before and after.
"""

from __future__ import annotations

from typing import Any, Sequence

from datasets import Dataset, DatasetDict

from distill import models
from distill.data.rows import task_columns
from distill.errors import StageError
from distill.loop.plan import StagePlan
from distill.models.vocab import (
    Text, positions_from_padding, read_corpus, trim_embeddings, trim_vocabulary, vocabulary_coverage,
)

# the task columns that hold text (tagging's `tokens`: a sentence's words)
TEXT_ROLES = ("text", "text_pair", "question", "context", "tokens")


def row_texts(ds: Dataset, family: str, columns: Any) -> list[Text]:
    """The distinct texts of the task's text columns of `ds` (a QA context once, not once per
    question)."""
    cols = task_columns(family, columns)
    out: list[Text] = []
    for role in TEXT_ROLES:
        col = cols.get(role)
        if col and col in ds.column_names:
            values = (tuple(v) if isinstance(v, list) else v for v in ds[col] if v)
            out.extend(list(v) if isinstance(v, tuple) else v for v in dict.fromkeys(values))
    return out


def check_trim(plan: StagePlan, tokenizer: Any, teacher_toks: Sequence[Any], position_terms: Sequence[str]) -> None:
    """Refuse, before anything is built, a trim that would split training rows unlike a teacher
    of the same tokenizer while a term compares token positions."""
    v = plan.student.vocab
    if not v.trim or plan.kind == "teacher" or v.min_count == 1 or not position_terms or not teacher_toks:
        return
    if models.same_tokenizer(tokenizer, teacher_toks[plan.main]):
        raise StageError(
            f"student.vocab.min_count={v.min_count} drops pieces of the training rows, so the trimmed "
            f"student splits some of them unlike its teacher, and the {'/'.join(position_terms)} term "
            "compares token positions: set student.vocab.min_count=1 (every training piece kept, the "
            "teacher reads the student's inputs) or set that term's weight to 0"
        )


def trim_stage(
    plan: StagePlan, raw: DatasetDict, model: Any, tokenizer: Any, loaded: list[Any], position_terms: Sequence[str] = (),
    verbose: bool = True,
) -> tuple[Any, Any, dict[str, Any]]:
    """(trimmed model, its tokenizer, metrics.json's `vocab` entry); the teachers of `loaded`
    that share the untrimmed tokenizer are given the trimmed one and the matching embedding rows
    (in place), when every training piece is kept (module docstring)."""
    v = plan.student.vocab
    check_trim(plan, tokenizer, [tok for _, tok in loaded], position_terms)
    texts = row_texts(raw["train"], plan.task.family, plan.data.columns) + read_corpus(v.corpus)
    evaluation = {
        split: row_texts(raw[split], plan.task.family, plan.data.columns) for split in ("validation", "test") if split in raw
    }
    before = {split: vocabulary_coverage(tokenizer, t) for split, t in evaluation.items()}
    share = [i for i, (_, tok) in enumerate(loaded) if models.same_tokenizer(tok, tokenizer)] if v.min_count == 1 else []
    pad = tokenizer.pad_token_id
    # a teacher whose position ids count from the padding id needs it where it was
    in_place = range(pad + 1) if pad is not None and any(positions_from_padding(loaded[i][0]) for i in share) else ()
    try:
        model, trimmed, report = trim_vocabulary(model, tokenizer, texts, v.min_count, list(v.keep), in_place)
    except ValueError as err:
        raise StageError(f"cannot trim the student's vocabulary: {err}") from None
    for i in share:
        teacher_model, _ = loaded[i]
        trim_embeddings(teacher_model, report.old_ids)
        loaded[i] = (teacher_model, trimmed)
    unknown = {}
    for split, t in evaluation.items():
        after = vocabulary_coverage(trimmed, t)
        unknown[split] = {  # a word re-segmented into smaller kept pieces makes more pieces
            "pieces": after["tokens"], "pieces_before": before[split]["tokens"],
            "unknown_share": after["unknown_share"], "unknown_share_before": before[split]["unknown_share"],
        }
    info = {**report.summary(), "corpus": list(v.corpus), "unknown": unknown}
    if loaded:
        info["teachers_read_student_ids"] = share  # the others keep their own tokenizer
    if verbose:
        print(
            f"[distill] student vocabulary trimmed: {report.pieces_before} -> {report.pieces_after} pieces, "
            f"{report.parameters_before:,} -> {report.parameters_after:,} parameters; unknown pieces "
            + ", ".join(f"{s} {u['unknown_share']:.2%}" for s, u in unknown.items()),
            flush=True,
        )
    return model, trimmed, info
