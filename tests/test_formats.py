"""Readers for CoNLL text and SQuAD JSON: same rows whatever the layout, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from datasets import load_dataset

from distill.formats import read_conll, read_squad

DATA = Path(__file__).parent / "data"


def test_read_conll_rows():
    ds = read_conll(DATA / "ner.conll")
    assert ds.column_names == ["tokens", "tags"]
    assert len(ds) == 4  # -DOCSTART- lines and repeated blank lines make no sentences
    assert ds[0] == {
        "tokens": ["El", "Real", "Madrid", "ganó", "en", "Sevilla", "."],
        "tags": ["O", "B-ORG", "I-ORG", "O", "O", "B-LOC", "O"],
    }
    # a `token pos tag` line keeps the last column as the tag; tabs separate like spaces
    assert ds[1]["tags"][4] == "O" and ds[1]["tokens"][4] == "publicó"
    assert ds[2]["tokens"][-1] == "." and ds[3] == {"tokens": ["Hola"], "tags": ["O"]}


def test_conll_and_jsonl_give_the_same_examples():
    conll = read_conll(DATA / "ner.conll")
    jsonl = load_dataset("json", data_files=str(DATA / "ner.jsonl"), split="train")
    assert conll.to_list() == jsonl.select_columns(["tokens", "tags"]).to_list()


def test_read_conll_errors(tmp_path):
    bad = tmp_path / "bad.conll"
    bad.write_text("El O\nMadrid\n")
    with pytest.raises(ValueError, match=r"bad.conll:2: expected 'token tag'"):
        read_conll(bad)
    empty = tmp_path / "empty.conll"
    empty.write_text("-DOCSTART- O\n\n")
    with pytest.raises(ValueError, match="no sentences"):
        read_conll(empty)
    with pytest.raises(FileNotFoundError, match="missing.conll"):
        read_conll(tmp_path / "missing.conll")


def test_nested_and_flat_squad_give_the_same_examples(tmp_path):
    nested = read_squad(DATA / "squad_nested.json")
    flat = read_squad(DATA / "squad_flat.jsonl")
    assert len(nested) == 3
    assert nested.to_list() == flat.to_list()
    assert nested.features == flat.features
    first = nested[0]
    assert first["id"] == "prado-1" and first["title"] == "Museo del Prado"
    assert first["answers"] == {"text": ["en Madrid", "Madrid"], "answer_start": [32, 35]}
    assert first["context"][35:41] == "Madrid"
    # a flat JSON list, with answers given as a list of objects, reads the same
    rows = [json.loads(line) for line in (DATA / "squad_flat.jsonl").read_text().splitlines()]
    for row in rows:
        a = row["answers"]
        row["answers"] = [{"text": t, "answer_start": s} for t, s in zip(a["text"], a["answer_start"])]
    as_list = tmp_path / "flat.json"
    as_list.write_text(json.dumps(rows, ensure_ascii=False))
    assert read_squad(as_list).to_list() == nested.to_list()
    # and so does the Hub's flat layout wrapped in {"data": [...]}
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"data": rows}, ensure_ascii=False))
    assert read_squad(wrapped).to_list() == nested.to_list()


def test_read_squad_fills_missing_ids_and_answers(tmp_path):
    path = tmp_path / "test.jsonl"
    path.write_text(json.dumps({"context": "Hola mundo.", "question": "¿Qué?"}) + "\n")
    row = read_squad(path)[0]
    assert row["id"] == "0" and row["title"] == ""
    assert row["answers"] == {"text": [], "answer_start": []}


def test_read_squad_errors(tmp_path):
    nested = {"data": [{"title": "t", "paragraphs": [{"context": "c", "qas": [{"id": "x"}]}]}]}
    path = tmp_path / "nested.json"
    path.write_text(json.dumps(nested))
    with pytest.raises(ValueError, match=r"data\[0\]\.paragraphs\[0\]\.qas\[0\] has no 'question'"):
        read_squad(path)
    uneven = {"context": "c", "question": "q", "answers": {"text": ["a", "b"], "answer_start": [0]}}
    path = tmp_path / "uneven.jsonl"
    path.write_text(json.dumps(uneven) + "\n")
    with pytest.raises(ValueError, match="2 answer texts but 1 answer_start"):
        read_squad(path)
    path = tmp_path / "lines.json"
    path.write_text(json.dumps(uneven) + "\n" + json.dumps(uneven) + "\n")
    with pytest.raises(ValueError, match=r"\.jsonl extension"):
        read_squad(path)
    path = tmp_path / "nocontext.jsonl"
    path.write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(ValueError, match=r"row 0 lacks \['context'\]"):
        read_squad(path)


def test_shipped_spanish_mini_datasets_load_as_recipes_would():
    from distill.config import Config
    from distill.data import load_raw

    shipped = Path(__file__).parent.parent / "distill" / "sample_data"
    cfg = Config()
    cfg.data.source = str(shipped / "ner_es")
    ner = load_raw(cfg)
    assert {k: len(v) for k, v in ner.items()} == {"train": 16, "validation": 8}
    train_tags = {t for tags in ner["train"]["tags"] for t in tags}
    assert {t for tags in ner["validation"]["tags"] for t in tags} <= train_tags
    assert train_tags == {"O"} | {f"{p}-{k}" for p in "BI" for k in ("PER", "ORG", "LOC", "MISC")}

    cfg.data.source = str(shipped / "qa_es")
    qa = load_raw(cfg)
    assert {k: len(v) for k, v in qa.items()} == {"train": 15, "validation": 6}
    for split in qa.values():
        for row in split:
            (text,), (start,) = row["answers"]["text"], row["answers"]["answer_start"]
            assert row["context"][start : start + len(text)] == text
