"""Transfer sets: the word-split rule, reading and column mapping, the leak filter, the student's
training rows with `has_gold`, and features whose gold loss skips transfer rows."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, List, Value
from transformers import AutoModelForQuestionAnswering, AutoModelForSequenceClassification, AutoTokenizer

from distill.config import Config, ConfigError, TransferSource, load_config
from distill.errors import DataError
from distill.data.transfer import (
    HAS_GOLD,
    IGNORE_INDEX,
    IGNORE_POSITION,
    GoldCollate,
    build_student_train_rows,
    check_transfer,
    filter_rows,
    mark_gold,
    normalize,
)
from distill.data.rows import split_words
from tests.conftest import tiny_bert_config


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


# --- the word-split rule ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, words",
    [
        ("¿Dónde está la estación?", ["¿", "Dónde", "está", "la", "estación", "?"]),
        ("Subió un 3,5% hasta 1.000.000 a las 12:30.", ["Subió", "un", "3,5", "%", "hasta", "1.000.000", "a", "las", "12:30", "."]),
        ("El acuerdo franco-alemán (COVID-19)", ["El", "acuerdo", "franco-alemán", "(", "COVID-19", ")"]),
        ("l'ordinador d’en Pere", ["l'ordinador", "d’en", "Pere"]),
        ("«Hola»,\tdijo…  ¡ya!", ["«", "Hola", "»", ",", "dijo", "…", "¡", "ya", "!"]),
        ("cancio\u0301n", ["cancio\u0301n"]),  # a combining accent stays inside its word
        ("año 2024.", ["año", "2024", "."]),  # a final period is not a decimal separator
        ("   ", []),
    ],
)
def test_split_words_rule(text, words):
    assert split_words(text) == words


def test_normalize_casefolds_and_removes_whitespace():
    assert normalize("  El  GATO\tduerme ") == normalize("el gato duerme") == "elgatoduerme"
    assert normalize("El gato .") == normalize("El gato.")  # a tokenized copy is the same row
    assert normalize("ﬁn") == normalize("fin")  # NFKC
    assert normalize("canción") != normalize("cancion")  # accents are kept


# --- the leak filter ------------------------------------------------------------------------------


def test_filter_rows_by_hand():
    keys = np.array([5, 1, 7, 5, 9, 1, 3], dtype=np.uint64)
    evals = np.array([1, 2], dtype=np.uint64)
    seen = np.array([9], dtype=np.uint64)
    kept, leaked, dups = filter_rows(keys, evals, seen)
    assert leaked.tolist() == [1, 5]  # both copies of an evaluation row
    assert dups.tolist() == [3, 4]  # a second 5, and 9 already seen
    assert kept.tolist() == [0, 2, 6]


def pair_raw() -> DatasetDict:
    features = Features({"premise": Value("string"), "hypothesis": Value("string"),
                         "label": ClassLabel(names=["entailment", "neutral", "contradiction"])})
    return DatasetDict(
        train=Dataset.from_dict({"premise": ["El gato duerme.", "Hace calor."], "hypothesis": ["Un animal descansa.", "Hace frío."],
                                 "label": [0, 2]}, features=features),
        validation=Dataset.from_dict({"premise": ["Ella lee."], "hypothesis": ["Ella duerme."], "label": [2]}, features=features),
        test=Dataset.from_dict({"premise": ["Llueve en Lima."], "hypothesis": ["El suelo está mojado."], "label": [0]}, features=features),
    )


PAIR_COLUMNS = {"text": "premise", "text_pair": "hypothesis", "label": "label"}


def test_pair_transfer_rows_leak_filter_and_counts(tmp_path, caplog):
    rows = [
        {"a": "ELLA  lee.", "b": "ella duerme."},  # 0: the validation pair, other case/spacing
        {"a": "Ella lee.", "b": "Ella come."},  # 1: same premise, other hypothesis: kept
        {"a": "Llueve en Lima.", "b": "El suelo está mojado ."},  # 2: the test pair (tokenized)
        {"a": "El gato duerme.", "b": "Un animal descansa."},  # 3: a labelled training pair
        {"a": "Sale el sol.", "b": "Es de día."},  # 4: new
        {"a": "Sale el sol.", "b": "Es de día."},  # 5: repeats 4
        {"a": "", "b": "Vacío."},  # 6: empty premise
    ]
    src = TransferSource(files=[str(write_jsonl(tmp_path / "u.jsonl", rows))], columns={"text": "a", "text_pair": "b"})
    with caplog.at_level("INFO", logger="distill"):
        out, counts = build_student_train_rows(pair_raw(), "classification", PAIR_COLUMNS, [src])
    assert counts == {"labelled": 2, "transfer": 2, "augmented": 0, "leaked_dropped": 2,
                      "duplicates_dropped": 2, "empty_dropped": 1}
    assert out.column_names == ["premise", "hypothesis", "label", HAS_GOLD]
    assert out[HAS_GOLD] == [True, True, False, False]  # labelled rows first
    assert out["premise"][2:] == ["Ella lee.", "Sale el sol."]
    assert out["hypothesis"][2:] == ["Ella come.", "Es de día."]
    assert out.features["label"] == pair_raw()["train"].features["label"]  # the placeholder's type
    assert "dropped 2 that duplicate validation/test rows" in caplog.text


def test_qa_leak_is_question_and_context(tmp_path):
    features = Features({"id": Value("string"), "question": Value("string"), "context": Value("string"),
                         "answers": {"text": List(Value("string")), "answer_start": List(Value("int32"))}})
    ctx = "Madrid es la capital de España."
    raw = DatasetDict(
        train=Dataset.from_dict({"id": ["a"], "question": ["¿Qué es Madrid?"], "context": [ctx],
                                 "answers": [{"text": ["la capital de España"], "answer_start": [10]}]}, features=features),
        test=Dataset.from_dict({"id": ["t"], "question": ["¿Cuál es la capital?"], "context": [ctx],
                                "answers": [{"text": ["Madrid"], "answer_start": [0]}]}, features=features),
    )
    rows = [
        {"question": "¿cuál es  la capital?", "context": ctx},  # the test row: dropped
        {"question": "¿Dónde está Madrid?", "context": ctx},  # same context, new question: kept
        {"question": "¿Quién vive?", "context": "Vive Ana en Quito."},
    ]
    src = TransferSource(files=[str(write_jsonl(tmp_path / "q.jsonl", rows))])
    out, counts = build_student_train_rows(raw, "qa", {}, [src])
    assert counts["leaked_dropped"] == 1 and counts["transfer"] == 2
    assert out["question"][1:] == ["¿Dónde está Madrid?", "¿Quién vive?"]
    assert out["id"][1:] == ["transfer0-1", "transfer0-2"]
    assert out["answers"][1:] == [{"text": [], "answer_start": []}] * 2


# --- reading and column mapping -----------------------------------------------------------------


def tagging_raw() -> DatasetDict:
    names = ["O", "B-LOC", "I-LOC"]
    features = Features({"tokens": List(Value("string")), "ner_tags": List(ClassLabel(names=names))})
    return DatasetDict(
        train=Dataset.from_dict({"tokens": [["Vive", "en", "Lima", "."]], "ner_tags": [[0, 0, 1, 0]]}, features=features),
        validation=Dataset.from_dict({"tokens": [["Llueve", "en", "Quito", "."]], "ner_tags": [[0, 0, 1, 0]]}, features=features),
    )


TAG_COLUMNS = {"tokens": "tokens", "tags": "ner_tags"}


def test_tagging_raw_text_is_split_by_the_rule_and_tokens_files_read(tmp_path):
    (tmp_path / "news.txt").write_text("¿Llegó Ana a Bogotá?\n\nLlueve en Quito.\nEl 3,5% subió.\n", encoding="utf-8")
    (tmp_path / "words.conll").write_text("-DOCSTART- O\n\nSale\nel\nsol\n\nAna B-PER\ncanta O\n", encoding="utf-8")
    sources = [TransferSource(files=[str(tmp_path / "news.txt")]), TransferSource(files=[str(tmp_path / "words.conll")])]
    out, counts = build_student_train_rows(tagging_raw(), "tagging", TAG_COLUMNS, sources)
    assert counts["leaked_dropped"] == 1  # "Llueve en Quito." split = the validation sentence
    assert out["tokens"][1:] == [
        ["¿", "Llegó", "Ana", "a", "Bogotá", "?"], ["El", "3,5", "%", "subió", "."], ["Sale", "el", "sol"], ["Ana", "canta"]
    ]
    assert [len(t) for t in out["ner_tags"]] == [len(t) for t in out["tokens"]]  # placeholder per word
    assert out[HAS_GOLD] == [True, False, False, False, False]


def test_tagging_tokens_column_and_explicit_text_column(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"words": ["Hola", "Ana"], "raw": "Hola, Ana."}])
    out, _ = build_student_train_rows(tagging_raw(), "tagging", TAG_COLUMNS, [TransferSource(files=[str(path)], columns={"tokens": "words"})])
    assert out["tokens"][1] == ["Hola", "Ana"]
    out, _ = build_student_train_rows(tagging_raw(), "tagging", TAG_COLUMNS, [TransferSource(files=[str(path)], columns={"text": "raw"})])
    assert out["tokens"][1] == ["Hola", ",", "Ana", "."]


def test_column_mapping_errors_name_the_entry_and_role(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", [{"premise": "a", "hypothesis": "b"}])
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"premisa": "a", "hypothesis": "b"}])
    sources = [TransferSource(files=[str(good)]), TransferSource(files=[str(bad)])]
    with pytest.raises(DataError, match=r"data\.transfer\[1\]: no column 'premise' for text; the source has \['premisa', 'hypothesis'\]"):
        build_student_train_rows(pair_raw(), "classification", PAIR_COLUMNS, sources)
    with pytest.raises(DataError, match=r"data\.transfer\[0\]: no column 'x' for text_pair"):
        build_student_train_rows(pair_raw(), "classification", PAIR_COLUMNS, [TransferSource(files=[str(good)], columns={"text_pair": "x"})])
    single = DatasetDict(train=Dataset.from_dict({"text": ["a"], "label": ["x"]}))
    with pytest.raises(DataError, match=r"data\.transfer\[0\]\.columns\.text_pair is set but the task has no text pair"):
        build_student_train_rows(single, "classification", {}, [TransferSource(files=[str(good)], columns={"text": "premise", "text_pair": "hypothesis"})])
    strings = write_jsonl(tmp_path / "s.jsonl", [{"tokens": "Hola Ana"}])
    with pytest.raises(DataError, match=r"data\.transfer\[0\]: column 'tokens' holds str values.*columns\.text=tokens"):
        build_student_train_rows(tagging_raw(), "tagging", TAG_COLUMNS, [TransferSource(files=[str(strings)])])
    nothing = write_jsonl(tmp_path / "n.jsonl", [{"words": ["a"]}])
    with pytest.raises(DataError, match=r"data\.transfer\[0\]: no column 'tokens' of pre-split tokens and no 'text' column"):
        build_student_train_rows(tagging_raw(), "tagging", TAG_COLUMNS, [TransferSource(files=[str(nothing)])])
    with pytest.raises(DataError, match=r"data\.transfer\[0\]: file not found: .*missing\.txt"):
        build_student_train_rows(pair_raw(), "classification", PAIR_COLUMNS, [TransferSource(files=[str(tmp_path / "missing.txt")])])


def test_check_transfer_fails_on_the_first_bad_entry(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", [{"premise": "a", "hypothesis": "b"}] * 300)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"premise": "a"}])
    check_transfer(pair_raw(), "classification", PAIR_COLUMNS, [TransferSource(files=[str(good)])])
    with pytest.raises(DataError, match=r"data\.transfer\[1\]: no column 'hypothesis' for text_pair"):
        check_transfer(pair_raw(), "classification", PAIR_COLUMNS, [TransferSource(files=[str(good)]), TransferSource(files=[str(bad)])])
    (tmp_path / "empty.txt").write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"data\.transfer\[0\] holds no rows"):
        check_transfer(pair_raw(), "classification", PAIR_COLUMNS, [TransferSource(files=[str(tmp_path / "empty.txt")])])


def test_offline_hub_source_names_the_entry(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src = TransferSource(source="nobody/no-such-dataset-here", name="es", split="train")
    with pytest.raises(DataError, match=r"data\.transfer\[0\]: cannot load split 'train' of dataset 'nobody/no-such-dataset-here' \(config 'es'\): HF_HUB_OFFLINE"):
        build_student_train_rows(pair_raw(), "classification", PAIR_COLUMNS, [src])


def test_max_samples_takes_the_first_rows(tmp_path):
    path = tmp_path / "many.txt"
    path.write_text("".join(f"texto número {i}\n" for i in range(10)), encoding="utf-8")
    raw = DatasetDict(train=Dataset.from_dict({"text": ["hola"], "label": ["x"]}))
    out, counts = build_student_train_rows(raw, "classification", {}, [TransferSource(files=[str(path)], max_samples=3)])
    assert counts["transfer"] == 3 and out["text"][1:] == ["texto número 0", "texto número 1", "texto número 2"]


# --- config -------------------------------------------------------------------------------------


BASE = ["teacher.model=t", "student.model=s"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.transfer=[{files: [a.txt]}, {files: [b.txt], source: x}]"], r"data\.transfer\[1\]: set exactly one of 'files'"),
        (["data.transfer=[{}]"], r"data\.transfer\[0\]: set exactly one of 'files'.*got neither"),
        (["data.transfer=[{files: [a], format: xml}]"], r"data\.transfer\[0\]\.format='xml' is not one of"),
        (["data.transfer=[{files: [a], max_samples: 0}]"], r"data\.transfer\[0\]\.max_samples must be a positive"),
        (["data.transfer=[{files: [a], columns: {label: y}}]"], r"data\.transfer\[0\]\.columns\.label: .*transfer rows have no labels"),
        (["task.family=tagging", "data.transfer=[{files: [a], columns: {question: q}}]"], r"columns\.question: not an input role of task\.family=tagging; use tokens, text"),
        (["augment.copies=2", "augment.method=bert"], r"augment\.method='bert' is not one of: embedding, mlm"),
        (["augment.copies=-1"], r"augment\.copies=-1 is out of range"),
        (["augment.p=1.5"], r"augment\.p=1\.5 is out of range"),
        (["augment.top_k=0"], r"augment\.top_k=0 is out of range"),
        (["augment.copies=2", "augment.method=mlm"], r"augment\.method=mlm needs augment\.model"),
        (["augment.copies=2", "distill.kd_weight=0", "distill.ce_weight=1"], r"augment\.copies add rows without gold labels.*kd_weight"),
    ],
)
def test_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, BASE + overrides)


def test_config_needs_a_teacher_and_accepts_a_full_section():
    with pytest.raises(ConfigError, match=r"data\.transfer need teacher\.model"):
        load_config(None, ["student.model=s", "data.transfer=[{files: [a.txt]}]"])
    cfg = load_config(None, BASE + [
        "data.transfer=[{files: [a.txt]}, {source: some/set, name: es, split: train, max_samples: 5}]",
        "augment.copies=4", "augment.method=mlm", "augment.model=m", "augment.p=0.3", "augment.top_k=8",
    ])
    assert cfg.data.transfer[1].source == "some/set" and cfg.data.transfer[1].max_samples == 5
    assert cfg.augment.copies == 4 and cfg.augment.method == "mlm"


# --- features: no gold loss on transfer rows ----------------------------------------------------


def test_classification_features_skip_transfer_rows_in_the_gold_loss(tmp_path, tiny_bert_dir):
    from distill.tasks.classification import ClassificationTask

    path = write_jsonl(tmp_path / "u.jsonl", [{"premise": "Sale el sol.", "hypothesis": "Es de día."},
                                              {"premise": "Ana canta.", "hypothesis": "Nadie canta."}])
    raw = pair_raw()
    cfg = Config()
    cfg.data.columns = dict(PAIR_COLUMNS)
    task = ClassificationTask(cfg.task, cfg.data)
    task.setup(raw)
    rows, counts = build_student_train_rows(raw, "classification", PAIR_COLUMNS, [TransferSource(files=[str(path)])])
    task.bind(AutoTokenizer.from_pretrained(tiny_bert_dir))
    features = mark_gold(task.preprocess(rows, "train"), rows)
    assert features[HAS_GOLD] == [True, True, False, False]
    assert features["labels"] == [0, 2, IGNORE_INDEX, IGNORE_INDEX]

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(tiny_bert_config(num_labels=3)).eval()
    batch = task.collate([features[i] for i in range(len(features))])
    out = model(**task.model_inputs(batch))
    # by hand: the mean of -log softmax at the gold label over the two labelled rows only
    logp = torch.log_softmax(out.logits, -1)  # [rows, labels]
    expected = -(logp[0, 0] + logp[1, 2]) / 2
    assert torch.allclose(out.loss, expected, atol=1e-6)


def test_tagging_and_qa_features_of_transfer_rows(tmp_path, tiny_bert_dir):
    from distill.tasks.qa import QATask
    from distill.tasks.tagging import TaggingTask

    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    (tmp_path / "n.txt").write_text("Ana vive en Bogotá.\n", encoding="utf-8")
    raw = tagging_raw()
    cfg = Config()
    cfg.task.family, cfg.data.columns = "tagging", dict(TAG_COLUMNS)
    task = TaggingTask(cfg.task, cfg.data)
    task.setup(raw)
    rows, _ = build_student_train_rows(raw, "tagging", TAG_COLUMNS, [TransferSource(files=[str(tmp_path / "n.txt")])])
    task.bind(tok)
    features = mark_gold(task.preprocess(rows, "train"), rows)
    assert features[HAS_GOLD] == [True, False]
    assert any(label != IGNORE_INDEX for label in features["labels"][0])
    assert set(features["labels"][1]) == {IGNORE_INDEX}
    assert features["num_words"][1] == 5  # Ana vive en Bogotá .
    collate = pickle.loads(pickle.dumps(GoldCollate(task.collate)))  # DataLoader workers pickle it
    batch = collate([features[0], features[1]])
    assert batch[HAS_GOLD].tolist() == [True, False] and batch["labels"].shape[0] == 2

    features_qa = Features({"id": Value("string"), "question": Value("string"), "context": Value("string"),
                            "answers": {"text": List(Value("string")), "answer_start": List(Value("int32"))}})
    qa_raw = DatasetDict(train=Dataset.from_dict(
        {"id": ["a"], "question": ["¿Dónde vive Ana?"], "context": ["Ana vive en Bogotá."],
         "answers": [{"text": ["Bogotá"], "answer_start": [12]}]}, features=features_qa))
    write_jsonl(tmp_path / "q.jsonl", [{"question": "¿Quién vive?", "context": "Ana vive en Quito con Luis."}])
    cfg = Config()
    cfg.task.family = "qa"
    qa = QATask(cfg.task, cfg.data)
    qa.setup(qa_raw)
    rows, _ = build_student_train_rows(qa_raw, "qa", {}, [TransferSource(files=[str(tmp_path / "q.jsonl")])])
    qa.bind(tok)
    feats = mark_gold(qa.preprocess(rows, "train"), rows)
    assert feats[HAS_GOLD] == [True, False]
    assert feats["start_positions"][1] == feats["end_positions"][1] == IGNORE_POSITION
    assert feats["start_positions"][0] not in (0, IGNORE_POSITION)

    torch.manual_seed(0)
    model = AutoModelForQuestionAnswering.from_config(tiny_bert_config()).eval()
    batch = GoldCollate(qa.collate)([feats[i] for i in range(len(feats))])
    assert batch[HAS_GOLD].tolist() == [True, False]
    out = model(**qa.model_inputs(batch))
    # by hand: only the labelled row's start and end cross-entropies count
    s, e = torch.log_softmax(out.start_logits, -1), torch.log_softmax(out.end_logits, -1)  # [rows, seq]
    expected = -(s[0, feats["start_positions"][0]] + e[0, feats["end_positions"][0]]) / 2
    assert torch.allclose(out.loss, expected, atol=1e-6)


# --- what a transfer file holds is checked, not converted -----------------------------------------


def test_numbers_or_lists_in_a_transfer_column_are_refused_not_made_text(tmp_path):
    """A mapped column of numbers (an id column) or lists would become their digits or their
    repr, and the student would be distilled on them; it is refused as a labelled column is."""
    numbers = write_jsonl(tmp_path / "numbers.jsonl", [{"premise": i, "hypothesis": "b"} for i in range(3)])
    with pytest.raises(DataError, match=r"data\.transfer\[0\]: column 'premise' \(text\) holds int values \(row 0: '0'\), not text.*columns\.text=<column>"):
        check_transfer(pair_raw(), "classification", PAIR_COLUMNS, [TransferSource(files=[str(numbers)])])
    lists = write_jsonl(tmp_path / "lists.jsonl", [{"premise": "a", "hypothesis": ["b", "c"]}])
    with pytest.raises(DataError, match=r"column 'hypothesis' \(text_pair\) holds list values"):
        build_student_train_rows(pair_raw(), "classification", PAIR_COLUMNS, [TransferSource(files=[str(lists)])])
    ids = write_jsonl(tmp_path / "ids.jsonl", [{"tokens": [1, 2, 3]}])
    with pytest.raises(DataError, match=r"column 'tokens' \(tokens\) holds list values.*not lists of words"):
        check_transfer(tagging_raw(), "tagging", TAG_COLUMNS, [TransferSource(files=[str(ids)])])
    fine = write_jsonl(tmp_path / "fine.jsonl", [{"premise": "a", "hypothesis": "b", "n": 3}])
    check_transfer(pair_raw(), "classification", PAIR_COLUMNS, [TransferSource(files=[str(fine)])])  # other columns: ignored


@pytest.mark.parametrize("name", ["news.txt", "news.conll"])
def test_a_latin1_text_transfer_file_names_the_encoding_and_the_line(tmp_path, name):
    path = tmp_path / name
    path.write_bytes("Hola\nAdiós\n".encode("utf-8") + "El niño llegó\n".encode("latin-1"))
    with pytest.raises(DataError, match=rf"data\.transfer\[0\]: .*{name}:3: not valid UTF-8 \(byte 0xf1 at column 6\).*latin1"):
        check_transfer(tagging_raw(), "tagging", TAG_COLUMNS, [TransferSource(files=[str(path)])])
    bom = tmp_path / f"bom-{name}"
    bom.write_bytes(b"\xef\xbb\xbf" + "Hola Ana\n".encode("utf-8"))  # a UTF-8 byte-order mark is fine
    out, _ = build_student_train_rows(tagging_raw(), "tagging", TAG_COLUMNS, [TransferSource(files=[str(bom)])])
    assert out["tokens"][1][0] == "Hola"
