"""Augmented copies of training rows: TinyBERT-style whole-word replacement, cached on disk.

Each copy of a row replaces every replaceable word, with probability `augment.p`, by one of
`augment.top_k` candidates drawn uniformly:

- `embedding`: the candidates are the word's nearest neighbours (cosine) in a model's
  input-embedding space (default: the teacher's), among the vocabulary's whole-word tokens.
  Only words that are a single token have an embedding of their own; words the tokenizer
  splits into pieces are left unchanged, because the mean of their pieces' embeddings is
  dominated by the first piece (MiniLM: "perro" = per + ##ro -> per, pe, pre, pro, ...).
- `mlm`: the word, however many pieces it has, is replaced by one mask token in the original
  row, and a masked LM's best whole-word tokens at that position are the candidates. As in
  TinyBERT, each word is masked on its own (one word at a time), the candidates are computed
  once per row from the unchanged row, and all copies draw from them; the masked rows of many
  words and rows go through the model together in batches.

Both methods skip special tokens, continuation pieces (##xx), tokens that are not letters
(punctuation, digits), words under 3 letters, `augment.keep_words` and the word itself
(compared casefolded and without accents). A candidate from an uncased vocabulary takes the
original word's casing (Madrid -> Barcelona). Replaceable words are runs of 3+ letters: digits,
punctuation, hyphenated words and short function words (de, el, la, en, of, to) stay.

What each family keeps aligned: classification augments the text and the text pair; tagging
replaces one token by one token, so the word count (and the teacher's word-level targets) never
changes; QA augments the question and the context outside every answer span, answers keep their
text and `answer_start` moves by the length changes before it.

Determinism: the random draws of row i come from their own generator seeded by (seed, i), and
the model's scores are computed per word with fixed padding and rounded before ranking (ties
go to the lower token id), so the same seed gives the same rows for any batch size.

Cache: `<cache_dir>/augment-<key>/` holds `data.arrow` (memory-mapped when read) and
`metadata.json`. The key hashes the settings that change rows (method, copies, p, top_k, seed,
max_length, keep_words), the model's weights fingerprint and tokenizer, the task family, the
column roles and the content of the input rows; batch size and cache folder are not part of it.
Rows are written batch by batch (never a list of all rows in memory) into a temporary folder
renamed when complete, so an interrupted build is never read; the disk is checked first, and
the folder carries its files' checksums, verified on every reuse (a damaged set is rebuilt).

The two candidate sources (embedding, masked LM) share the word plan, the splice and the cache
key that makes copies deterministic.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
import time
import unicodedata
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
from datasets import Dataset, Features, Value
from datasets.arrow_writer import ArrowWriter

from distill.errors import DataError, ModelLoadError
from distill.files import check_free_space, full_disk_error, reusable, write_checksums
from distill.data.rows import locate_answer, task_columns, word_spans

log = logging.getLogger("distill")

AUGMENT_VERSION = 1
SOURCE_INDEX = "source_index"  # the input row an augmented row was made from
MIN_WORD_CHARS = 3  # shorter words are mostly function words (de, el, of, to): replacing them breaks grammar
SCORE_DECIMALS = {"embedding": 9, "mlm": 5}  # rounding before ranking: batch-size independence
PAD_MULTIPLE = 16  # masked rows are padded to a multiple of this, whatever their batch
SPACE_FACTOR = 2.0  # free space asked for, as a multiple of the copies' estimated size


def is_replaceable(word: str) -> bool:
    """A word augmentation may replace: 3+ characters, all letters (or combining marks)."""
    return len(word) >= MIN_WORD_CHARS and all(unicodedata.category(c)[0] in "LM" for c in word)


def fold(word: str) -> str:
    """Casefolded, accents removed: 'Canción' and 'cancion' are the same word here."""
    decomposed = unicodedata.normalize("NFD", word.casefold())
    return "".join(c for c in decomposed if unicodedata.category(c) != "Mn")


def match_case(candidate: str, original: str) -> str:
    """A lowercase candidate takes the original's casing (MADRID, Madrid); a cased one stays."""
    if candidate != candidate.lower():
        return candidate
    if len(original) > 1 and original.isupper():
        return candidate.upper()
    if original[:1].isupper():
        return candidate[:1].upper() + candidate[1:]
    return candidate


# ---------------------------------------------------------------------------------------------
# Rows as fields of words
# ---------------------------------------------------------------------------------------------


@dataclass
class TextField:
    """One text of a row with its words; `eligible` are the indices of replaceable words."""

    text: str
    spans: list[tuple[int, int]]
    eligible: list[int] = field(default_factory=list)


def _eligible(
    text: str, spans: list[tuple[int, int]], keep: set[str], frozen: Sequence[tuple[int, int]] = ()
) -> list[int]:
    out = []
    for i, (s, e) in enumerate(spans):
        word = text[s:e]
        if not is_replaceable(word) or fold(word) in keep:
            continue
        if any(s < fe and e > fs for fs, fe in frozen):  # touches an answer: keep it
            continue
        out.append(i)
    return out


def _text_field(text: Any, keep: set[str], frozen: Sequence[tuple[int, int]] = ()) -> TextField:
    text = "" if text is None else str(text)
    spans = word_spans(text)
    return TextField(text, spans, _eligible(text, spans, keep, frozen))


def _answer_spans(context: str, answers: Mapping[str, Any]) -> list[tuple[int, int] | None]:
    """Character span of each answer in the context (the nearest occurrence when answer_start
    does not point at the text; None when the text is not in the context)."""

    out = []
    for text, start in zip(answers.get("text", []), answers.get("answer_start", [])):
        found = locate_answer(context, text, int(start))
        out.append(None if found is None else (found, found + len(text)))
    return out


def row_fields(family: str, cols: Mapping[str, str], row: Mapping[str, Any], keep: set[str]) -> list[TextField]:
    """The augmentable texts of a raw row, in a fixed order."""
    if family == "classification":
        names = ["text", "text_pair"] if "text_pair" in cols else ["text"]
        return [_text_field(row[cols[n]], keep) for n in names]
    if family == "tagging":
        tokens = [str(t) for t in row[cols["tokens"]]]
        spans, at = [], 0
        for t in tokens:
            spans.append((at, at + len(t)))
            at += len(t) + 1
        text = " ".join(tokens)
        # a token is one word here (its own split is irrelevant): it is replaced whole or kept
        eligible = [i for i, t in enumerate(tokens) if is_replaceable(t) and fold(t) not in keep]
        return [TextField(text, spans, eligible)]
    context = str(row[cols["context"]] or "")
    frozen = [s for s in _answer_spans(context, row[cols["answers"]]) if s is not None]
    # answers whose text is not in the context: freeze the span answer_start points at
    answers = row[cols["answers"]]
    for text, start in zip(answers.get("text", []), answers.get("answer_start", [])):
        frozen.append((int(start), int(start) + len(text)))
    return [_text_field(row[cols["question"]], keep), _text_field(context, keep, frozen)]


def splice(f: TextField, replacements: Mapping[int, str]) -> tuple[str, list[tuple[int, int]]]:
    """The field's text with words replaced, and (old position, length change) of each
    replacement in order, to move character offsets that follow them."""
    pieces, at, shifts = [], 0, []
    for i in sorted(replacements):
        s, e = f.spans[i]
        pieces.append(f.text[at:s])
        pieces.append(replacements[i])
        shifts.append((e, len(replacements[i]) - (e - s)))
        at = e
    pieces.append(f.text[at:])
    return "".join(pieces), shifts


def moved(position: int, shifts: Sequence[tuple[int, int]]) -> int:
    """A character offset after the replacements that end at or before it."""
    return position + sum(delta for end, delta in shifts if end <= position)


def build_copy(
    family: str,
    cols: Mapping[str, str],
    row: Mapping[str, Any],
    fields: list[TextField],
    replacements: dict[tuple[int, int], str],
) -> dict[str, Any]:
    """The augmented row: the original row with the chosen words replaced."""
    out = dict(row)
    per_field: list[dict[int, str]] = [{} for _ in fields]
    for (fi, wi), word in replacements.items():
        per_field[fi][wi] = word
    if family == "classification":
        names = ["text", "text_pair"] if "text_pair" in cols else ["text"]
        for fi, name in enumerate(names):
            out[cols[name]] = splice(fields[fi], per_field[fi])[0]
    elif family == "tagging":
        tokens = [str(t) for t in row[cols["tokens"]]]
        for wi, word in per_field[0].items():
            tokens[wi] = word
        out[cols["tokens"]] = tokens
    else:
        out[cols["question"]] = splice(fields[0], per_field[0])[0]
        context, shifts = splice(fields[1], per_field[1])
        out[cols["context"]] = context
        answers = row[cols["answers"]]
        located = _answer_spans(fields[1].text, answers)
        starts = []
        for span, given in zip(located, answers.get("answer_start", [])):
            starts.append(moved(span[0] if span else int(given), shifts))
        out[cols["answers"]] = {"text": list(answers.get("text", [])), "answer_start": starts}
    return out


# ---------------------------------------------------------------------------------------------
# Candidate words
# ---------------------------------------------------------------------------------------------


class WordVocabulary:
    """The tokens of a tokenizer that are whole words by themselves: not special, letters
    only (3+), and exactly what the tokenizer gives for that word after a space (which rules
    out continuation pieces such as ##ro, and byte or sentencepiece fragments)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        size = len(tokenizer)
        decoded = tokenizer.batch_decode([[i] for i in range(size)])
        special = set(tokenizer.all_special_ids)
        pool = [i for i in range(size) if i not in special and is_replaceable(decoded[i].strip())]
        texts = [" " + decoded[i].strip() for i in pool]
        encoded = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        ids = [i for i, enc in zip(pool, encoded) if enc == [i]]
        self.ids = np.asarray(ids, dtype=np.int64)  # [words]
        self.words = [decoded[i].strip() for i in ids]
        self.folded = [fold(w) for w in self.words]
        self.position = {int(i): p for p, i in enumerate(ids)}
        if not ids:
            raise DataError(
                f"the tokenizer {type(tokenizer).__name__} has no whole-word tokens of letters: "
                "augmentation has no candidate words"
            )

    def positions(self, words: Sequence[str]) -> list[Optional[int]]:
        """Each word's position in the vocabulary when the tokenizer keeps it as one such token."""
        if not words:
            return []
        encoded = self.tokenizer([" " + w for w in words], add_special_tokens=False)["input_ids"]
        return [self.position.get(enc[0]) if len(enc) == 1 else None for enc in encoded]


def top_candidates(scores: np.ndarray, vocab: WordVocabulary, k: int, word: str, own: Optional[int]) -> list[str]:
    """The k best-scoring vocabulary words ([words] scores, already rounded), best first, ties
    to the lower token id, without the word itself."""
    target = fold(word)
    m = min(len(scores), k + 16)
    while True:
        part = np.argpartition(-scores, m - 1)[:m]
        pool = np.flatnonzero(scores >= scores[part].min())  # ties at the threshold included
        order = pool[np.lexsort((vocab.ids[pool], -scores[pool]))]
        out = [vocab.words[p] for p in order if p != own and vocab.folded[p] != target][:k]
        if len(out) >= k or m >= len(scores):
            return out
        m = min(len(scores), m * 4)


class EmbeddingNeighbours:
    """Nearest whole-word tokens in an input-embedding space (cosine, float64), memoised."""

    method = "embedding"

    def __init__(self, tokenizer: Any, embeddings: torch.Tensor, top_k: int, vocab: WordVocabulary):
        self.vocab, self.top_k = vocab, top_k
        table = embeddings.detach().double().cpu()[torch.as_tensor(vocab.ids)]  # [words, hidden]
        self.table = torch.nn.functional.normalize(table, dim=-1).numpy()  # [words, hidden]
        self.memo: dict[str, list[str]] = {}

    def propose(self, words: Sequence[str]) -> dict[str, list[str]]:
        todo = sorted({w for w in words if w not in self.memo})
        positions = self.vocab.positions(todo)
        single = [(w, p) for w, p in zip(todo, positions) if p is not None]
        for w, p in zip(todo, positions):
            if p is None:
                self.memo[w] = []  # several tokens: left unchanged (see the module docstring)
        for start in range(0, len(single), 256):
            chunk = single[start : start + 256]
            query = self.table[[p for _, p in chunk]]  # [chunk, hidden]
            sims = np.round(self.table @ query.T, SCORE_DECIMALS["embedding"])  # [words, chunk]
            for j, (w, p) in enumerate(chunk):
                self.memo[w] = top_candidates(sims[:, j], self.vocab, self.top_k, w, p)
        out = {w: self.memo[w] for w in words}
        if len(self.memo) > 1_000_000:
            self.memo.clear()
        return out


class MaskedLMCandidates:
    """A masked LM's best whole-word tokens for one masked word in its row."""

    method = "mlm"

    def __init__(self, model: Any, tokenizer: Any, vocab: WordVocabulary, top_k: int, max_length: int, batch_size: int):
        self.model, self.tokenizer, self.vocab = model, tokenizer, vocab
        self.top_k, self.batch_size = top_k, batch_size
        self.max_length = min(max_length, int(getattr(tokenizer, "model_max_length", max_length) or max_length))
        if tokenizer.mask_token_id is None:
            raise ModelLoadError(f"the tokenizer {type(tokenizer).__name__} has no mask token: method=mlm needs one")
        self.device = next(model.parameters()).device
        # Only the masked position needs vocabulary logits: run the encoder, then the MLM head
        # on that position alone (a [batch, seq, vocab] tensor would dominate memory).
        heads = [m for name, m in model.named_children() if name != model.base_model_prefix]
        self.head = heads[0] if len(heads) == 1 else None
        self.vocab_index = torch.as_tensor(vocab.ids, device=self.device)

    def _inputs(self, text: str, start: int, end: int) -> tuple[list[int], int] | None:
        tok = self.tokenizer
        masked = text[:start] + tok.mask_token + text[end:]
        enc = tok(masked, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        if tok.mask_token_id not in ids:
            return None
        room = self.max_length - tok.num_special_tokens_to_add(pair=False)
        if len(ids) > room:  # a long text (a QA context): the characters of a window around the mask
            at = ids.index(tok.mask_token_id)
            left = max(0, min(at - room // 2, len(ids) - room))
            masked = masked[offsets[left][0] : offsets[left + room - 1][1]]
        full = tok(masked, truncation=True, max_length=self.max_length)["input_ids"]
        return (full, full.index(tok.mask_token_id)) if tok.mask_token_id in full else None

    @torch.inference_mode()
    def _logits(self, batch: list[tuple[list[int], int]]) -> np.ndarray:
        """Vocabulary-word logits at each row's mask ([rows, words]); rows share one padded length."""
        length = -(-max(len(ids) for ids, _ in batch) // PAD_MULTIPLE) * PAD_MULTIPLE
        pad = self.tokenizer.pad_token_id or 0
        input_ids = torch.full((len(batch), length), pad, dtype=torch.long)  # [rows, seq]
        attention = torch.zeros((len(batch), length), dtype=torch.long)  # [rows, seq]
        for r, (ids, _) in enumerate(batch):
            input_ids[r, : len(ids)] = torch.tensor(ids)
            attention[r, : len(ids)] = 1
        at = torch.tensor([pos for _, pos in batch], device=self.device)  # [rows]
        rows = torch.arange(len(batch), device=self.device)
        input_ids, attention = input_ids.to(self.device), attention.to(self.device)
        if self.head is not None:
            hidden = self.model.base_model(input_ids=input_ids, attention_mask=attention)[0]  # [rows, seq, hidden]
            logits = self.head(hidden[rows, at].unsqueeze(1))[:, 0]  # [rows, vocab]
        else:
            logits = self.model(input_ids=input_ids, attention_mask=attention).logits[rows, at]  # [rows, vocab]
        return logits.float().index_select(1, self.vocab_index).double().cpu().numpy()  # [rows, words]

    def propose(self, queries: Sequence[tuple[str, int, int]]) -> list[list[str]]:
        """Candidates for each (text, word start, word end)."""
        prepared = [self._inputs(*q) for q in queries]
        results: list[list[str]] = [[] for _ in queries]
        # rows of one padded length together, so a row's padding never depends on its batch
        buckets: dict[int, list[int]] = {}
        for i, item in enumerate(prepared):
            if item is not None:
                buckets.setdefault(-(-len(item[0]) // PAD_MULTIPLE), []).append(i)
        for _, members in sorted(buckets.items()):
            for start in range(0, len(members), self.batch_size):
                chunk = members[start : start + self.batch_size]
                scores = np.round(self._logits([prepared[i] for i in chunk]), SCORE_DECIMALS["mlm"])
                for row, i in enumerate(chunk):
                    text, s, e = queries[i]
                    word = text[s:e]
                    own = self.vocab.positions([word])[0]
                    results[i] = top_candidates(scores[row], self.vocab, self.top_k, word, own)
        return results


def load_model(method: str, model_name: str) -> Any:
    """The model that proposes words: an encoder (embedding), or a masked LM with its trained head
    (mlm; ModelLoadError without one). Also the preflight check of `augment.model`."""
    from transformers import AutoModel, AutoModelForMaskedLM

    from distill import models

    source, _ = models.resolve(model_name)
    try:
        if method == "embedding":
            return AutoModel.from_pretrained(source)
        model, info = AutoModelForMaskedLM.from_pretrained(source, output_loading_info=True)
    except Exception as err:
        raise ModelLoadError(
            f"augment: cannot load model '{model_name}' (from '{source}'): {type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}"
        ) from None
    missing = sorted(info.get("missing_keys", []))
    if missing:
        raise ModelLoadError(
            f"augment.model='{model_name}' has no trained masked-LM head (missing weights: "
            f"{missing[:4]}{' ...' if len(missing) > 4 else ''}); method=mlm needs a pretrained "
            "MLM checkpoint such as dccuchile/bert-base-spanish-wwm-cased, or use method=embedding"
        )
    return model


def load_candidates(settings: Any, model_name: str) -> tuple[Any, str]:
    """The candidate source of `settings.method` over `model_name`, and a fingerprint of what
    it depends on (weights and tokenizer) for the cache key."""
    from distill import models

    tokenizer = models.load_tokenizer(model_name)
    vocab = WordVocabulary(tokenizer)
    model = load_model(settings.method, model_name)
    digest = models.tokenizer_digest(tokenizer)
    if settings.method == "embedding":
        embeddings = model.get_input_embeddings()
        found = EmbeddingNeighbours(tokenizer, embeddings.weight, settings.top_k, vocab)
        return found, f"{models.fingerprint(embeddings)}-{digest}"
    model.eval()
    if torch.cuda.is_available():
        model.to("cuda")
    found = MaskedLMCandidates(model, tokenizer, vocab, settings.top_k, settings.max_length, settings.batch_size)
    return found, f"{models.fingerprint(model)}-{digest}"


# ---------------------------------------------------------------------------------------------
# Generating copies
# ---------------------------------------------------------------------------------------------


def plan_copies(
    fields: list[TextField], copies: int, p: float, rng: random.Random
) -> list[dict[tuple[int, int], float]]:
    """For each copy, the words to replace -> a uniform draw that picks the candidate. Two draws
    per eligible word and copy, whatever the candidates turn out to be: the stream of row i
    depends on its text and the seed only."""
    plans = []
    for _ in range(copies):
        chosen = {}
        for fi, f in enumerate(fields):
            for wi in f.eligible:
                u, v = rng.random(), rng.random()
                if u < p:
                    chosen[(fi, wi)] = v
        plans.append(chosen)
    return plans


def _augment_batch(
    batch: dict[str, list],
    offset: int,
    family: str,
    cols: Mapping[str, str],
    settings: Any,
    seed: int,
    keep: set[str],
    candidates: Any,
) -> dict[str, list]:
    """The augmented copies of one batch of rows (rows `offset`, `offset + 1`, ...), as columns."""
    names = list(batch)
    rows = [{n: batch[n][j] for n in names} for j in range(len(batch[names[0]]))]
    fields = [row_fields(family, cols, row, keep) for row in rows]
    plans = [plan_copies(f, settings.copies, settings.p, random.Random(f"augment:{seed}:{offset + j}")) for j, f in enumerate(fields)]
    wanted = sorted({(j, fi, wi) for j, plan in enumerate(plans) for chosen in plan for (fi, wi) in chosen})
    if candidates.method == "embedding":
        def word(j: int, fi: int, wi: int) -> str:
            s, e = fields[j][fi].spans[wi]
            return fields[j][fi].text[s:e]

        found = candidates.propose([word(*q) for q in wanted])
        options = {q: found[word(*q)] for q in wanted}
    else:
        queries = [(fields[j][fi].text, *fields[j][fi].spans[wi]) for j, fi, wi in wanted]
        options = dict(zip(wanted, candidates.propose(queries)))

    out: dict[str, list] = {n: [] for n in (*names, SOURCE_INDEX)}
    id_col = cols.get("id") if family == "qa" else None
    for j, (row, plan) in enumerate(zip(rows, plans)):
        made = {tuple(f.text for f in fields[j])}
        for c, chosen in enumerate(plan):
            replacements = {}
            for (fi, wi), draw in chosen.items():
                options_here = options[(j, fi, wi)]
                if options_here:
                    s, e = fields[j][fi].spans[wi]
                    original = fields[j][fi].text[s:e]
                    pick = options_here[int(draw * len(options_here))]
                    replacements[(fi, wi)] = match_case(pick, original)
            if not replacements:
                continue
            new = build_copy(family, cols, row, fields[j], replacements)
            signature = tuple(f.text for f in row_fields(family, cols, new, set()))
            if signature in made:  # no change, or the same as an earlier copy of this row
                continue
            made.add(signature)
            if id_col and id_col in new and isinstance(new[id_col], str):
                new[id_col] = f"{new[id_col]}-aug{c}"
            for n in names:
                out[n].append(new[n])
            out[SOURCE_INDEX].append(offset + j)
    return out


def _rows_digest(rows: Dataset, batch_size: int = 10_000) -> str:
    """A hash of the rows' content (their columns, in order)."""
    h = hashlib.sha256(json.dumps(sorted(rows.column_names)).encode())
    for batch in rows.iter(batch_size=batch_size):
        h.update(json.dumps(batch, sort_keys=True, ensure_ascii=False, default=str).encode())
    return h.hexdigest()


def cache_key(
    settings: Any, family: str, cols: Mapping[str, str], model_fingerprint: str, rows_digest: str, seed: int
) -> str:
    """The name of a set of augmented rows: everything that changes them, nothing that does not."""
    parts = {
        "version": AUGMENT_VERSION,
        "method": settings.method,
        "copies": settings.copies,
        "p": settings.p,
        "top_k": settings.top_k,
        "seed": seed,
        "max_length": settings.max_length if settings.method == "mlm" else None,
        "keep_words": sorted({fold(w) for w in settings.keep_words}),
        "family": family,
        "columns": dict(sorted(cols.items())),
        "model": model_fingerprint,
        "rows": rows_digest,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def augment_rows(
    rows: Dataset, family: str, columns: Mapping[str, str], settings: Any, model: str, cache_dir: str | Path, seed: int,
) -> Dataset:
    """`settings.copies` augmented copies of each row of `rows` (fewer when a row has nothing
    to replace or a copy repeats another), with the input row's index in `source_index`.

    rows: raw rows with the task's columns; columns: the task's `data.columns`; settings: the
    `augment` section; model: Hub id / path whose vocabulary proposes words (an MLM for
    method=mlm). Built once per key under `cache_dir` and memory-mapped from there.
    """
    from datasets.utils import are_progress_bars_disabled
    from tqdm.auto import tqdm

    cols = task_columns(family, columns)
    cols = {role: c for role, c in cols.items() if c in rows.column_names}
    candidates, model_fp = load_candidates(settings, model)
    key = cache_key(settings, family, cols, model_fp, _rows_digest(rows), seed)
    cache_dir = Path(cache_dir)
    final = cache_dir / f"augment-{key}"
    if reusable(final, "metadata.json", "augmented rows"):
        log.info("augmented rows: reusing %s", final)
        return Dataset.from_file(str(final / "data.arrow"))

    features = Features({**rows.features, SOURCE_INDEX: Value("int64")})
    advice = "Point augment.cache_dir at a larger disk or free some space, then re-run the same command."
    # copies of the rows, plus a margin: an estimate is all there is before the words are drawn
    check_free_space(cache_dir, int(rows.data.nbytes * max(1, settings.copies) * SPACE_FACTOR),
                     "the augmented rows", advice=advice)
    tmp = cache_dir / f".augment-{key}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir(parents=True)
    keep = {fold(w) for w in settings.keep_words}
    began, written = time.time(), 0
    try:
        writer = ArrowWriter(features=features, path=str(tmp / "data.arrow"))
        with tqdm(
            total=len(rows), unit="row", desc=f"augmenting ({settings.method}, {settings.copies} copies)",
            disable=are_progress_bars_disabled(),
        ) as bar:
            offsets = range(0, len(rows), settings.batch_size)
            for offset, batch in zip(offsets, rows.iter(batch_size=settings.batch_size)):
                out = _augment_batch(batch, offset, family, cols, settings, seed, keep, candidates)
                if out[SOURCE_INDEX]:
                    writer.write_batch(out)
                    written += len(out[SOURCE_INDEX])
                bar.update(len(next(iter(batch.values()))))
        writer.finalize()
        writer.close()
        meta = {"key": key, "rows": written, "inputs": len(rows), "method": settings.method, "copies": settings.copies,
                "p": settings.p, "top_k": settings.top_k, "seed": seed, "model": model, "model_fingerprint": model_fp,
                "seconds": round(time.time() - began, 1)}
        (tmp / "metadata.json").write_text(json.dumps(meta, indent=2))
        write_checksums(tmp)  # verified whenever the rows are reused
        try:
            tmp.rename(final)
        except OSError:  # another process finished the same key first: use theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise full_disk_error(err, cache_dir, "the augmented rows", advice) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info(
        "augmented rows: %d from %d rows in %.0fs (%s), cached in %s",
        written, len(rows), time.time() - began, settings.method, final,
    )
    return Dataset.from_file(str(final / "data.arrow"))
