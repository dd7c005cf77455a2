"""Build the evidence tasks from the UD Spanish COSER treebank (real spoken Spanish).

    python scripts/make_evidence_data.py [--conllu PATH] [--out runs/evidence-data]
                                         [--labelled 150] [--spans 4]

Deterministic: the same treebank and options give byte-identical files. Written under `--out`
(not committed; `scripts/evidence.py` runs this when the files are missing):

pos_coser/   UPOS tagging, CoNLL text (`word<TAB>tag`, blank line between sentences)
    train.conll, validation.conll, test.conll     the split below
    train_labelled.conll                           the first `--labelled` training sentences
    transfer.jsonl                                 the other training sentences, words only:
                                                   {"tokens": [...], "text": "..."} (no tags)
cls_proxy/   sentence-span classification, jsonl {"text", "label"}
    train.jsonl, validation.jsonl, test.jsonl
    train_labelled.jsonl                           spans of the first `--labelled` sentences
    transfer.jsonl                                 spans of the other training sentences: {"text"}
wic_pos/     the UPOS of one marked word in its sentence, jsonl {"text", "label"}
    train.jsonl, validation.jsonl, test.jsonl, train_labelled.jsonl, transfer.jsonl (as above)
manifest.json  counts, label distributions, trivial baselines, the source's sha256

Split (both tasks, by sentence position in the file, 0-based): index mod 10 in 0-6 -> train,
7 -> validation, 8-9 -> test (about 70/10/20 %). Sentences of one recording sit together in
the file, so the interleaving spreads every region over the three splits. A span never crosses
splits: all spans of a sentence stay in that sentence's split; a span text that recurs in a
later split (formulaic "¿Sí?", "No, no, no.") is kept only there (test before validation before
train), so no test text is trained on. POS keeps every sentence (3 short interjections recur).

POS tags are over syntactic words, the UD convention (contractions such as `del` appear as
`de el`; multiword-token range lines and empty nodes are skipped).

The classification proxy (`cls_proxy`): a contiguous span of a sentence's surface tokens
(4-24 tokens, or the whole sentence) is labelled with the tense of its *first finite verb*, from
the treebank's gold FEATS: `pasado` (Tense=Past or Imp: preterite, imperfect, past
subjunctive), `no_pasado` (any other finite verb: present, future, conditional, imperative) or
`sin_verbo` (no finite verb: fragments, infinitives, gerunds, participles). Why it is as hard as
real data: the label is gold linguistic annotation of real, disfluent, dialectal speech
("asín", "velo" for "verlo"); it needs the verb to be found among homographs (imperfect
"hacía", "comía" vs nouns "día", "tía", "policía"; "como" as verb or conjunction), the first
finite one of several to be picked, and the uncased MiniLM tokenizer strips accents, so
"llegó" (past) and "llego" (present) become the same tokens and only context (the subject,
the other verbs, the adverbs) tells them apart. Surface rules stay far from perfect (see the
`suffix_rule` baseline in the manifest).

The word-in-context proxy (`wic_pos`): per sentence, every occurrence (at most 4, seeded) of a
form whose tag varies in the training split (accent-stripped, lowercased: `que` SCONJ/PRON,
`la` DET/PRON, `si`/`sí` SCONJ/INTJ, `esta`/`está` DET/VERB; seen 5+ times, commonest tag on
at most 90 %) plus one other non-punctuation word, each as the sentence (12 tokens each side at
most) with the word between « », labelled with its gold UPOS; tags with fewer than 5 training
rows are dropped. It is POS disambiguation where it is hard: the word alone (its commonest
training tag, `word_majority` in the manifest) is right about two thirds of the time, context
decides the rest.

Source: Universal Dependencies, Spanish COSER treebank, CC BY-SA 4.0 (its LICENSE.txt).
Files derived from it carry the same licence.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_CONLLU = Path(__file__).resolve().parent.parent.parent / "shared/data/ud_es_coser/es_coser-ud-test.conllu"
DEFAULT_OUT = Path("runs/evidence-data")
PAST = ("Past", "Imp")
LABELS = ("pasado", "no_pasado", "sin_verbo")
MIN_SPAN, MAX_SPAN = 4, 24
# The split rule, by sentence index mod 10.
SPLIT_OF = {**{r: "train" for r in range(7)}, 7: "validation", 8: "test", 9: "test"}


@dataclass
class Word:
    """A syntactic word: its form, UPOS tag and morphological features."""

    form: str
    upos: str
    feats: dict[str, str]


@dataclass
class Token:
    """A surface token: one word, or a multiword token (`del` = `de` + `el`)."""

    form: str
    space_after: bool
    words: list[Word] = field(default_factory=list)


@dataclass
class Sentence:
    sent_id: str
    tokens: list[Token]

    @property
    def words(self) -> list[Word]:
        return [w for t in self.tokens for w in t.words]


def _feats(column: str) -> dict[str, str]:
    if column == "_":
        return {}
    return dict(item.split("=", 1) for item in column.split("|") if "=" in item)


def read_conllu(path: Path) -> list[Sentence]:
    """Sentences of a CoNLL-U file, with surface tokens and the syntactic words under them."""
    sentences: list[Sentence] = []
    tokens: list[Token] = []
    sent_id = ""
    pending: tuple[int, Token] | None = None  # a multiword token and the last word id it spans
    number = 0

    def close(number: int) -> None:
        nonlocal tokens, sent_id
        if tokens:
            if not sent_id:
                raise ValueError(f"{path}:{number}: sentence without a '# sent_id' comment")
            sentences.append(Sentence(sent_id, tokens))
        tokens, sent_id = [], ""

    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            line = line.rstrip("\n")
            if not line.strip():
                close(number)
                continue
            if line.startswith("#"):
                if line.startswith("# sent_id"):
                    sent_id = line.split("=", 1)[1].strip()
                continue
            cols = line.split("\t")
            if len(cols) != 10:
                raise ValueError(f"{path}:{number}: expected 10 tab-separated CoNLL-U columns, got {len(cols)}")
            ident, form, _, upos, _, feats, _, _, _, misc = cols
            if any(ch.isspace() for ch in form):
                raise ValueError(f"{path}:{number}: form {form!r} holds whitespace; CoNLL text cannot store it")
            space_after = "SpaceAfter=No" not in misc.split("|")
            if "." in ident:  # empty node (enhanced dependencies): not a word of the text
                continue
            if "-" in ident:
                last = int(ident.split("-")[1])
                pending = (last, Token(form, space_after))
                tokens.append(pending[1])
                continue
            word = Word(form, upos, _feats(feats))
            if pending is not None and int(ident) <= pending[0]:
                pending[1].words.append(word)
                if int(ident) == pending[0]:
                    pending = None
                continue
            tokens.append(Token(form, space_after, [word]))
    close(number + 1)
    if not sentences:
        raise ValueError(f"{path}: no sentences found")
    return sentences


def surface_text(tokens: list[Token]) -> str:
    """The tokens as running text, honouring SpaceAfter=No."""
    parts = []
    for i, tok in enumerate(tokens):
        parts.append(tok.form)
        if tok.space_after and i < len(tokens) - 1:
            parts.append(" ")
    return "".join(parts)


def tense_label(tokens: list[Token]) -> str:
    """`pasado` / `no_pasado` from the first finite verb's Tense, `sin_verbo` without one."""
    for tok in tokens:
        for word in tok.words:
            if word.feats.get("VerbForm") == "Fin":
                return "pasado" if word.feats.get("Tense") in PAST else "no_pasado"
    return "sin_verbo"


def spans(sentence: Sentence, index: int, per_sentence: int, seed: int) -> list[list[Token]]:
    """The whole sentence (when short enough) plus up to `per_sentence` random contiguous spans,
    deduplicated by text. Seeded by (seed, sentence index): adding sentences changes no other's."""
    toks = sentence.tokens
    n = len(toks)
    rng = random.Random(f"{seed}-{index}")
    out = [toks] if n <= MAX_SPAN else []
    if n >= MIN_SPAN + 2:
        for _ in range(min(per_sentence, max(1, n // 4))):
            length = rng.randint(MIN_SPAN, min(MAX_SPAN, n - 1))
            start = rng.randint(0, n - length)
            out.append(toks[start : start + length])
    seen, unique = set(), []
    for span in out:
        text = surface_text(span)
        if text not in seen:
            seen.add(text)
            unique.append(span)
    return unique


def _plain(text: str) -> str:
    return "".join(c for c in unicodedata.normalize("NFD", text.lower()) if unicodedata.category(c) != "Mn")


PAST_SUFFIXES = ("aba", "abas", "aban", "abamos", "ia", "ias", "ian", "iamos", "aron", "ieron", "io", "fue", "fueron")
FINITE_HINTS = ("es", "esta", "hay", "tiene", "son", "estan", "va", "voy", "dice", "digo", "se")


def suffix_rule(text: str) -> str:
    """A surface baseline: `pasado` when an accent-stripped word ends like a past form, else
    `no_pasado` when a very common present form occurs, else `sin_verbo`."""
    words = [_plain(w.strip("¿?¡!.,;:…\"'()")) for w in text.split()]
    if any(len(w) > 3 and w.endswith(PAST_SUFFIXES) or w in ("fue", "fueron", "era", "eran", "iba") for w in words):
        return "pasado"
    if any(w in FINITE_HINTS for w in words):
        return "no_pasado"
    return "sin_verbo"


def ambiguous_forms(sentences: list[Sentence], min_count: int = 5, max_share: float = 0.9) -> set[str]:
    """Accent-stripped lowercase forms whose UPOS varies: seen `min_count`+ times, the commonest
    tag on at most `max_share` of them (`que` SCONJ/PRON, `la` DET/PRON, `si`/`sí` SCONJ/INTJ)."""
    tags: dict[str, Counter] = {}
    for s in sentences:
        for t in s.tokens:
            if len(t.words) == 1:
                tags.setdefault(_plain(t.form), Counter())[t.words[0].upos] += 1
    return {f for f, c in tags.items() if sum(c.values()) >= min_count and c.most_common(1)[0][1] / sum(c.values()) <= max_share}


def marked_examples(sentence: Sentence, index: int, ambiguous: set[str], seed: int, window: int = 12) -> list[dict]:
    """`wic_pos` rows of one sentence: every occurrence of an ambiguous form (at most 4, drawn
    by a seeded choice) and one other word, each as the sentence (at most `window` tokens on
    each side) with the word between « », labelled with its UPOS."""
    rng = random.Random(f"{seed}-wic-{index}")
    single = [i for i, t in enumerate(sentence.tokens) if len(t.words) == 1 and t.words[0].upos != "PUNCT"]
    amb = [i for i in single if _plain(sentence.tokens[i].form) in ambiguous]
    other = [i for i in single if i not in amb]
    chosen = sorted(rng.sample(amb, min(4, len(amb))) + ([rng.choice(other)] if other else []))
    rows = []
    for i in chosen:
        lo, hi = max(0, i - window), min(len(sentence.tokens), i + window + 1)
        left = surface_text(sentence.tokens[lo:i])
        right = surface_text(sentence.tokens[i + 1 : hi])
        text = " ".join(x for x in (left, f"« {sentence.tokens[i].form} »", right) if x)
        rows.append({"text": text, "label": sentence.tokens[i].words[0].upos, "word": sentence.tokens[i].form})
    return rows


def _order(key: str) -> int:
    order = ("train", "train_labelled", "transfer", "validation", "test")
    return order.index(key) if key in order else len(order)


def write_conll(path: Path, sentences: list[Sentence]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for s in sentences:
            for w in s.words:
                f.write(f"{w.form}\t{w.upos}\n")
            f.write("\n")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def build(conllu: Path, out: Path, labelled: int = 150, per_sentence: int = 4, seed: int = 13) -> dict:
    """Write both tasks under `out` and return the manifest (also written as manifest.json)."""
    if not conllu.is_file():
        raise FileNotFoundError(f"treebank not found: {conllu} (pass --conllu PATH)")
    if labelled < 1:
        raise ValueError(f"--labelled must be >= 1, got {labelled}")
    sentences = read_conllu(conllu)
    split: dict[str, list[tuple[int, Sentence]]] = {"train": [], "validation": [], "test": []}
    for i, s in enumerate(sentences):
        split[SPLIT_OF[i % 10]].append((i, s))
    if labelled >= len(split["train"]):
        raise ValueError(
            f"--labelled {labelled} leaves no training sentence for the transfer set "
            f"(the training split has {len(split['train'])})"
        )

    pos, cls = out / "pos_coser", out / "cls_proxy"
    pos.mkdir(parents=True, exist_ok=True)
    cls.mkdir(parents=True, exist_ok=True)
    manifest: dict = {
        "source": str(conllu.name),
        "source_sha256": hashlib.sha256(conllu.read_bytes()).hexdigest(),
        "license": "CC BY-SA 4.0 (UD Spanish COSER)",
        "split_rule": "sentence index mod 10: 0-6 train, 7 validation, 8-9 test",
        "options": {"labelled": labelled, "spans_per_sentence": per_sentence, "seed": seed},
        "pos_coser": {},
        "cls_proxy": {},
    }

    for name, items in split.items():
        sents = [s for _, s in items]
        write_conll(pos / f"{name}.conll", sents)
        tags = Counter(w.upos for s in sents for w in s.words)
        manifest["pos_coser"][name] = {"sentences": len(sents), "words": sum(tags.values())}
        if name == "test":
            manifest["pos_coser"]["test_majority_tag"] = max(tags.values()) / sum(tags.values())
    train = [s for _, s in split["train"]]
    write_conll(pos / "train_labelled.conll", train[:labelled])
    write_jsonl(pos / "transfer.jsonl", [{"tokens": [w.form for w in s.words], "text": surface_text(s.tokens)} for s in train[labelled:]])
    manifest["pos_coser"]["train_labelled"] = {"sentences": labelled}
    manifest["pos_coser"]["transfer"] = {"sentences": len(train) - labelled}

    # Formulaic utterances ("¿Sí?", "No, no, no.") recur across sentences: a text that occurs in
    # test is dropped from validation and train, one in validation from train.
    taken: set[str] = set()
    dropped: dict[str, int] = {}
    for name in ("test", "validation", "train"):
        items = split[name]
        rows, labelled_rows, transfer_rows = [], [], []
        mine: set[str] = set()
        dropped[name] = 0
        for position, (i, s) in enumerate(items):
            for span in spans(s, i, per_sentence, seed):
                row = {"text": surface_text(span), "label": tense_label(span)}
                if row["text"] in taken:
                    dropped[name] += 1
                    continue
                mine.add(row["text"])
                rows.append(row)
                if name == "train":
                    (labelled_rows if position < labelled else transfer_rows).append(row)
        write_jsonl(cls / f"{name}.jsonl", rows)
        counts = Counter(r["label"] for r in rows)
        info = {"rows": len(rows), "labels": {k: counts[k] for k in LABELS}}
        if name == "test":
            info["majority"] = max(counts.values()) / len(rows)
            info["suffix_rule"] = sum(suffix_rule(r["text"]) == r["label"] for r in rows) / len(rows)
        manifest["cls_proxy"][name] = info
        if name == "train":
            write_jsonl(cls / "train_labelled.jsonl", labelled_rows)
            write_jsonl(cls / "transfer.jsonl", [{"text": r["text"]} for r in transfer_rows])
            manifest["cls_proxy"]["train_labelled"] = {"rows": len(labelled_rows)}
            manifest["cls_proxy"]["transfer"] = {"rows": len(transfer_rows)}
        taken |= mine
    manifest["cls_proxy"]["dropped_as_seen_in_a_later_split"] = dropped
    manifest["cls_proxy"] = {k: manifest["cls_proxy"][k] for k in sorted(manifest["cls_proxy"], key=_order)}
    # wic_pos: the UPOS of one marked word in its sentence; tags with < 5 training rows dropped
    wic = out / "wic_pos"
    wic.mkdir(parents=True, exist_ok=True)
    ambiguous = ambiguous_forms(train)
    rows_of = {name: [(pos_, r) for pos_, (i, s) in enumerate(items) for r in marked_examples(s, i, ambiguous, seed)]
               for name, items in split.items()}
    tag_counts = Counter(r["label"] for _, r in rows_of["train"])
    kept = {t for t, n in tag_counts.items() if n >= 5}
    by_word: dict[str, Counter] = {}
    for _, r in rows_of["train"]:
        by_word.setdefault(_plain(r["word"]), Counter())[r["label"]] += 1
    majority_tag = tag_counts.most_common(1)[0][0]
    manifest["wic_pos"] = {"ambiguous_forms": sorted(ambiguous), "labels": sorted(kept)}
    for name, pairs in rows_of.items():
        rows = [r for _, r in pairs if r["label"] in kept]
        write_jsonl(wic / f"{name}.jsonl", [{"text": r["text"], "label": r["label"]} for r in rows])
        info = {"rows": len(rows), "ambiguous": sum(_plain(r["word"]) in ambiguous for r in rows)}
        if name == "test":
            info["majority"] = sum(r["label"] == majority_tag for r in rows) / len(rows)
            # the word's commonest training tag: what a model that ignores context can reach
            lexical = [by_word.get(_plain(r["word"]), Counter({majority_tag: 1})).most_common(1)[0][0] for r in rows]
            info["word_majority"] = sum(p == r["label"] for p, r in zip(lexical, rows)) / len(rows)
            amb_rows = [(p, r) for p, r in zip(lexical, rows) if _plain(r["word"]) in ambiguous]
            info["word_majority_on_ambiguous"] = sum(p == r["label"] for p, r in amb_rows) / max(1, len(amb_rows))
        manifest["wic_pos"][name] = info
        if name == "train":
            write_jsonl(wic / "train_labelled.jsonl",
                        [{"text": r["text"], "label": r["label"]} for p_, r in pairs if r["label"] in kept and p_ < labelled])
            write_jsonl(wic / "transfer.jsonl", [{"text": r["text"]} for p_, r in pairs if p_ >= labelled])

    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--conllu", type=Path, default=DEFAULT_CONLLU, help="the UD COSER CoNLL-U file")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default runs/evidence-data)")
    p.add_argument("--labelled", type=int, default=150, help="training sentences kept labelled (the rest: transfer)")
    p.add_argument("--spans", type=int, default=4, help="random spans per sentence for cls_proxy (plus the whole)")
    p.add_argument("--seed", type=int, default=13)
    args = p.parse_args(argv)
    try:
        manifest = build(args.conllu, args.out, args.labelled, args.spans, args.seed)
    except (FileNotFoundError, ValueError) as err:
        print(f"make_evidence_data: {err}", file=sys.stderr)
        return 2
    print(json.dumps({k: manifest[k] for k in ("pos_coser", "cls_proxy", "wic_pos")}, indent=2, ensure_ascii=False))
    print(f"written under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
