"""Token classification: word/sub-token alignment, word windows, word-level KD across tokenizers,
and metrics that count every word."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, List, Value
from transformers import AutoConfig, AutoModelForTokenClassification, AutoTokenizer

from tests.conftest import tiny_bert_config
from distill.config import Config
from distill.objective.losses import SoftLabelLoss, soft_label_loss
from distill.tasks.tagging import TaggingTask, plan_windows, scoring_windows

NAMES = ["O", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-PER", "I-PER"]
FEATURES = Features({"tokens": List(Value("string")), "ner_tags": List(ClassLabel(names=NAMES))})
WORDS = ["Los", "ministros", "de", "Economía", "se", "reunieron", "en", "Bruselas"]
TAGS = [0, 0, 0, 1, 0, 0, 0, 3]
ZWSP = "\u200b"  # dropped by the WordPiece normalizer, kept (as bytes) by byte-level BPE


def make_task(raw: DatasetDict, max_length: int = 32, stride: int = 8, label_all: bool = False) -> TaggingTask:
    cfg = Config()
    cfg.data.columns = {"tokens": "tokens", "tags": "ner_tags"}
    cfg.data.max_length, cfg.data.doc_stride = max_length, stride
    cfg.task.family, cfg.task.label_all_tokens = "tagging", label_all
    task = TaggingTask(cfg.task, cfg.data)
    task.setup(raw)
    return task


def ner_raw(rows: list[tuple[list[str], list[int]]]) -> DatasetDict:
    data = {"tokens": [w for w, _ in rows], "ner_tags": [t for _, t in rows]}
    return DatasetDict(train=Dataset.from_dict(data, features=FEATURES))


@pytest.fixture(scope="module")
def bert_tok(tiny_bert_dir):
    return AutoTokenizer.from_pretrained(tiny_bert_dir)


@pytest.fixture(scope="module")
def bpe_tok(tiny_roberta_dir):
    return AutoTokenizer.from_pretrained(tiny_roberta_dir)


def test_plan_windows_by_hand():
    # 6 words of 2 sub-tokens, budget 6: three words a window, one word (2 tokens) overlap
    assert plan_windows([[2] * 6], [6], overlap=2) == [(0, 3), (2, 5), (4, 6)]
    # no overlap allowed: windows just tile
    assert plan_windows([[2] * 6], [6], overlap=0) == [(0, 3), (3, 6)]
    # a word over budget sits alone; windows around it still move forward
    assert plan_windows([[1, 9, 1, 1]], [4], overlap=2) == [(0, 1), (1, 2), (2, 4)]
    # every tokenizer's budget binds: the second splits word 1 into 4
    assert plan_windows([[1, 1, 1, 1], [1, 4, 1, 1]], [4, 4], overlap=0) == [(0, 1), (1, 2), (2, 4)]
    assert plan_windows([[]], [4], overlap=2) == []


def test_scoring_windows_picks_the_most_context():
    counts = [1] * 10
    windows = plan_windows([counts], [6], overlap=3)
    assert windows == [(0, 6), (3, 9), (6, 10)]
    owner = scoring_windows(counts, windows)
    # word 3: min(3 left, 2 right) = 2 in window 0 vs 0 in window 1; word 4: 1 in both (tie:
    # the earlier window); word 5: 0 in window 0 vs 2 in window 1; word 7: 1 vs 1, but more
    # context overall in window 1 (4 + 1 vs 1 + 2); word 8: 0 vs 1
    assert owner == [0, 0, 0, 0, 0, 1, 1, 1, 2, 2]


def test_first_subtoken_carries_the_label(bert_tok):
    raw = ner_raw([(WORDS, TAGS)])
    task = make_task(raw)
    task.bind(bert_tok)
    f = task.preprocess(raw["train"], "train")[0]
    assert bert_tok.convert_ids_to_tokens(f["input_ids"]) == [
        "[CLS]", "los", "mini", "##st", "##ros", "de", "eco", "##no", "##mia", "se",
        "re", "##uni", "##eron", "en", "br", "##use", "##las", "[SEP]",
    ]  # fmt: skip
    x = -100
    assert f["labels"] == [x, 0, 0, x, x, 0, 1, x, x, 0, 0, x, x, 0, 3, x, x, x]
    assert f["word_starts"] == [1, 2, 5, 6, 9, 10, 13, 14]
    assert f["score_words"] == [1] * 8
    assert (f["example_id"], f["feature_id"], f["word_offset"], f["num_words"]) == (0, 0, 0, 8)
    assert f["length"] == len(f["input_ids"]) == 18


def test_label_all_tokens_uses_the_inside_tag(bert_tok):
    raw = ner_raw([(WORDS, TAGS)])
    task = make_task(raw, label_all=True)
    task.bind(bert_tok)
    f = task.preprocess(raw["train"], "train")[0]
    x = -100
    # Economía = B-ORG(1) then I-ORG(2) twice; Bruselas = B-LOC(3) then I-LOC(4)
    assert f["labels"] == [x, 0, 0, 0, 0, 0, 1, 2, 2, 0, 0, 0, 0, 0, 3, 4, 4, x]


def test_a_word_longer_than_the_window(bert_tok):
    long_word = "supercalifragilisticoespialidosamente"
    raw = ner_raw([(["Hola", long_word, "amigo", "mío"], [0, 5, 6, 0])])
    assert len(bert_tok.tokenize(long_word)) > 8
    task = make_task(raw, max_length=10, stride=2)  # 8 sub-tokens of room
    task.bind(bert_tok)
    feats = task.preprocess(raw["train"], "train")
    spans = [(f["word_offset"], f["word_offset"] + f["num_words"]) for f in feats]
    assert spans == [(0, 1), (1, 2), (2, 4)]
    alone = feats[1]
    assert len(alone["input_ids"]) == 10  # truncated to the window
    assert alone["word_starts"] == [1] and alone["labels"][1] == 5
    assert alone["labels"][2:] == [-100] * 8
    assert alone["score_words"] == [1]


def long_sentence(n: int = 40) -> tuple[list[str], list[int]]:
    vocab = ["el", "ministro", "visitó", "Bruselas", "y", "Madrid", "con", "Ana"]
    tags = [0, 0, 0, 3, 0, 3, 0, 5]
    return [vocab[i % 8] for i in range(n)], [tags[i % 8] for i in range(n)]


def oracle_outputs(task: TaggingTask, feats: Dataset, raw: Dataset, owner_right: bool = True) -> dict:
    """Word logits that predict the gold tag in the window that scores a word, and a wrong tag
    in every other window (so only the scoring window may decide)."""
    width = max(feats["num_words"])
    logits = np.full((len(feats), width, len(task.labels)), -100.0, dtype=np.float32)
    for i, f in enumerate(feats):
        gold = raw[f["example_id"]]["ner_tags"]
        for j, (start, own) in enumerate(zip(f["word_starts"], f["score_words"])):
            if start < 0:
                continue
            tag = gold[f["word_offset"] + j]
            right = tag if own == owner_right else (tag + 2) % len(task.labels)  # another type
            logits[i, j] = 0.0
            logits[i, j, right] = 5.0
    return {"word_logits": logits, "feature_id": np.arange(len(feats))}


def test_long_sentence_every_word_scored_once(bert_tok):
    words, tags = long_sentence()
    raw = ner_raw([(words, tags), (WORDS, TAGS)])
    task = make_task(raw, max_length=16, stride=4)
    task.bind(bert_tok)
    feats = task.preprocess(raw["train"], "train")
    assert len(feats) > 4  # the long sentence was windowed
    assert all(len(ids) <= 16 for ids in feats["input_ids"])
    for ex, n in enumerate([len(words), len(WORDS)]):
        scored = np.zeros(n, dtype=int)
        for f in feats.filter(lambda f: f["example_id"] == ex):
            scored[f["word_offset"] : f["word_offset"] + f["num_words"]] += f["score_words"]
        assert scored.tolist() == [1] * n
    assert feats["feature_id"] == list(range(len(feats)))

    metrics = task.compute_metrics(oracle_outputs(task, feats, raw["train"]), feats, raw["train"])
    assert metrics["accuracy"] == 1.0 and metrics["f1"] == 1.0
    assert metrics["words_without_tokens"] == 0.0
    # the same logits with the scoring windows wrong: every word is counted, every word wrong
    wrong = task.compute_metrics(oracle_outputs(task, feats, raw["train"], False), feats, raw["train"])
    assert wrong["accuracy"] == 0.0 and wrong["f1"] == 0.0


def test_metrics_count_words_no_token_represents(bert_tok):
    words, tags = WORDS + [ZWSP], TAGS + [5]
    raw = ner_raw([(words, tags)])
    task = make_task(raw)
    task.bind(bert_tok)
    feats = task.preprocess(raw["train"], "train")
    assert feats[0]["word_starts"][-1] == -1
    metrics = task.compute_metrics(oracle_outputs(task, feats, raw["train"]), feats, raw["train"])
    # 9 words, the dropped one predicted "O" against B-PER: 8/9 right, 2 of 3 entities found
    assert metrics["words_without_tokens"] == 1.0
    assert metrics["accuracy"] == pytest.approx(8 / 9)
    assert metrics["recall"] == pytest.approx(2 / 3) and metrics["precision"] == 1.0
    pred = task.predictions(oracle_outputs(task, feats, raw["train"]), feats, raw["train"])
    assert pred[0]["prediction"][-1] == "O" and pred[0]["label"][-1] == "B-PER"
    assert pred[0]["tokens"] == words


def test_teacher_tokenizer_that_splits_words_differently(bert_tok, bpe_tok):
    words, tags = WORDS + [ZWSP], TAGS + [0]
    raw = ner_raw([(words, tags)])
    task = make_task(raw)
    task.bind(bert_tok, bpe_tok)
    f = task.preprocess(raw["train"], "train")[0]
    assert f["word_starts"] == [1, 2, 5, 6, 9, 10, 13, 14, -1]  # WordPiece drops the ZWSP
    teacher_words = [bpe_tok.convert_ids_to_tokens(f["teacher_input_ids"][s]) for s in f["teacher_word_starts"]]
    assert f["teacher_word_starts"][:2] == [1, 2] and -1 not in f["teacher_word_starts"]
    assert f["teacher_word_starts"] != f["word_starts"]
    # each teacher start is the first piece of its word ("Ġ" marks a leading space in byte BPE)
    for word, piece in zip(words[:-1], teacher_words[:-1]):
        assert word.startswith(piece.lstrip("Ġ")[:1])

    batch = task.collate([f])
    student_logits = torch.randn(1, batch["input_ids"].size(1), len(NAMES))  # [batch, seq, labels]
    teacher_logits = torch.randn(1, batch["teacher_input_ids"].size(1), len(NAMES))
    s = task.kd_targets(SimpleNamespace(logits=student_logits), batch, teacher=False)
    t = task.kd_targets(SimpleNamespace(logits=teacher_logits), batch, teacher=True)
    starts_s, starts_t = f["word_starts"], f["teacher_word_starts"]
    for w in range(8):
        assert torch.equal(s["word_logits"][0, w], student_logits[0, starts_s[w]])
        assert torch.equal(t["word_logits"][0, w], teacher_logits[0, starts_t[w]])
    assert s["word_mask"].tolist() == [[True] * 8 + [False]]
    assert t["word_mask"].tolist() == [[True] * 9]
    (pair,) = task.kd_pairs(s, t, batch)
    assert pair.student.shape == pair.teacher.shape == (9, len(NAMES))
    assert pair.row_mask.tolist() == [True] * 8 + [False]  # aligned on the words both kept


def test_kd_pairs_fit_cached_rows_and_ignore_masked_words():
    batch = {"word_starts": torch.tensor([[1, 2, -1], [1, 3, 4]])}
    s = {"word_logits": torch.randn(2, 3, 4), "word_mask": batch["word_starts"] >= 0}
    task = TaggingTask(Config().task, Config().data)
    # a cached teacher padded to 5 words, with word 2 of row 1 missing for the teacher
    t_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    t = {"word_logits": torch.randn(2, 5, 4), "word_mask": t_mask}
    (pair,) = task.kd_pairs(s, t, batch)
    assert pair.teacher.shape == (6, 4)
    assert pair.row_mask.tolist() == [True, True, False, True, True, False]
    loss = soft_label_loss(pair.student, pair.teacher, "kl", 1.0, pair.row_mask)
    # changing logits on masked rows changes nothing
    s2 = {"word_logits": s["word_logits"].clone(), "word_mask": s["word_mask"]}
    s2["word_logits"][0, 2] += 7.0
    s2["word_logits"][1, 2] -= 3.0
    (pair2,) = task.kd_pairs(s2, t, batch)
    assert torch.allclose(loss, soft_label_loss(pair2.student, pair2.teacher, "kl", 1.0, pair2.row_mask))
    # a narrower teacher row is padded and its missing words masked
    narrow = {"word_logits": t["word_logits"][:, :2], "word_mask": t_mask[:, :2]}
    (pair3,) = task.kd_pairs(s, narrow, batch)
    assert pair3.row_mask.tolist() == [True, True, False, True, True, False]
    with pytest.raises(ValueError, match="teacher has 5 labels but the student 4"):
        task.kd_pairs(s, {"word_logits": torch.randn(2, 3, 5), "word_mask": t_mask[:, :3]}, batch)


def test_setup_label_names_and_errors():
    cfg = Config()
    strings = DatasetDict(
        train=Dataset.from_dict({"tokens": [["a", "b"]], "tags": [["B-X", "O"]]}),
        validation=Dataset.from_dict({"tokens": [["a"]], "tags": [["B-Y"]]}),
    )
    with pytest.raises(ValueError, match=r"split 'validation' has tags never seen in training: \['B-Y'\]"):
        TaggingTask(cfg.task, cfg.data).setup(strings)
    strings["validation"] = Dataset.from_dict({"tokens": [["a"]], "tags": [["O"]]})
    task = TaggingTask(cfg.task, cfg.data)
    task.setup(strings)
    assert task.labels == ["B-X", "O"]
    ids = DatasetDict(train=Dataset.from_dict({"tokens": [["a", "b"]], "tags": [[2, 0]]}))
    task = TaggingTask(cfg.task, cfg.data)
    task.setup(ids)
    assert task.labels == ["0", "1", "2"]
    with pytest.raises(ValueError, match=r"no column 'tags'.*data\.columns\.tags"):
        TaggingTask(cfg.task, cfg.data).setup(ner_raw([(WORDS, TAGS)]))
    assert make_task(ner_raw([(WORDS, TAGS)])).labels == NAMES


def test_tokens_and_tags_of_different_lengths():
    raw = DatasetDict(train=Dataset.from_dict({"tokens": [["a", "b"], ["c"]], "tags": [["O", "O"], ["O"]]}))
    raw["validation"] = Dataset.from_dict({"tokens": [["a", "b"]], "tags": [["O"]]})
    with pytest.raises(ValueError, match=r"split 'validation': row 0: 2 words \('tokens'\) but 1 tags \('tags'\)"):
        TaggingTask(Config().task, Config().data).setup(raw)


def test_forward_kd_and_metrics_with_tiny_models(bert_tok, bpe_tok, tiny_roberta_dir):
    words, tags = long_sentence(30)
    raw = ner_raw([(words, tags), (WORDS, TAGS), (["Ana", "vive", "en", "Madrid", ZWSP], [5, 0, 0, 3, 0])])
    task = make_task(raw, max_length=24, stride=6)
    task.bind(bert_tok, bpe_tok)
    feats = task.preprocess(raw["train"], "train")
    batch = task.collate(list(feats))
    torch.manual_seed(0)
    student = task.model_class().from_config(tiny_bert_config(**task.model_kwargs()))
    teacher_cfg = AutoConfig.from_pretrained(tiny_roberta_dir, **task.model_kwargs())
    teacher = AutoModelForTokenClassification.from_config(teacher_cfg).eval()

    out = student(**task.model_inputs(batch))
    assert torch.isfinite(out.loss)  # CE on first sub-tokens
    with torch.no_grad():
        t_out = teacher(**task.model_inputs(batch, teacher=True))
    s_targets = task.kd_targets(out, batch, teacher=False)
    t_targets = task.kd_targets(t_out, batch, teacher=True)
    assert s_targets["word_logits"].shape == t_targets["word_logits"].shape == (len(feats), max(feats["num_words"]), 7)
    loss = SoftLabelLoss("kl", 2.0)(task.kd_pairs(s_targets, t_targets, batch))
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    assert student.classifier.weight.grad.abs().sum() > 0

    evals = {k: v.detach().numpy() for k, v in task.eval_outputs(out, batch).items()}
    metrics = task.compute_metrics(evals, feats, raw["train"])
    assert set(metrics) == {"f1", "precision", "recall", "accuracy", "words_without_tokens"}
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["words_without_tokens"] == 1.0
    preds = task.predictions(evals, feats, raw["train"])
    assert [len(p["prediction"]) for p in preds] == [30, 8, 5]


# --- rows and tags read as meant ------------------------------------------------------------

COSER = Path(__file__).parent.parent.parent / "shared" / "data" / "ud_es_coser" / "es_coser-ud-test.conllu"


def tagging_cfg(**columns) -> Config:
    cfg = Config()
    cfg.task.family = "tagging"
    cfg.data.columns = dict(columns)
    return cfg


@pytest.mark.skipif(not COSER.is_file(), reason="the UD COSER treebank is not in ../shared/data")
def test_conllu_treebank_trains_on_upos_by_default_and_xpos_on_request(bert_tok, caplog):
    from distill.data.read import RawSplits, read_file

    # a deterministic split of the real treebank: every 5th sentence is validation
    full = read_file(COSER)  # .conllu: the format comes from the extension
    val_rows = [i for i in range(len(full)) if i % 5 == 4]
    train_rows = [i for i in range(len(full)) if i % 5 != 4]
    origins = {"train": str(COSER), "validation": str(COSER)}

    def raw():
        return RawSplits({"train": full.select(train_rows), "validation": full.select(val_rows)}, origins)

    task = TaggingTask(*_sections(tagging_cfg()))
    upos = raw()
    task.setup(upos)
    train_upos = {t for s in upos["train"]["upos"] for t in s}
    assert task.labels == sorted(train_upos) and "PUNCT" in task.labels and "_" not in task.labels
    task.bind(bert_tok)
    feats = task.preprocess(upos["validation"].select(range(4)), "validation")
    first = upos["validation"][0]
    gold = [task.labels[t] for t in feats[0]["labels"] if t != -100]
    assert gold == first["upos"][: len(gold)]  # the words' UPOS tags, on first sub-tokens

    # XPOS on request: this treebank leaves XPOS unspecified ('_') on some words, which are
    # refused naming the file and row, or dropped when the recipe says so
    with pytest.raises(ValueError) as err:
        TaggingTask(*_sections(tagging_cfg(tags="xpos"))).setup(raw())
    first_bad = next(i for i, s in enumerate(full.select(train_rows)["xpos"]) if None in s)
    assert f"split 'train' ({COSER}): row {first_bad}: column 'xpos': tag" in str(err.value)
    assert "is null" in str(err.value)
    cfg = tagging_cfg(tags="xpos")
    cfg.data.drop_invalid = True
    # XPOS tags are many and rare: validation has some that training lacks, refused unless the
    # recipe names every tag (then the model has an output for each)
    with pytest.raises(ValueError, match="split 'validation' has tags never seen in training"):
        TaggingTask(cfg.task, cfg.data).setup(raw())
    cfg.task.labels = sorted({t for s in full["xpos"] for t in s if t is not None})
    xpos = raw()
    with caplog.at_level("WARNING", logger="distill.data.read"):
        task = TaggingTask(cfg.task, cfg.data)
        task.setup(xpos)
    kept = [s for s in full.select(train_rows)["xpos"] if None not in s]
    assert len(xpos["train"]) == len(kept) and f"dropped {len(train_rows) - len(kept)} of {len(train_rows)}" in caplog.text
    assert task.labels == cfg.task.labels
    assert "ncms000" in task.labels and "NOUN" not in task.labels


def test_a_tag_column_without_any_tag_is_refused():
    raw = DatasetDict(train=Dataset.from_dict({"tokens": [["a", "b"]], "xpos": [[None, None]]}))
    with pytest.raises(ValueError, match=r"column 'xpos' of split 'train' holds no tags.*data.columns.tags=<column>"):
        TaggingTask(*_sections(tagging_cfg(tags="xpos"))).setup(raw)


@pytest.mark.parametrize(
    "tokens, tags, problem",
    [
        (None, ["O"], "column 'tokens' is null"),
        ([], [], "column 'tokens' has no words"),
        (["a", None], ["O", "O"], "column 'tokens': word 1 is null"),
        (["a", " "], ["O", "O"], "column 'tokens': word 1 is empty"),
        (["a", "b"], None, "column 'tags' is null"),
        (["a", "b"], ["O", None], "column 'tags': tag 1 (of word 'b') is null"),
        (["a", "b"], ["O", ""], "column 'tags': tag 1 (of word 'b') is empty"),
    ],
)
def test_null_or_empty_words_and_tags_are_refused(tokens, tags, problem):
    good = (["x", "y"], ["O", "B-X"])
    data = {"tokens": [good[0], tokens, good[0]], "tags": [good[1], tags, good[1]]}
    raw = DatasetDict(train=Dataset.from_dict(data))
    with pytest.raises(ValueError) as err:
        TaggingTask(*_sections(tagging_cfg())).setup(raw)
    assert f"split 'train': row 1: {problem}" in str(err.value)
    cfg = tagging_cfg()
    cfg.data.drop_invalid = True
    TaggingTask(cfg.task, cfg.data).setup(raw)
    assert raw["train"]["tokens"] == [good[0], good[0]]


def test_tag_ids_ordered_numerically_and_named_by_task_labels():
    ids = DatasetDict(train=Dataset.from_dict({"tokens": [["a"] * 12], "tags": [[10, 2, 0, 11, 1, 3, 4, 5, 6, 7, 8, 9]]}))
    task = TaggingTask(*_sections(tagging_cfg()))
    task.setup(ids)
    assert task.labels == [str(i) for i in range(12)]
    assert task._tag_ids([10, 2, 11]) == [10, 2, 11]
    cfg = tagging_cfg(tags="ner_tags")
    cfg.task.labels = ["O", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-PER", "I-PER"]  # another order
    task = TaggingTask(cfg.task, cfg.data)
    task.setup(ner_raw([(WORDS, TAGS)]))
    assert task.labels == cfg.task.labels
    # ClassLabel ids 1 (B-ORG) and 3 (B-LOC) of the dataset map by name into the recipe's order
    assert task._tag_ids([0, 1, 3]) == [0, 3, 1]
    mixed = DatasetDict(train=Dataset.from_dict({"tokens": [["a", "b"]], "tags": [["O", "o"]]}))
    with pytest.raises(ValueError, match=r"differ only by case or surrounding spaces: 'O' .* vs 'o'"):
        TaggingTask(*_sections(tagging_cfg())).setup(mixed)


def _sections(cfg):
    """The task and data sections a task is built from."""
    return cfg.task, cfg.data
