"""Extractive QA: context windows and answer positions, post-processing over windows, metrics,
and the KD class mask (context + CLS) that the KD loss applies."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetDict
from transformers import AutoTokenizer

from tests.conftest import tiny_bert_config
from distill.config import Config
from distill.data.formats import read_squad
from distill.objective.losses import SoftLabelLoss, soft_label_loss
from distill.tasks.metrics import squad_v2_metrics
from distill.data.rows import locate_answer
from distill.tasks.qa import QATask
from distill.tasks.qa_spans import answer_tokens, best_spans

DATA = Path(__file__).parent / "data"
QUESTION = "¿qué?"
# forty words that WordPiece keeps whole: one token each, so windows are easy to reason about
WORDS = (
    "el la de en y a los se un con no una su para es al lo como mas le ya o ha si son sin ser "
    "me the of and to in is was for on as by with"
).split()


def make_task(raw: DatasetDict, max_length: int, stride: int, **task_kw) -> QATask:
    cfg = Config()
    cfg.task.family = "qa"
    cfg.data.max_length, cfg.data.doc_stride = max_length, stride
    for key, value in task_kw.items():
        setattr(cfg.task, key, value)
    task = QATask(cfg.task, cfg.data)
    task.setup(raw)
    return task


def qa_rows(context: str, answers: list[tuple[str, int]], question: str = QUESTION) -> list[dict]:
    return [
        {
            "id": f"q{i}",
            "title": "",
            "context": context,
            "question": question,
            "answers": {"text": [text], "answer_start": [start]},
        }
        for i, (text, start) in enumerate(answers)
    ]


def span_of(first: int, last: int) -> tuple[str, int]:
    """Answer text and character start covering WORDS[first..last]."""
    start = len(" ".join(WORDS[:first])) + (1 if first else 0)
    return " ".join(WORDS[first : last + 1]), start


@pytest.fixture(scope="module")
def tok(tiny_bert_dir):
    return AutoTokenizer.from_pretrained(tiny_bert_dir)


@pytest.fixture(scope="module")
def windows_setup(tok):
    """A 40-token context cut into windows of 14 context tokens that share 4."""
    assert all(len(tok.tokenize(w)) == 1 for w in WORDS)
    q_len = len(tok.tokenize(QUESTION))
    context = " ".join(WORDS)
    answers = [span_of(12, 15), span_of(16, 17)]  # across the 0/1 boundary; only in window 1
    raw = DatasetDict(train=Dataset.from_list(qa_rows(context, answers)))
    task = make_task(raw, max_length=q_len + 3 + 14, stride=4)
    task.bind(tok)
    return task, raw, task.preprocess(raw["train"], "train")


def context_words(feature: dict, context: str) -> list[str]:
    return [context[s:e] for (s, e), m in zip(feature["offset_mapping"], feature["context_mask"]) if m]


def test_windows_over_a_context_longer_than_three_windows(windows_setup, tok):
    task, raw, feats = windows_setup
    first = feats.filter(lambda f: f["example_id"] == 0)
    context = raw["train"][0]["context"]
    spans = [context_words(f, context) for f in first]
    assert spans == [WORDS[0:14], WORDS[10:24], WORDS[20:34], WORDS[30:40]]  # 4 windows, 4 shared
    q_ids = tok(QUESTION, add_special_tokens=False)["input_ids"]
    for f in first:
        assert len(f["input_ids"]) <= task.data.max_length
        assert f["input_ids"][1 : 1 + len(q_ids)] == q_ids  # the question is never truncated
        assert f["cls_index"] == 0 and f["length"] == len(f["input_ids"])
    assert feats["feature_id"] == list(range(len(feats)))
    assert feats["example_id"] == [0] * 4 + [1] * 4


def test_answer_across_a_window_boundary_and_in_the_second_window(windows_setup):
    task, raw, feats = windows_setup
    context = raw["train"][0]["context"]
    for ex, (text, _) in enumerate([span_of(12, 15), span_of(16, 17)]):
        rows = feats.filter(lambda f: f["example_id"] == ex)
        positions = [(f["start_positions"], f["end_positions"]) for f in rows]
        # only window 1 holds the whole answer; the others point at CLS
        assert positions[0] == positions[2] == positions[3] == (0, 0)
        s, e = positions[1]
        offsets = rows[1]["offset_mapping"]
        assert context[offsets[s][0] : offsets[e][1]] == text
        assert e - s + 1 == len(text.split())


def test_answer_tokens_and_locate_answer_by_hand():
    offsets = [[0, 0], [0, 0], [0, 2], [3, 5], [6, 10], [0, 0]]
    mask = [0, 0, 1, 1, 1, 0]
    assert answer_tokens(offsets, mask, 3, 10) == (3, 4)
    assert answer_tokens(offsets, mask, 7, 9) == (4, 4)  # inside one token
    assert answer_tokens(offsets, mask, 3, 12) is None  # ends past the window
    context = "uno dos tres dos"
    assert locate_answer(context, "dos", 4) == 4
    assert locate_answer(context, "dos", 11) == 13  # shifted start: nearest occurrence
    assert locate_answer(context, "cuatro", 0) is None


def test_long_question_gets_a_smaller_stride_and_too_long_fails(tok):
    context = " ".join(WORDS)
    long_q = " ".join(WORDS[:12]) + "?"  # 13 tokens: 4 context tokens per window, stride 4 won't do
    raw = DatasetDict(train=Dataset.from_list(qa_rows(context, [span_of(5, 6)], long_q) + qa_rows(context, [span_of(5, 6)])))
    q_len = len(tok.tokenize(QUESTION))
    task = make_task(raw, max_length=q_len + 3 + 14, stride=4)
    task.bind(tok)
    feats = task.preprocess(raw["train"], "train")
    long_rows = feats.filter(lambda f: f["example_id"] == 0)
    q_ids = tok(long_q, add_special_tokens=False)["input_ids"]
    covered = []
    for f in long_rows:
        assert f["input_ids"][1 : 1 + len(q_ids)] == q_ids
        covered += context_words(f, context)
    assert set(covered) == set(WORDS)  # every context token is in some window
    assert feats["example_id"][-4:] == [1] * 4  # rows keep their order
    too_long = " ".join(WORDS[:17]) + "?"
    raw = DatasetDict(train=Dataset.from_list(qa_rows(context, [span_of(5, 6)], too_long)))
    with pytest.raises(ValueError, match="questions are never truncated, so raise data.max_length"):
        task.preprocess(raw["train"], "train")


def test_post_processing_picks_the_span_the_logits_imply(windows_setup):
    task, raw, feats = windows_setup
    context = raw["train"][0]["context"]
    n, seq = len(feats), max(feats["length"])
    start = np.full((n, seq), -10.0, dtype=np.float32)
    end = np.full((n, seq), -10.0, dtype=np.float32)
    # example 0: window 0 holds words 0..13, window 1 words 10..23, window 2 words 20..33
    first = feats[0]["context_mask"].index(1)  # position of the first context token (after [CLS] q [SEP])
    start[1, first + 12 - 10], end[1, first + 14 - 10] = 4.0, 4.0  # the answer: words 12..14
    start[1, 1], end[1, 2] = 50.0, 50.0  # question tokens: never candidates
    start[1, first + 16 - 10], end[1, first + 11 - 10] = 6.0, 6.0  # ends before any start: no span
    start[2, first + 25 - 20], end[2, first + 25 - 20] = 3.0, 3.0  # a weaker span in window 2
    start[0, first + 0], end[0, first + 12] = 9.0, 9.0  # 13 tokens: over max_answer_length=5
    answer = " ".join(WORDS[12:15])
    spans = best_spans(start, end, feats, raw["train"]["context"], n_best=20, max_answer_length=5)
    assert spans[0]["text"] == answer and spans[0]["score"] == 8.0
    assert context[spans[0]["start"] : spans[0]["end"]] == answer
    # with n_best=1 window 1 pairs only its best start (word 16) and end (word 11): no valid
    # span there, so the weaker span of window 2 wins
    spans = best_spans(start, end, feats, raw["train"]["context"], n_best=1, max_answer_length=5)
    assert spans[0]["text"] == WORDS[25] and spans[0]["score"] == 6.0
    # a larger max_answer_length lets window 0's long span win
    spans = best_spans(start, end, feats, raw["train"]["context"], n_best=20, max_answer_length=30)
    assert spans[0]["text"] == " ".join(WORDS[0:13]) and spans[0]["score"] == 18.0


def oracle(feats: Dataset) -> dict[str, np.ndarray]:
    """Logits that point at each window's gold positions (CLS windows: flat context)."""
    n, seq = len(feats), max(feats["length"])
    start = np.zeros((n, seq), dtype=np.float32)
    end = np.zeros((n, seq), dtype=np.float32)
    for i, f in enumerate(feats):
        if f["start_positions"] != f["cls_index"]:
            start[i, f["start_positions"]] = end[i, f["end_positions"]] = 10.0
    return {"start_logits": start, "end_logits": end, "feature_id": np.arange(n)}


def test_metrics_with_mismatched_answer_starts(tok):
    context = " ".join(WORDS)
    text, start = span_of(20, 21)
    rows = qa_rows(context, [(text, start), (text, start + 3), ("no está", 0)])
    raw = DatasetDict(train=Dataset.from_list(rows), validation=Dataset.from_list(rows))
    q_len = len(tok.tokenize(QUESTION))
    task = make_task(raw, max_length=q_len + 3 + 14, stride=4)
    task.bind(tok)
    train = task.preprocess(raw["train"], "train")
    # the shifted answer is found where its text is; the missing one is left out of training
    assert sorted(set(train["example_id"])) == [0, 1]
    for ex in (0, 1):
        rows_ex = train.filter(lambda f: f["example_id"] == ex)
        assert [(f["start_positions"], f["end_positions"]) for f in rows_ex] == [
            (g["start_positions"], g["end_positions"]) for g in train.filter(lambda f: f["example_id"] == 0)
        ]
    valid = task.preprocess(raw["validation"], "validation")
    assert sorted(set(valid["example_id"])) == [0, 1, 2]  # evaluation keeps every example
    metrics = task.compute_metrics(oracle(valid), valid, raw["validation"])
    # examples 0 and 1 answered exactly; example 2's answer is not in the text
    assert metrics["exact_match"] == pytest.approx(2 / 3) and metrics["f1"] == pytest.approx(2 / 3)
    assert metrics["answer_start_mismatches"] == 2.0 and metrics["examples"] == 3.0
    preds = task.predictions(oracle(valid), valid, raw["validation"])
    assert preds[0] == {"example_id": 0, "id": "q0", "question": QUESTION, "prediction": text, "answers": [text]}


def test_mlqa_normalization_is_used_when_configured(tok):
    context = "Ganó el Madrid."
    raw = DatasetDict(validation=Dataset.from_list(qa_rows(context, [("Madrid", 8)])))
    # the logits pick "el Madrid": an article the MLQA rules drop and the SQuAD rules keep
    for norm, em, f1 in (("squad", 0.0, 2 / 3), ("mlqa", 1.0, 1.0)):
        task = make_task(raw, max_length=64, stride=16, normalization=norm)
        task.bind(tok)
        feats = task.preprocess(raw["validation"], "validation")
        words = context_words(feats[0], context)
        first = feats[0]["context_mask"].index(1)
        start = np.zeros((1, feats[0]["length"]), dtype=np.float32)
        end = start.copy()
        start[0, first + words.index("el")], end[0, first + words.index("Madrid")] = 5.0, 5.0
        metrics = task.compute_metrics({"start_logits": start, "end_logits": end}, feats, raw["validation"])
        assert metrics["exact_match"] == em and metrics["f1"] == pytest.approx(f1)
        assert task.predictions({"start_logits": start, "end_logits": end}, feats, raw["validation"])[0][
            "prediction"
        ] == "el Madrid"


def test_kd_class_mask_is_context_plus_cls_and_masked_logits_change_nothing(windows_setup):
    task, raw, feats = windows_setup
    batch = task.collate([feats[0], feats[3]])  # a full window and a shorter, padded one
    mask = task.kd_class_mask(batch)
    for row, f in enumerate([feats[0], feats[3]]):
        expected = [bool(m) for m in f["context_mask"]] + [False] * (mask.size(1) - f["length"])
        expected[f["cls_index"]] = True
        assert mask[row].tolist() == expected
    assert not mask[1, feats[3]["length"] :].any()  # padding
    torch.manual_seed(0)
    shape = batch["input_ids"].shape
    s = {"start_logits": torch.randn(shape), "end_logits": torch.randn(shape)}
    t = {"start_logits": torch.randn(shape), "end_logits": torch.randn(shape)}
    pairs = task.kd_pairs(s, t, batch)
    assert len(pairs) == 2 and all(torch.equal(p.class_mask, mask) for p in pairs)
    loss = SoftLabelLoss("kl", 2.0)(pairs)
    # question, SEP and padding positions: big changes there move nothing
    s2 = {k: v.clone() for k, v in s.items()}
    t2 = {k: v.clone() for k, v in t.items()}
    for d, delta in ((s2, 30.0), (t2, -12.0)):
        for k in d:
            d[k][~mask] += delta
    assert torch.allclose(loss, SoftLabelLoss("kl", 2.0)(task.kd_pairs(s2, t2, batch)))
    # ... while a change at CLS or in the context does
    s2["start_logits"][0, 0] += 3.0
    assert not torch.allclose(loss, SoftLabelLoss("kl", 2.0)(task.kd_pairs(s2, t2, batch)))
    # a cached teacher row padded wider than the batch is cut to the batch
    wide = {k: torch.cat([v, torch.zeros(2, 5)], dim=1) for k, v in t.items()}
    wide_pairs = task.kd_pairs(s, wide, batch)
    assert all(p.teacher.shape == shape for p in wide_pairs)
    assert torch.allclose(
        soft_label_loss(wide_pairs[0].student, wide_pairs[0].teacher, class_mask=wide_pairs[0].class_mask),
        soft_label_loss(pairs[0].student, pairs[0].teacher, class_mask=pairs[0].class_mask),
    )


def test_bind_keeps_one_set_of_features_for_a_teacher_with_the_same_tokenizer(tok, tiny_bert_dir, tiny_roberta_dir):
    raw = DatasetDict(train=read_squad(DATA / "squad_flat.jsonl"))
    task = make_task(raw, max_length=64, stride=16)
    task.bind(tok, AutoTokenizer.from_pretrained(tiny_bert_dir))  # same tokenizer, loaded again
    assert task.teacher_tokenizer is None and task.kd_target_keys == ("start_logits", "end_logits")
    # another tokenizer is no longer refused: it is aligned through the context's characters
    # (tests/test_qa_across_tokenizers.py)
    task.bind(tok, AutoTokenizer.from_pretrained(tiny_roberta_dir))
    assert task.teacher_tokenizer is not None and "kd_mask" in task.kd_target_keys


def test_answers_missing_from_their_context_are_dropped_when_train_comes_from_split_sources(tok):
    """MLQA's recipe sets data.splits.train=null and takes training rows from
    data.split_sources.train; the split's role is still "train", so an answer that is not in
    its context is left out instead of being trained towards CLS."""
    context = " ".join(WORDS)
    rows = qa_rows(context, [span_of(3, 4), ("no está", 0)])
    raw = DatasetDict(train=Dataset.from_list(rows))
    task = make_task(raw, max_length=64, stride=16)
    task.data.splits.train = None
    task.bind(tok)
    feats = task.preprocess(raw["train"], "train")
    assert feats["example_id"] == [0]
    assert feats[0]["start_positions"] != feats[0]["cls_index"]
    valid = task.preprocess(raw["train"], "validation")  # evaluation keeps every example
    assert sorted(set(valid["example_id"])) == [0, 1]


def unanswerable_rows() -> list[dict]:
    context = "El Museo del Prado abrió en 1819 en Madrid."
    return [
        {"id": "a", "context": context, "question": "¿Dónde?", "answers": {"text": ["Madrid"], "answer_start": [36]}},
        {"id": "b", "context": context, "question": "¿Quién lo pintó?", "answers": {"text": [], "answer_start": []}},
        {"id": "c", "context": context, "question": "¿Cuánto cuesta?", "answers": {"text": [], "answer_start": []}},
    ]


def test_unanswerable_questions_are_refused_unless_squad_v2_is_asked_for(tok):
    raw = DatasetDict(train=Dataset.from_list(unanswerable_rows()))
    with pytest.raises(ValueError, match=r"split 'train': 2 of 3 questions have no answer .* first at row 1 "
                       r"\(id 'b'\)\. Set task.version_2_with_negative=true"):
        make_task(raw, 64, 16)
    task = make_task(raw, 64, 16, version_2_with_negative=True)
    task.bind(tok)
    feats = task.preprocess(raw["train"], "train")
    # unanswerable questions train towards CLS in every window
    assert feats["example_id"] == [0, 1, 2]
    assert [(f["start_positions"], f["end_positions"]) for f in feats][1:] == [(0, 0), (0, 0)]
    assert feats[0]["start_positions"] > 0


def test_an_evaluation_split_without_answerable_questions_is_an_error():
    rows = unanswerable_rows()
    raw = DatasetDict(train=Dataset.from_list(rows), validation=Dataset.from_list(rows[1:]))
    with pytest.raises(ValueError, match=r"split 'validation' has no answerable question \(2 rows"):
        make_task(raw, 64, 16, version_2_with_negative=True)
    for bad, what in (("", "context"), (None, "context")):
        broken = [dict(rows[0], context=bad)]
        with pytest.raises(ValueError, match=rf"split 'train': 1 rows have a null or empty {what} .* row 0 \(id 'a'\)"):
            make_task(DatasetDict(train=Dataset.from_list(broken)), 64, 16)


def test_squad_v2_predictions_and_metrics_through_the_task(tok):
    rows = unanswerable_rows()
    raw = DatasetDict(validation=Dataset.from_list(rows))
    task = make_task(raw, 64, 16, version_2_with_negative=True, null_score_diff_threshold=0.5)
    task.bind(tok)
    feats = task.preprocess(raw["validation"], "validation")
    assert len(feats) == 3
    start = np.zeros((3, max(feats["length"])), dtype=np.float32)
    end = start.copy()
    # a: span "Madrid" scores 6 against a null of 2 -> answered; b: null 8 vs span 2 -> "";
    # c: span 6 vs null 5.8: diff -0.2 is not over the threshold 0.5 -> answered, wrongly
    for row, (span, null) in enumerate(((3.0, 1.0), (1.0, 4.0), (3.0, 2.9))):
        words = context_words(feats[row], rows[row]["context"])
        madrid = feats[row]["context_mask"].index(1) + words.index("Madrid")
        start[row, madrid] = end[row, madrid] = span
        start[row, 0] = end[row, 0] = null
    outputs = {"start_logits": start, "end_logits": end, "feature_id": np.arange(3)}
    preds = task.predictions(outputs, feats, raw["validation"])
    assert [p["prediction"] for p in preds] == ["Madrid", "", "Madrid"]
    assert [p["null_score_diff"] for p in preds] == pytest.approx([-4.0, 6.0, -0.2], abs=1e-5)
    metrics = task.compute_metrics(outputs, feats, raw["validation"])
    assert set(metrics) == set(task.metric_names)
    assert metrics["exact_match"] == pytest.approx(2 / 3) and metrics["f1"] == pytest.approx(2 / 3)
    assert metrics["has_answer_exact_match"] == 1.0 and metrics["no_answer_exact_match"] == 0.5
    assert (metrics["has_answer_examples"], metrics["no_answer_examples"]) == (1.0, 2.0)
    # a threshold between -4 and -0.2 would answer a and leave c unanswered: all three right
    assert metrics["best_exact_match"] == 1.0 and metrics["best_exact_match_threshold"] == pytest.approx(-4.0)


def test_squad_v2_metrics_by_hand():
    # q0 answerable, answered right (diff -5); q1 unanswerable, null wins (diff 2 > 0);
    # q2 unanswerable, null wins (1.5); q3 answerable, null wins (1) although its span
    # "en 1819" has F1 2/3 against "1819"
    m = squad_v2_metrics(
        ["Madrid", "Goya", "Prado", "en 1819"], [-5.0, 2.0, 1.5, 1.0], [["Madrid"], [], [], ["1819"]]
    )
    assert m["exact_match"] == m["f1"] == 0.75
    assert m["has_answer_exact_match"] == 0.5 and m["no_answer_exact_match"] == 1.0
    # best thresholds: every question unanswered scores 2; answering in diff order adds +1
    # (q0, diff -5), +0 EM / +2/3 F1 (q3, 1), -1 (q2, 1.5), -1 (q1, 2). EM peaks at 3 first
    # reached at -5; F1 peaks at 3 + 2/3 at 1.
    assert m["best_exact_match"] == 0.75 and m["best_exact_match_threshold"] == -5.0
    assert m["best_f1"] == pytest.approx((3 + 2 / 3) / 4) and m["best_f1_threshold"] == 1.0
    # answering nothing is best: the threshold lies below every difference
    m = squad_v2_metrics(["Goya", "Prado"], [0.5, 3.0], [[], []])
    assert m["best_exact_match"] == 1.0 and m["best_exact_match_threshold"] == -0.5
    assert m["exact_match"] == 1.0  # both diffs above the default threshold 0
    # no valid span at all (diff +inf): always unanswered, whatever the threshold
    m = squad_v2_metrics(["", "x"], [float("inf"), -1.0], [["Madrid"], []], threshold=10.0)
    assert m["exact_match"] == 0.0 and m["best_exact_match"] == 0.5
    with pytest.raises(ValueError, match="one each per question"):
        squad_v2_metrics(["a"], [0.0, 1.0], [["a"]])


def test_setup_errors():
    raw = DatasetDict(train=Dataset.from_list([{"question": "q", "context": "c", "answers": "x"}]))
    with pytest.raises(ValueError, match=r"must hold \{text: \[...\], answer_start: \[...\]\}"):
        make_task(raw, 64, 16)
    raw = DatasetDict(train=Dataset.from_list([{"pregunta": "q", "context": "c"}]))
    with pytest.raises(ValueError, match=r"no column 'question'.*data\.columns\.question"):
        make_task(raw, 64, 16)


def test_forward_kd_and_metrics_with_tiny_models(tok):
    raw = DatasetDict(validation=read_squad(DATA / "squad_flat.jsonl"))
    task = make_task(raw, max_length=32, stride=8)
    task.bind(tok)
    feats = task.preprocess(raw["validation"], "validation")
    assert len(feats) > len(raw["validation"])  # the contexts needed several windows
    assert task.label_keys() == ("start_positions", "end_positions") and task.model_kwargs() == {}
    batch = task.collate(list(feats))
    torch.manual_seed(0)
    student = task.model_class().from_config(tiny_bert_config())
    teacher = task.model_class().from_config(tiny_bert_config(layers=3)).eval()
    out = student(**task.model_inputs(batch))
    assert torch.isfinite(out.loss)
    with torch.no_grad():
        t_out = teacher(**task.model_inputs(batch, teacher=True))
    s_targets = task.kd_targets(out, batch, teacher=False)
    t_targets = task.kd_targets(t_out, batch, teacher=True)
    assert set(s_targets) == set(task.kd_target_keys)
    loss = SoftLabelLoss("kl", 1.0)(task.kd_pairs(s_targets, t_targets, batch))
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    assert student.qa_outputs.weight.grad.abs().sum() > 0

    evals = {k: v.detach().numpy() for k, v in task.eval_outputs(out, batch).items()}
    metrics = task.compute_metrics(evals, feats, raw["validation"])
    assert set(metrics) == {"exact_match", "f1", "examples", "answer_start_mismatches"} == set(task.metric_names)
    assert 0.0 <= metrics["f1"] <= 1.0 and metrics["answer_start_mismatches"] == 0.0
    preds = task.predictions(evals, feats, raw["validation"])
    assert [p["id"] for p in preds] == ["prado-1", "prado-2", "alhambra-1"]
    for p, context in zip(preds, raw["validation"]["context"]):
        assert p["prediction"] in context
