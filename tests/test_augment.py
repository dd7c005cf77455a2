"""Augmentation: candidate words (embedding neighbours, masked LM), alignment per task family,
determinism across batch sizes, and the on-disk cache."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, List, Value
from transformers import AutoTokenizer, BertConfig, BertForMaskedLM, BertModel, BertTokenizerFast

from distill.data import augment as aug
from distill.config import AugmentConfig
from distill.errors import ModelLoadError
from distill.data.transfer import HAS_GOLD, build_student_train_rows

WORDS = (
    "el la los las un una de en y con por para que se es está son come duerme corre lee vive canta "
    "escribe mira gato perro casa libro mesa ciudad río mar sol luna niña niño madre padre amigo "
    "grande pequeño rojo azul verde viejo nuevo bonito rápido lento madrid lima quito bogotá sevilla "
    "ana luis pedro marta hoy ayer mañana siempre nunca muy mucho poco dónde quién cuál capital país"
).split()
PIECES = ["##s", "##es", "##ito", "##ado", "##mente"]
PUNCT = list(".,;:¿?¡!()\"'-%") + [str(d) for d in range(10)]


@pytest.fixture(scope="module")
def tiny_vocab_dir(tmp_path_factory) -> Path:
    """A lowercase WordPiece tokenizer over ~90 Spanish words (every word is one token)."""
    root = tmp_path_factory.mktemp("tiny-vocab")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *PUNCT, *WORDS, *PIECES]
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True, strip_accents=False)
    tok.save_pretrained(root)
    return root


def tiny_config(vocab_size: int) -> BertConfig:
    return BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=128)


@pytest.fixture(scope="module")
def tiny_mlm_dir(tmp_path_factory, tiny_vocab_dir) -> Path:
    """A random 2-layer BertForMaskedLM with the tiny tokenizer (alignment, not quality)."""
    root = tmp_path_factory.mktemp("tiny-mlm")
    tok = AutoTokenizer.from_pretrained(tiny_vocab_dir)
    torch.manual_seed(0)
    BertForMaskedLM(tiny_config(len(tok))).save_pretrained(root)
    tok.save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def tiny_encoder_dir(tmp_path_factory, tiny_vocab_dir) -> Path:
    """A random 2-layer BertModel with the tiny tokenizer, for the embedding method."""
    root = tmp_path_factory.mktemp("tiny-encoder")
    tok = AutoTokenizer.from_pretrained(tiny_vocab_dir)
    torch.manual_seed(1)
    BertModel(tiny_config(len(tok))).save_pretrained(root)
    tok.save_pretrained(root)
    return root


def settings(**kw) -> AugmentConfig:
    return AugmentConfig(**{"copies": 4, "p": 0.5, "top_k": 5, "batch_size": 3, **kw})


SENTENCES = [
    "El gato duerme en la casa grande.",
    "Ana lee un libro nuevo con su madre.",
    "¿Dónde está la capital del país?",
    "Luis corre muy rápido por la ciudad.",
    "La niña mira el mar azul.",
    "Pedro escribe 3 libros.",
    "Marta canta y Luis come.",
]


def classification_rows(pair: bool = False) -> Dataset:
    data = {"text": SENTENCES, "label": ["a", "b", "a", "b", "a", "b", "a"]}
    if pair:
        data["hyp"] = list(reversed(SENTENCES))
    return Dataset.from_dict(data)


# --- helpers ------------------------------------------------------------------------------------


def test_word_helpers():
    assert aug.is_replaceable("canción") and aug.is_replaceable("cancio\u0301n")
    assert not any(aug.is_replaceable(w) for w in ("a", "de", "3,5", "12", "franco-alemán", "¿", "##ro", ""))
    assert aug.fold("Canción") == aug.fold("cancion")
    assert aug.match_case("barcelona", "Madrid") == "Barcelona"
    assert aug.match_case("barcelona", "MADRID") == "BARCELONA"
    assert aug.match_case("Barcelona", "casa") == "Barcelona"  # a cased vocabulary's casing stays
    assert aug.match_case("perro", "A") == "Perro"


def test_splice_moves_offsets_by_hand():
    f = aug.TextField("ab cd ef", [(0, 2), (3, 5), (6, 8)], [0, 1, 2])
    text, shifts = aug.splice(f, {0: "xyz", 2: "q"})
    assert text == "xyz cd q"
    assert shifts == [(2, 1), (8, -1)]
    assert aug.moved(3, shifts) == 4  # "cd" moved right by one character
    assert text[aug.moved(3, shifts):][:2] == "cd"


def test_plan_copies_uses_two_draws_per_word_and_copy():
    fields = [aug.TextField("x", [], [0, 1]), aug.TextField("y", [], [3])]
    rng = random.Random(7)
    plans = aug.plan_copies(fields, 2, 0.5, rng)
    replay = random.Random(7)
    expected = []
    for _ in range(2):
        chosen = {}
        for key in ((0, 0), (0, 1), (1, 3)):
            u, v = replay.random(), replay.random()
            if u < 0.5:
                chosen[key] = v
        expected.append(chosen)
    assert plans == expected


# --- candidates ---------------------------------------------------------------------------------


def test_word_vocabulary_on_minilm(minilm_dir):
    tok = AutoTokenizer.from_pretrained(minilm_dir)
    vocab = aug.WordVocabulary(tok)
    words = set(vocab.words)
    assert {"madrid", "casa", "house", "excellent"} <= words
    assert not any(w.startswith("##") or not w.isalpha() or len(w) < 3 for w in words)
    assert not set(tok.all_special_ids) & set(vocab.ids.tolist())
    pos = vocab.positions(["Madrid", "perro", "3", "casa"])
    assert pos[0] is not None and vocab.words[pos[0]] == "madrid"
    assert pos[1] is None  # per + ##ro
    assert pos[2] is None and pos[3] is not None


def test_embedding_neighbours_on_minilm_are_sensible(minilm_dir):
    from transformers import AutoModel

    tok = AutoTokenizer.from_pretrained(minilm_dir)
    vocab = aug.WordVocabulary(tok)
    emb = AutoModel.from_pretrained(minilm_dir).get_input_embeddings().weight
    found = aug.EmbeddingNeighbours(tok, emb, 8, vocab).propose(["excellent", "Madrid", "casa", "perro"])
    assert len(found["excellent"]) == 8
    assert "excellent" not in found["excellent"] and "madrid" not in found["Madrid"]
    assert {"terrific", "great", "wonderful", "brilliant", "good"} & set(found["excellent"])
    assert {"barcelona", "valencia", "sevilla", "bilbao", "spain"} & set(found["Madrid"])
    assert {"ciudad", "barrio", "pueblo", "maison"} & set(found["casa"])
    assert found["perro"] == []  # two pieces: left unchanged by this method
    special = {w.lower() for w in tok.all_special_tokens}
    for words in found.values():
        assert not special & set(words) and all(w.isalpha() and not w.startswith("##") for w in words)


def test_top_candidates_breaks_ties_by_token_id():
    class V:
        ids = np.array([40, 10, 30, 20])
        words = ["d", "a", "c", "b"]
        folded = ["d", "a", "c", "b"]

    scores = np.array([1.0, 1.0, 2.0, 1.0])
    assert aug.top_candidates(scores, V, 3, "zz", None) == ["c", "a", "b"]
    assert aug.top_candidates(scores, V, 3, "zz", 2) == ["a", "b", "d"]  # without the word itself


def test_mlm_head_on_the_masked_position_equals_the_full_forward(tiny_mlm_dir):
    tok = AutoTokenizer.from_pretrained(tiny_mlm_dir)
    model = BertForMaskedLM.from_pretrained(tiny_mlm_dir).eval()
    found = aug.MaskedLMCandidates(model, tok, aug.WordVocabulary(tok), 5, 64, 4)
    assert found.head is model.cls
    text = "el gato duerme en la casa."
    item = found._inputs(text, 3, 7)
    mine = found._logits([item])[0]  # [words]
    with torch.no_grad():
        full = model(input_ids=torch.tensor([item[0]])).logits[0, item[1]]  # [vocab]
    assert np.allclose(mine, full[torch.as_tensor(found.vocab.ids)].double().numpy(), atol=1e-5)


def test_mlm_refuses_a_model_without_an_mlm_head(minilm_dir, tmp_path):
    rows = classification_rows()
    with pytest.raises(ModelLoadError, match=r"has no trained masked-LM head.*method=embedding"):
        aug.augment_rows(rows, "classification", {}, settings(method="mlm"), str(minilm_dir), tmp_path, seed=0)


# --- determinism and cache ----------------------------------------------------------------------


@pytest.mark.parametrize("method", ["embedding", "mlm"])
def test_same_seed_same_rows_for_any_batch_size(method, tiny_mlm_dir, tiny_encoder_dir, tmp_path):
    model = str(tiny_mlm_dir if method == "mlm" else tiny_encoder_dir)
    rows = classification_rows()
    runs = [
        aug.augment_rows(rows, "classification", {}, settings(method=method, batch_size=bs), model, tmp_path / f"c{i}", seed=3)
        for i, bs in enumerate((1, 3, 7))
    ]
    first = runs[0].to_list()
    assert len(first) > len(rows)  # something was augmented
    for other in runs[1:]:
        assert other.to_list() == first
    other_seed = aug.augment_rows(rows, "classification", {}, settings(method=method), model, tmp_path / "c9", seed=4)
    assert other_seed.to_list() != first
    for row in first:
        source = rows[row["source_index"]]
        assert row["text"] != source["text"] and row["label"] == source["label"]
        assert len(aug.word_spans(row["text"])) == len(aug.word_spans(source["text"]))


def test_cache_is_reused_and_rebuilt_on_any_change(tiny_encoder_dir, tiny_vocab_dir, tmp_path, monkeypatch):
    calls = []
    real = aug._augment_batch
    monkeypatch.setattr(aug, "_augment_batch", lambda *a, **k: calls.append(1) or real(*a, **k))
    rows, model = classification_rows(), str(tiny_encoder_dir)

    def run(rows=rows, model=model, seed=0, **kw):
        calls.clear()
        out = aug.augment_rows(rows, "classification", {}, settings(**kw), model, tmp_path, seed=seed)
        return out, bool(calls)

    first, built = run()
    assert built and len(list(tmp_path.glob("augment-*"))) == 1
    again, built = run(batch_size=5)  # batch size is not part of the key
    assert not built and again.to_list() == first.to_list()
    for change in ({"p": 0.4}, {"top_k": 3}, {"copies": 2}, {"seed": 1}, {"keep_words": ["gato"]}):
        seed = change.pop("seed", 0)
        _, built = run(seed=seed, **change)
        assert built, change
    _, built = run(rows=rows.select(range(6)))
    assert built  # other input rows
    other = tmp_path / "other-encoder"
    tok = AutoTokenizer.from_pretrained(tiny_vocab_dir)
    torch.manual_seed(2)
    BertModel(tiny_config(len(tok))).save_pretrained(other)
    tok.save_pretrained(other)
    _, built = run(model=str(other))
    assert built  # other weights
    assert not list(tmp_path.glob(".augment-*"))  # no temporary folder left behind
    assert len(list(tmp_path.glob("augment-*"))) == 8


# --- alignment per family -----------------------------------------------------------------------


def test_pairs_have_both_sides_augmented(tiny_encoder_dir, tmp_path):
    rows = classification_rows(pair=True)
    out = aug.augment_rows(rows, "classification", {"text_pair": "hyp"}, settings(copies=6, p=0.6), str(tiny_encoder_dir), tmp_path, seed=0)
    changed_text = changed_pair = both = 0
    for row in out:
        source = rows[row["source_index"]]
        a, b = row["text"] != source["text"], row["hyp"] != source["hyp"]
        changed_text, changed_pair, both = changed_text + a, changed_pair + b, both + (a and b)
    assert changed_text and changed_pair and both


def test_tagging_keeps_the_word_count_and_unreplaceable_words(tiny_mlm_dir, tmp_path):
    features = Features({"tokens": List(Value("string")), "ner_tags": List(ClassLabel(names=["O", "B-PER", "B-LOC"]))})
    sentences = [s.replace(".", " .").replace("?", " ?").split() for s in SENTENCES]
    rows = Dataset.from_dict({"tokens": sentences, "ner_tags": [[0] * len(s) for s in sentences]}, features=features)
    columns = {"tokens": "tokens", "tags": "ner_tags"}
    out = aug.augment_rows(rows, "tagging", columns, settings(method="mlm", p=0.6), str(tiny_mlm_dir), tmp_path, seed=0)
    assert len(out) > len(rows)
    for row in out:
        source = rows[row["source_index"]]
        assert len(row["tokens"]) == len(source["tokens"]) == len(row["ner_tags"])
        assert row["ner_tags"] == source["ner_tags"]
        for new, old in zip(row["tokens"], source["tokens"]):
            assert new == old or (aug.is_replaceable(old) and aug.is_replaceable(new) and " " not in new)
        assert row["tokens"] != source["tokens"]


@pytest.mark.parametrize("method", ["embedding", "mlm"])
def test_qa_answers_stay_at_the_recomputed_start(method, tiny_mlm_dir, tiny_encoder_dir, tmp_path):
    features = Features({"id": Value("string"), "question": Value("string"), "context": Value("string"),
                         "answers": {"text": List(Value("string")), "answer_start": List(Value("int32"))}})
    context = "La niña mira el mar azul con su madre y luego Ana lee un libro nuevo en la casa grande de Lima."
    answers = ["Ana lee un libro", "casa grande"]
    starts = [context.index(a) for a in answers]
    rows = Dataset.from_dict(
        {"id": ["q1", "q2"], "question": ["¿Quién lee un libro?", "¿Dónde vive la niña?"], "context": [context, context],
         "answers": [{"text": [answers[0]], "answer_start": [starts[0]]},
                     {"text": answers, "answer_start": starts}]},
        features=features,
    )
    model = str(tiny_mlm_dir if method == "mlm" else tiny_encoder_dir)
    # max_length=12: the masked LM sees a window of the context around each masked word
    out = aug.augment_rows(rows, "qa", {}, settings(method=method, copies=6, p=0.7, max_length=12), model, tmp_path, seed=0)
    assert len(out) > 2
    context_changed = question_changed = 0
    for row in out:
        source = rows[row["source_index"]]
        assert row["id"].startswith(source["id"] + "-aug")
        assert row["answers"]["text"] == source["answers"]["text"]
        for text, start in zip(row["answers"]["text"], row["answers"]["answer_start"]):
            assert row["context"][start : start + len(text)] == text
        context_changed += row["context"] != context
        question_changed += row["question"] != source["question"]
        # words outside the answers may change; the word count never does
        assert len(aug.word_spans(row["context"])) == len(aug.word_spans(context))
    assert context_changed and question_changed


def test_augmented_rows_join_the_student_rows_without_gold(tiny_encoder_dir, tmp_path, monkeypatch):
    # fixed candidates: "azul" -> "rojo", "corre" -> "duerme", nothing for any other word
    fixed = {"azul": ["rojo"], "corre": ["duerme"]}
    monkeypatch.setattr(aug, "top_candidates", lambda scores, vocab, k, word, own: fixed.get(word, []))
    (tmp_path / "u.txt").write_text("Luis corre hoy.\n", encoding="utf-8")
    train = classification_rows()  # holds "La niña mira el mar azul."
    test = Dataset.from_dict({"text": ["La niña mira el mar rojo."], "label": ["a"]})
    raw = DatasetDict(train=train, test=test)
    common = dict(augment_model=str(tiny_encoder_dir), seed=0, cache_dir=tmp_path / "cache")
    out, counts = build_student_train_rows(raw, "classification", {}, augment=settings(copies=3, p=1.0), **common)
    # "Luis corre muy rápido por la ciudad." -> "Luis duerme ..." once (the copies are identical);
    # "La niña mira el mar rojo." is the test row: dropped
    assert counts == {"labelled": 7, "transfer": 0, "augmented": 1, "leaked_dropped": 1,
                      "duplicates_dropped": 0, "empty_dropped": 0}
    assert out["text"][7:] == ["Luis duerme muy rápido por la ciudad."]
    assert out[HAS_GOLD] == [True] * 7 + [False]
    assert "source_index" not in out.column_names

    from distill.config import TransferSource

    out, counts = build_student_train_rows(
        raw, "classification", {}, [TransferSource(files=[str(tmp_path / "u.txt")])],
        augment=settings(copies=3, p=1.0, include_transfer=True), **common,
    )
    assert counts["transfer"] == 1 and counts["augmented"] == 2
    assert out["text"][7:] == ["Luis corre hoy.", "Luis duerme muy rápido por la ciudad.", "Luis duerme hoy."]
    assert out[HAS_GOLD] == [True] * 7 + [False] * 3


# --- the cache is checked before it is trusted ----------------------------------------------------


@pytest.mark.parametrize("damage", ["flipped", "truncated"])
def test_a_damaged_cache_is_built_again(damage, tiny_encoder_dir, tmp_path, caplog):
    """A cut-short data.arrow used to fail every re-run with a pyarrow traceback until deleted by
    hand, and flipped bits were read as rows: the checksums written with the cache catch both."""
    rows, model = classification_rows(), str(tiny_encoder_dir)
    first = aug.augment_rows(rows, "classification", {}, settings(), model, tmp_path, seed=0).to_list()
    (folder,) = tmp_path.glob("augment-*")
    arrow = folder / "data.arrow"
    data = bytearray(arrow.read_bytes())
    if damage == "flipped":
        data[len(data) // 2] ^= 0x20
    else:
        data = data[: len(data) // 3]
    arrow.write_bytes(bytes(data))
    again = aug.augment_rows(rows, "classification", {}, settings(), model, tmp_path, seed=0).to_list()
    assert again == first
    assert f"augmented rows {folder} is damaged" in caplog.text and "building it again" in caplog.text
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]  # nothing left aside


def test_a_full_disk_is_said_before_augmenting(tiny_encoder_dir, tmp_path, monkeypatch):
    import shutil

    from distill import files
    from distill.errors import StageError

    real = shutil.disk_usage
    monkeypatch.setattr(files.shutil, "disk_usage", lambda p: real(p)._replace(free=1024))
    with pytest.raises(StageError, match=r"not enough disk space to write the augmented rows in .*augment\.cache_dir"):
        aug.augment_rows(classification_rows(), "classification", {}, settings(), str(tiny_encoder_dir), tmp_path, seed=0)
    assert not list(tmp_path.glob("*augment-*"))
    monkeypatch.undo()

    def no_space(*args, **kwargs):  # the disk fills up while the rows are written
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(aug.ArrowWriter, "write_batch", no_space)
    with pytest.raises(StageError, match=r"the disk holding .* filled up while writing the augmented rows"):
        aug.augment_rows(classification_rows(), "classification", {}, settings(), str(tiny_encoder_dir), tmp_path, seed=0)
    assert not list(tmp_path.glob("*augment-*"))
