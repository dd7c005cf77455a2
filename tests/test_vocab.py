"""Vocabulary trimming (distill/models/vocab.py) for WordPiece, Unigram and byte-level BPE
tokenizers built here from Spanish text, the packaged MiniLM, and multilingual-e5-small's
XLM-R tokenizer when it has been built (/work/models/me5-small, else skipped).

What is checked: a text whose pieces were all kept gets exactly the original pieces, ids mapped
through the old->new table, and so exactly the original logits; other text follows what the
module docstring claims for each tokenizer model; model and tokenizer save, load, run in
`transformers.pipeline` and export to ONNX.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForMaskedLM,
    PreTrainedTokenizerFast,
    RobertaConfig,
    pipeline,
)

from distill.models import vocab as V
from tests.conftest import SPANISH, minilm_path, train_bpe_tokenizer

ROOT = Path(__file__).parent.parent
DATA = ROOT / "distill" / "sample_data"
ME5 = Path(os.environ.get("DISTILL_ME5_SMALL", "/work/models/me5-small"))
UD_ES = Path("/work/shared/data/ud_es_coser/es_coser-ud-test.conllu")


def demo(split: str) -> list[str]:
    return [json.loads(line)["text"] for line in (DATA / "demo" / f"{split}.jsonl").read_text().splitlines()]


def spanish() -> list[str]:
    """The Spanish text that ships in the repo: reviews, QA questions and contexts, NER sentences."""
    texts = demo("train") + demo("validation") + demo("test") + list(SPANISH)
    for name in ("train.json", "validation.json"):
        for article in json.loads((DATA / "qa_es" / name).read_text())["data"]:
            for paragraph in article["paragraphs"]:
                texts.append(paragraph["context"])
                texts.extend(qa["question"] for qa in paragraph["qas"])
    for name in ("train.conll", "validation.conll"):
        for sentence in (DATA / "ner_es" / name).read_text().split("\n\n"):
            words = [line.split()[0] for line in sentence.splitlines() if line.strip()]
            if words:
                texts.append(" ".join(words))
    return texts


# --- tokenizers built here ------------------------------------------------------------------------


def wordpiece_tokenizer() -> PreTrainedTokenizerFast:
    """Cased WordPiece (accents kept), BERT's special tokens, trained on the repo's Spanish."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=False, strip_accents=False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(spanish(), trainers.WordPieceTrainer(vocab_size=600, special_tokens=specials))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_max_length=512,
    )


def unigram_tokenizer() -> PreTrainedTokenizerFast:
    """SentencePiece-style Unigram (Metaspace, XLM-R's special tokens), trained on the repo's Spanish."""
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    trainer = trainers.UnigramTrainer(vocab_size=500, special_tokens=specials, unk_token="<unk>")
    tok.train_from_iterator(spanish(), trainer)
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", bos), ("</s>", eos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", sep_token="</s>",
        cls_token="<s>", pad_token="<pad>", mask_token="<mask>", model_max_length=512,
    )


@pytest.fixture(scope="module")
def tokenizers_built(tmp_path_factory) -> dict[str, PreTrainedTokenizerFast]:
    return {
        "wordpiece": wordpiece_tokenizer(),
        "unigram": unigram_tokenizer(),
        "bpe": train_bpe_tokenizer(tmp_path_factory.mktemp("bpe")),
    }


def tiny_model(tok, kind: str) -> torch.nn.Module:
    """A 2-layer classifier over `tok`'s vocabulary: RoBERTa for BPE (positions count from its
    padding id), BERT otherwise."""
    torch.manual_seed(0)
    size = dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    if kind == "bpe":
        config = RobertaConfig(**size, max_position_embeddings=514, pad_token_id=tok.pad_token_id,
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    else:
        config = BertConfig(**size, pad_token_id=tok.pad_token_id)
    config.num_labels = 3
    return AutoModelForSequenceClassification.from_config(config).eval()


TRAIN = demo("train")[:400] + SPANISH[:4]


def pieces_of(tok, text) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def all_kept(tok, report, texts) -> list[str]:
    kept = set(report.old_ids)
    return [t for t in texts if set(pieces_of(tok, t)) <= kept]


@pytest.mark.parametrize("kind", ["wordpiece", "unigram", "bpe"])
def test_kept_text_gets_the_same_pieces_and_the_same_logits(tokenizers_built, kind, tmp_path):
    tok = tokenizers_built[kind]
    model = tiny_model(tok, kind)
    original = tiny_model(tok, kind)  # the same weights (same seed), left untrimmed
    model, new, report = V.trim_vocabulary(model, tok, TRAIN)
    assert report.pieces_before == len(tok) and report.pieces_after == len(new) == len(report.old_ids) < len(tok)
    assert report.parameters_after < report.parameters_before
    assert model.config.vocab_size == len(new) == model.get_input_embeddings().num_embeddings
    assert new.pad_token_id == tok.pad_token_id  # positions of RoBERTa-style models count from it

    held_out = all_kept(tok, report, spanish()[400:])
    assert len(held_out) > 20  # other text whose pieces were all kept
    old = report.old_ids
    for text in TRAIN + held_out:
        a, b = tok(text), new(text)
        assert [old[i] for i in b["input_ids"]] == a["input_ids"], text
        assert new.convert_ids_to_tokens(b["input_ids"]) == tok.convert_ids_to_tokens(a["input_ids"])
    pair = (TRAIN[0], held_out[0])
    assert [old[i] for i in new(*pair)["input_ids"]] == tok(*pair)["input_ids"]

    batch_old = tok(TRAIN[:8] + held_out[:8], padding=True, return_tensors="pt")
    batch_new = new(TRAIN[:8] + held_out[:8], padding=True, return_tensors="pt")
    assert torch.equal(torch.tensor(old)[batch_new["input_ids"]], batch_old["input_ids"])
    with torch.no_grad():
        assert torch.equal(model(**batch_new).logits, original(**batch_old).logits)

    # saved and loaded back: the same ids and the same predictions, in a pipeline too
    model.save_pretrained(tmp_path)
    new.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert len(again) == len(new) and again(held_out[:5])["input_ids"] == new(held_out[:5])["input_ids"]
    with torch.no_grad():
        assert torch.equal(loaded(**batch_new).logits, original(**batch_old).logits)
    classify = pipeline("text-classification", model=str(tmp_path), top_k=None)
    scores = {r["label"]: r["score"] for r in classify([held_out[0]])[0]}
    with torch.no_grad():
        expected = torch.softmax(original(**tok(held_out[0], return_tensors="pt")).logits[0], -1)
    assert scores == pytest.approx({f"LABEL_{i}": float(p) for i, p in enumerate(expected)}, abs=1e-6)


def test_min_count_and_keep(tokenizers_built):
    tok = tokenizers_built["wordpiece"]
    counts = V.piece_counts(tok, TRAIN)
    once = {i for i, c in counts.items() if c == 1}
    assert once
    unused = next(p for p, i in sorted(tok.get_vocab().items()) if i not in counts and len(p) > 3)
    model, new, report = V.trim_vocabulary(tiny_model(tok, "wordpiece"), tok, TRAIN, min_count=2, keep=[unused])
    kept = set(report.old_ids)
    assert not (once - set(tok.all_special_ids)) & kept and unused in new.get_vocab()
    assert {i for i, c in counts.items() if c >= 2} <= kept and set(tok.all_special_ids) <= kept
    assert report.min_count == 2 and report.from_text == len(counts)
    with pytest.raises(ValueError, match="does not have: \\['no-such-piece'\\]"):
        V.trim_vocabulary(tiny_model(tok, "wordpiece"), tok, TRAIN, keep=["no-such-piece"])


# --- what happens to other text ---------------------------------------------------------------------


def words_of(tok, text: str) -> list[str]:
    backend = tok.backend_tokenizer
    return [w for w, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(text))]


def greedy_wordpiece(word: str, vocab: set[str], unk: str = "[UNK]") -> list[str]:
    """WordPiece's longest-match-first over `vocab`; the whole word is unknown if it gets stuck."""
    pieces, start = [], 0
    while start < len(word):
        end = len(word)
        while end > start and (("##" if start else "") + word[start:end]) not in vocab:
            end -= 1
        if end == start:
            return [unk]
        pieces.append(("##" if start else "") + word[start:end])
        start = end
    return pieces


def test_wordpiece_spells_other_words_with_kept_pieces_or_makes_them_one_unknown(tokenizers_built):
    tok = tokenizers_built["wordpiece"]
    _, new, report = V.trim_vocabulary(tiny_model(tok, "wordpiece"), tok, demo("train")[:200])
    vocab = set(new.get_vocab())
    changed = unknown = 0
    for text in spanish()[1800:]:  # QA contexts and NER sentences: many words the reviews never use
        for word in words_of(tok, text):
            got = new.tokenize(word)
            assert got == greedy_wordpiece(word, vocab), word
            changed += got != tok.tokenize(word)
            unknown += got == ["[UNK]"]
    assert changed and unknown  # both happen on this text
    assert new.tokenize("Ωmega casa")[0] == "[UNK]" and len(new.tokenize("Ωmega")) == 1


def test_unigram_resegments_or_marks_uncovered_characters_unknown(tokenizers_built):
    tok = tokenizers_built["unigram"]
    _, new, report = V.trim_vocabulary(tiny_model(tok, "unigram"), tok, demo("train")[:200])
    vocab = new.get_vocab()
    singles = {p for p in vocab if len(p) == 1}
    resegmented = 0
    for text in spanish()[1800:]:
        for word in words_of(tok, text):
            ids = new(word, add_special_tokens=False)["input_ids"]
            pieces = new.convert_ids_to_tokens(ids)
            if all(ch in singles for ch in word.replace("▁", "")) and "▁" in vocab:
                # every character is a kept piece: spelled with kept pieces, nothing unknown
                assert new.unk_token_id not in ids and "".join(pieces) == word, word
                resegmented += pieces != tok.tokenize(word)
            if any(ch not in {c for p in vocab for c in p} for ch in word.replace("▁", "")):
                assert new.unk_token_id in ids, word  # a character no kept piece covers
    assert resegmented
    assert new.unk_token_id in new("Ωmega")["input_ids"]


def test_bpe_keeps_its_alphabet_so_nothing_becomes_unknown(tokenizers_built):
    tok = tokenizers_built["bpe"]
    _, new, report = V.trim_vocabulary(tiny_model(tok, "bpe"), tok, demo("train")[:200])
    assert report.pieces_after >= 256 + 5  # the byte alphabet and the special tokens
    vocab = new.get_vocab()
    merges = json.loads(new.backend_tokenizer.to_str())["model"]["merges"]
    assert all(a in vocab and b in vocab and a + b in vocab for a, b in merges)
    changed = 0
    for text in spanish()[1800:] + ["Ωmega ψ €5 — ¿sí?"]:
        ids = new(text, add_special_tokens=False)["input_ids"]
        assert new.unk_token_id not in ids
        assert new.decode(ids) == tok.decode(tok(text, add_special_tokens=False)["input_ids"])  # nothing lost
        changed += len(ids) != len(tok(text, add_special_tokens=False)["input_ids"])
    assert changed  # words whose merges were dropped are spelled with shorter pieces


def test_coverage_counts_unknown_pieces(tokenizers_built):
    tok = tokenizers_built["wordpiece"]
    _, new, _ = V.trim_vocabulary(tiny_model(tok, "wordpiece"), tok, demo("train")[:200])
    texts = ["casa", "Ωmega casa"]  # Ω is in no piece: the word is one unknown token
    n = 2 * len(tok.tokenize("casa")) + 1
    assert V.vocabulary_coverage(tok, texts) == {"tokens": n, "unknown": 1, "unknown_share": pytest.approx(1 / n)}
    after = V.vocabulary_coverage(new, spanish()[1800:])
    assert after["unknown"] > V.vocabulary_coverage(tok, spanish()[1800:])["unknown"]
    assert V.vocabulary_coverage(new, []) == {"tokens": 0, "unknown": 0, "unknown_share": 0.0}


def test_words_lists_count_as_tagging_tokenizes_them(tokenizers_built):
    tok = tokenizers_built["bpe"]  # byte-level BPE: a word alone is tokenized with a leading space
    sentence = ["Ana", "vive", "en", "Bruselas"]
    as_words = V.piece_counts(tok, [sentence])
    expected = tok(sentence, is_split_into_words=True, add_special_tokens=False)["input_ids"]
    assert sorted(as_words.elements()) == sorted(expected)
    assert as_words != V.piece_counts(tok, [" ".join(sentence)])  # "Ana" alone: no leading space


def test_read_corpus(tmp_path):
    (tmp_path / "a.txt").write_text("Hola mundo.\n\nAdiós.\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "Una reseña", "label": "pos", "n": 3, "tokens": ["Ana", "vive"]}) + "\n")
    assert V.read_corpus([tmp_path / "a.txt", tmp_path / "b.jsonl"]) == ["Hola mundo.", "Adiós.", "Una reseña", "pos", ["Ana", "vive"]]


# --- real tokenizers, a tied output layer, ONNX ---------------------------------------------------------


def test_packaged_minilm_wordpiece():
    tok = AutoTokenizer.from_pretrained(minilm_path())
    ids = V.kept_ids(tok, V.piece_counts(tok, TRAIN))
    new = V.trim_tokenizer(tok, ids)
    assert type(new) is type(tok) and len(new) == len(ids) < 2000
    held_out = [t for t in spanish() if set(pieces_of(tok, t)) <= set(ids)]
    assert len(held_out) > len(TRAIN)
    for text in held_out:
        assert [ids[i] for i in new(text)["input_ids"]] == tok(text)["input_ids"]


@pytest.mark.skipif(not (ME5 / "tokenizer.json").exists(), reason="multilingual-e5-small not built (see /work/shared/models)")
def test_xlmr_unigram_on_real_spanish():
    tok = AutoTokenizer.from_pretrained(ME5)
    texts = spanish()
    if UD_ES.exists():  # a Spanish treebank's sentences, when the shared data is there
        texts += [l[len("# text = "):] for l in UD_ES.read_text().splitlines() if l.startswith("# text = ")]
    train, rest = texts[::2], texts[1::2]
    ids = V.kept_ids(tok, V.piece_counts(tok, train))
    new = V.trim_tokenizer(tok, ids)
    assert type(new) is type(tok) and len(new) == len(ids) < 20_000
    assert new.pad_token_id == tok.pad_token_id == 1
    kept = set(ids)
    checked = 0
    for text in train + rest:
        a = tok(text)["input_ids"]
        if set(a) <= kept:
            assert [ids[i] for i in new(text)["input_ids"]] == a, text
            checked += 1
    assert checked > len(train)


def test_tied_output_layer_follows(tokenizers_built, tmp_path):
    tok = tokenizers_built["wordpiece"]
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    model = BertForMaskedLM(config).eval()
    with torch.no_grad():
        model.cls.predictions.bias.normal_()  # a bias that differs per piece
    before = model(**tok(TRAIN[:2], padding=True, return_tensors="pt")).logits
    model, new, report = V.trim_vocabulary(model, tok, TRAIN)
    out = model.get_output_embeddings()
    assert out.weight is model.get_input_embeddings().weight and out.out_features == len(new)
    assert model.cls.predictions.bias is out.bias
    after = model(**new(TRAIN[:2], padding=True, return_tensors="pt")).logits
    assert torch.equal(after, before[..., report.old_ids])
    model.save_pretrained(tmp_path)
    loaded = BertForMaskedLM.from_pretrained(tmp_path).eval()
    assert torch.equal(loaded(**new(TRAIN[:2], padding=True, return_tensors="pt")).logits, after)


def test_trimmed_model_exports_to_onnx(tokenizers_built, tmp_path):
    import numpy as np
    import onnxruntime as ort

    from distill.ship.onnx import export_onnx

    tok = tokenizers_built["unigram"]
    model, new, _ = V.trim_vocabulary(tiny_model(tok, "unigram"), tok, TRAIN)
    batch = new(TRAIN[:3], padding=True, return_tensors="pt")
    names = list(batch.keys())
    export_onnx(model, names, tmp_path / "model.onnx")
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {k: batch[k].numpy() for k in names})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, model(**batch).logits.numpy(), atol=1e-5)


def test_the_padding_id_stays_only_where_positions_count_from_it(tokenizers_built):
    roberta, bert = tiny_model(tokenizers_built["bpe"], "bpe"), tiny_model(tokenizers_built["wordpiece"], "wordpiece")
    assert V.positions_from_padding(roberta) and not V.positions_from_padding(bert)
    # a BERT tokenizer whose padding token comes after the pieces (ModernBERT's is id 50283):
    # the trim moves it, and padded batches still give the original logits
    tok = wordpiece_tokenizer()
    tok.pad_token = None
    tok.add_special_tokens({"pad_token": "[PAD2]"})
    assert tok.pad_token_id == 600
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, pad_token_id=tok.pad_token_id)
    original = AutoModelForSequenceClassification.from_config(config).eval()
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config).eval()
    model, new, report = V.trim_vocabulary(model, tok, TRAIN)
    assert new.pad_token_id == len(new) - 1 < 300 and model.config.pad_token_id == new.pad_token_id
    with torch.no_grad():
        ours = model(**new(TRAIN[:6], padding=True, return_tensors="pt")).logits
        theirs = original(**tok(TRAIN[:6], padding=True, return_tensors="pt")).logits
    assert torch.equal(ours, theirs)
