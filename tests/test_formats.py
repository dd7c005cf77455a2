"""Readers for CoNLL text and SQuAD JSON: same rows whatever the layout, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from datasets import load_dataset

from distill.errors import DataError
from distill.data.formats import check_utf8, read_conll, read_conllu, read_squad

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
    from distill.data.read import load_raw

    shipped = Path(__file__).parent.parent / "distill" / "sample_data"
    cfg = Config()
    cfg.data.source = str(shipped / "ner_es")
    ner = load_raw(cfg.data, cfg.seed)
    assert {k: len(v) for k, v in ner.items()} == {"train": 16, "validation": 8}
    train_tags = {t for tags in ner["train"]["tags"] for t in tags}
    assert {t for tags in ner["validation"]["tags"] for t in tags} <= train_tags
    assert train_tags == {"O"} | {f"{p}-{k}" for p in "BI" for k in ("PER", "ORG", "LOC", "MISC")}

    cfg.data.source = str(shipped / "qa_es")
    qa = load_raw(cfg.data, cfg.seed)
    assert {k: len(v) for k, v in qa.items()} == {"train": 15, "validation": 6}
    for split in qa.values():
        for row in split:
            (text,), (start,) = row["answers"]["text"], row["answers"]["answer_start"]
            assert row["context"][start : start + len(text)] == text


# --- CoNLL-U ----------------------------------------------------------------------------------

COSER = Path(__file__).parent.parent.parent / "shared" / "data" / "ud_es_coser" / "es_coser-ud-test.conllu"


def conllu_line(i, form, upos="NOUN", xpos="nc", misc="_"):
    return f"{i}\t{form}\t{form.lower()}\t{upos}\t{xpos}\t_\t0\troot\t_\t{misc}\n"


def test_read_conllu_words_tags_and_skipped_lines(tmp_path):
    text = (
        "# newdoc id = d1\n# sent_id = s-1\n# text = Vino del pueblo.\n"
        + conllu_line(1, "Vino", "VERB", "vmis3s0")
        + "2-3\tdel\t_\t_\t_\t_\t_\t_\t_\t_\n"  # multiword token: its words follow
        + conllu_line(2, "de", "ADP", "sps00")
        + conllu_line(3, "el", "DET", "_")  # unspecified XPOS
        + conllu_line(4, "pueblo", "NOUN", "ncms000")
        + "4.1\tvino\tvenir\tVERB\t_\t_\t_\t_\t3:conj\t_\n"  # empty node: no word of the text
        + conllu_line(5, ".", "PUNCT", "fp", "SpaceAfter=No")
        + "\n\n"
        + conllu_line(1, "Hola", "INTJ", "i")
        + "\n"
    )
    path = tmp_path / "s.conllu"
    path.write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())  # BOM and CRLF
    ds = read_conllu(path)
    assert ds.column_names == ["sent_id", "tokens", "tags", "upos", "xpos"]
    assert ds[0] == {
        "sent_id": "s-1",
        "tokens": ["Vino", "de", "el", "pueblo", "."],
        "tags": ["VERB", "ADP", "DET", "NOUN", "PUNCT"],
        "upos": ["VERB", "ADP", "DET", "NOUN", "PUNCT"],
        "xpos": ["vmis3s0", "sps00", None, "ncms000", "fp"],
    }
    assert ds[1] == {"sent_id": "2", "tokens": ["Hola"], "tags": ["INTJ"], "upos": ["INTJ"], "xpos": ["i"]}


@pytest.mark.skipif(not COSER.is_file(), reason="the UD COSER treebank is not in ../shared/data")
def test_read_conllu_real_treebank():
    ds = read_conllu(COSER)
    # an independent count of what the reader should give: sentences are runs of word lines
    # (integer IDs); comments, multiword ranges (3-4) and empty nodes (5.1) are not words
    sentences, words, current = [], [], []
    multiword_forms = set()
    for line in COSER.read_text(encoding="utf-8").splitlines():
        cols = line.split("\t")
        if not line.strip():
            if current:
                sentences.append(current)
            current = []
        elif len(cols) == 10 and cols[0].isdigit():
            current.append((cols[1], cols[3], cols[4]))
        elif len(cols) == 10 and "-" in cols[0]:
            multiword_forms.add(cols[1])
    if current:
        sentences.append(current)
    assert len(ds) == len(sentences) == 539  # the treebank's README says 539 sentences
    assert ds["tokens"] == [[w for w, _, _ in s] for s in sentences]
    assert ds["upos"] == ds["tags"] == [[u for _, u, _ in s] for s in sentences]
    assert ds["xpos"] == [[None if x == "_" else x for _, _, x in s] for s in sentences]
    assert ds[0]["sent_id"] == "anda-230" and ds[0]["tokens"][:2] == ["¿", "Olivo"]
    assert multiword_forms, "the treebank has multiword tokens"
    tags = {t for s in ds["upos"] for t in s}
    assert None not in tags and "_" not in tags and tags <= {
        "ADJ", "ADP", "ADV", "AUX", "CCONJ", "DET", "INTJ", "NOUN", "NUM", "PART", "PRON", "PROPN",
        "PUNCT", "SCONJ", "SYM", "VERB", "X",
    }
    # read as 'token tag' CoNLL it would have trained on the ID column: refused instead
    with pytest.raises(DataError, match=r"es_coser-ud-test.conllu:7: this is CoNLL-U.*data.format=conllu"):
        read_conll(COSER)


def test_conllu_errors_name_file_and_line(tmp_path):
    conll = tmp_path / "ner.conllu"
    conll.write_text("El O\nMadrid B-LOC\n")
    with pytest.raises(DataError, match=r"ner.conllu:1: expected 10 tab-separated CoNLL-U columns.*got 1.*data.format=conll"):
        read_conllu(conll)
    gap = tmp_path / "gap.conllu"
    gap.write_text(conllu_line(1, "Hola") + conllu_line(3, "mundo"))
    with pytest.raises(DataError, match=r"gap.conllu:2: word ID 3 where 2 was expected"):
        read_conllu(gap)
    bad_id = tmp_path / "id.conllu"
    bad_id.write_text(conllu_line("x", "Hola"))
    with pytest.raises(DataError, match=r"id.conllu:1: the ID column holds 'x'"):
        read_conllu(bad_id)
    only_comments = tmp_path / "c.conllu"
    only_comments.write_text("# sent_id = 1\n\n")
    with pytest.raises(DataError, match="no sentences found"):
        read_conllu(only_comments)


# --- byte-order marks and encodings -----------------------------------------------------------

ROWS = [{"text": "Buen día, señor", "label": "pos"}, {"text": "Fatal", "label": "neg"}]


def texts_of_every_format(tmp_path) -> dict[str, tuple[Path, str]]:
    """One small file per text format (name -> (path, format)), each with 'ñ' on line 3."""
    squad = {"data": [{"title": "t", "paragraphs": [{"context": "En España.", "qas": [
        {"id": "q", "question": "¿Dónde?", "answers": [{"text": "España", "answer_start": 3}]}]}]}]}
    files = {
        "jsonl": ("d.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS + ROWS[:1])),
        "json": ("d.json", "[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in ROWS) + "\n]\n"),
        "csv": ("d.csv", "text,label\nhola,pos\nseñor,pos\n"),
        "tsv": ("d.tsv", "text\tlabel\nhola\tpos\nseñor\tpos\n"),
        "conll": ("d.conll", "-DOCSTART- O\n\nseñor O\n"),
        "conllu": ("d.conllu", "# sent_id = 1\n" + conllu_line(1, "Hola") + conllu_line(2, "señor")),
        "squad": ("s.json", json.dumps(squad, ensure_ascii=False, indent=1)),
    }
    out = {}
    for fmt, (name, text) in files.items():
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        out[fmt] = (path, fmt)
    return out


def test_every_text_format_reads_the_same_with_a_byte_order_mark(tmp_path):
    from distill.data.read import read_file

    (tmp_path / "plain").mkdir()
    plain = texts_of_every_format(tmp_path / "plain")
    bom = tmp_path / "bom"
    bom.mkdir()
    for fmt, (path, _) in plain.items():
        copy = bom / path.name
        copy.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
        with_bom, without = read_file(copy, fmt), read_file(path, fmt)
        assert with_bom.column_names == without.column_names, fmt
        assert with_bom.to_list() == without.to_list(), fmt
    # a CoNLL file opening with a BOM: -DOCSTART- is still not a sentence
    assert read_file(bom / "d.conll", "conll").to_list() == [{"tokens": ["señor"], "tags": ["O"]}]


def test_a_byte_that_is_not_utf8_names_the_file_and_line(tmp_path):
    from distill.data.read import read_file

    for fmt, (path, _) in texts_of_every_format(tmp_path).items():
        path.write_bytes(path.read_bytes().replace("ñ".encode(), "ñ".encode("latin-1"), 1))
        line = path.read_bytes()[: path.read_bytes().index(b"\xf1")].count(b"\n") + 1
        with pytest.raises(DataError) as err:
            read_file(path, fmt)
        assert f"{path}:{line}: not valid UTF-8 (byte 0xf1" in str(err.value), fmt
        assert "iconv" in str(err.value)


def test_check_utf8_counts_lines_across_chunks(tmp_path):
    path = tmp_path / "big.txt"
    lines = [f"línea {i}\n".encode() for i in range(200)]
    lines[137] = b"l\xe9nea mala\n"
    path.write_bytes(b"".join(lines))
    for chunk_size in (7, 64, 1 << 20):  # chunks that cut lines, and one that holds the file
        with pytest.raises(DataError, match=r"big.txt:138: not valid UTF-8 \(byte 0xe9 at column 2\)"):
            check_utf8(path, chunk_size=chunk_size)
    path.write_bytes(b"".join(lines[:137]))
    check_utf8(path, chunk_size=7)  # no error


def test_utf16_is_refused_with_the_fix(tmp_path):
    path = tmp_path / "u16.conll"
    path.write_bytes("El O\n".encode("utf-16"))
    with pytest.raises(DataError, match="UTF-16.*iconv"):
        read_conll(path)


def test_jsonl_squad_errors_give_the_real_line(tmp_path):
    path = tmp_path / "q.jsonl"
    good = json.dumps({"context": "c", "question": "q"})
    path.write_text(f"{good}\n\n{good}\n{{oops\n")
    with pytest.raises(DataError, match=r"q.jsonl:4: not valid JSON"):
        read_squad(path)
