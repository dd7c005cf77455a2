"""Trimming a model's vocabulary to the pieces a task's text uses.

A multilingual encoder spends most of its parameters on word embeddings (multilingual-e5-small:
96M of 117.5M, for 250k pieces in a hundred languages), most of which a Spanish task never
reads. `trim_vocabulary` keeps the special tokens and the pieces the given texts use (at least
`min_count` times; plus any named in `keep`), and rebuilds to match the embedding matrix (and a
tied output layer), `config.vocab_size`, the config's token ids and the fast tokenizer: the
model of its tokenizer.json is edited (WordPiece and WordLevel vocab, Unigram pieces with their
scores, BPE vocab and the merges among kept pieces), and every id the file names is renumbered.

What the trimmed tokenizer does:
- A text whose pieces were all kept gets exactly the original pieces, their ids mapped through
  `TrimReport.old_ids` (new id i was old id old_ids[i]); trimming alone changes no prediction
  on it.
- Any other word is spelled with kept pieces where the tokenizer's model can, else unknown:
  WordPiece: greedy longest match over the kept pieces; a word it cannot spell becomes one
  unknown token. Unigram (SentencePiece): the best-scoring segmentation over the kept pieces,
  so a word whose piece was dropped is usually re-segmented into smaller kept pieces; only
  characters no kept piece covers become unknown (a run of them, one unknown token). BPE keeps
  its alphabet (the pieces no merge makes: the 256 bytes of a byte-level BPE), so a word is
  spelled with shorter kept pieces and nothing becomes unknown that was not before.

Exactness needs a few pieces beyond those the text uses: BPE keeps every piece a kept piece is
merged from (so all merges that build a kept word survive); Unigram keeps its lowest-scoring
piece (the penalty of an unknown character is derived from it); byte-fallback models keep
their byte pieces; and in RoBERTa-style models, whose position ids count from the padding id,
the ids up to it keep their place.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence, Union

import torch
from torch import nn
from transformers import AutoTokenizer, PreTrainedModel

from distill.models.load import count_parameters

# a string, or a sentence's words (pre-split text, tokenized as tagging tokenizes it)
Text = Union[str, Sequence[str]]
MODELS = ("WordPiece", "WordLevel", "Unigram", "BPE")
_BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


@dataclass
class TrimReport:
    """What a trim kept: counts for metrics.json (`summary`) and the id table."""

    pieces_before: int
    pieces_after: int
    parameters_before: int
    parameters_after: int
    min_count: int
    from_text: int  # distinct pieces the texts use (before `min_count`)
    old_ids: list[int] = field(repr=False, default_factory=list)  # new id -> old id

    def summary(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("old_ids")
        return out

    def new_id(self) -> dict[int, int]:
        """old id -> new id, for the kept pieces."""
        return {old: new for new, old in enumerate(self.old_ids)}


# ---------------------------------------------------------------------------------------------
# Reading text
# ---------------------------------------------------------------------------------------------


def encode(tokenizer: Any, texts: Iterable[Text], batch: int = 512) -> Iterator[list[int]]:
    """The piece ids of each text, without special tokens (strings as they are; word lists with
    `is_split_into_words`, the way tagging tokenizes a sentence). Order: strings, then word lists."""
    strings: list[str] = []
    words: list[list[str]] = []
    for text in texts:
        if isinstance(text, str):
            strings.append(text)
        else:
            words.append([str(w) for w in text])
    for group, split in ((strings, False), (words, True)):
        for i in range(0, len(group), batch):
            chunk = group[i : i + batch]
            yield from tokenizer(chunk, is_split_into_words=split, add_special_tokens=False, verbose=False)["input_ids"]


def piece_counts(tokenizer: Any, texts: Iterable[Text]) -> Counter:
    """How often each piece id occurs in `texts`."""
    counts: Counter = Counter()
    for ids in encode(tokenizer, texts):
        counts.update(ids)
    return counts


def read_corpus(paths: Sequence[str | Path]) -> list[Text]:
    """Texts of extra corpus files: every string (or list of strings) of each row of a .jsonl
    file; each non-empty line of any other file."""
    texts: list[Text] = []
    for path in paths:
        path = Path(path).expanduser()
        lines = path.read_text(encoding="utf-8").splitlines()
        if path.suffix.lower() != ".jsonl":
            texts.extend(line for line in lines if line.strip())
            continue
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, line {n}: not JSON ({err})") from None
            for value in row.values() if isinstance(row, dict) else [row]:
                if isinstance(value, str):
                    texts.append(value)
                elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
                    texts.append(value)
    return texts


def vocabulary_coverage(tokenizer: Any, texts: Iterable[Text]) -> dict[str, Any]:
    """How many pieces `tokenizer` makes of `texts` and how many of them are its unknown token."""
    unk = tokenizer.unk_token_id
    tokens = unknown = 0
    for ids in encode(tokenizer, texts):
        tokens += len(ids)
        unknown += sum(1 for i in ids if i == unk) if unk is not None else 0
    return {"tokens": tokens, "unknown": unknown, "unknown_share": unknown / tokens if tokens else 0.0}


# ---------------------------------------------------------------------------------------------
# Which pieces to keep
# ---------------------------------------------------------------------------------------------


def _spec(tokenizer: Any) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"{type(tokenizer).__name__} is not a fast tokenizer: vocabulary trimming edits tokenizer.json")
    spec = json.loads(backend.to_str())
    kind = spec["model"]["type"]
    if kind not in MODELS:
        raise ValueError(f"cannot trim a {kind} tokenizer model (only {', '.join(MODELS)})")
    return spec


def _pieces(model: dict[str, Any]) -> list[str]:
    """The model's pieces in id order."""
    if model["type"] == "Unigram":
        return [piece for piece, _ in model["vocab"]]
    pieces = [""] * len(model["vocab"])
    for piece, i in model["vocab"].items():
        pieces[i] = piece
    return pieces


def _merges(model: dict[str, Any]) -> list[tuple[str, str]]:
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]


def _merged(model: dict[str, Any], a: str, b: str) -> str:
    """The piece a BPE merge of (a, b) makes (the second loses the continuing-subword prefix)."""
    return a + b[len(model.get("continuing_subword_prefix") or "") :]


def _bpe_closure(model: dict[str, Any], keep: set[str]) -> set[str]:
    """`keep` plus the BPE alphabet and every piece a kept piece is merged from."""
    made_by: dict[str, list[tuple[str, str]]] = {}
    for a, b in _merges(model):
        made_by.setdefault(_merged(model, a, b), []).append((a, b))
    out = set(keep) | {p for p in model["vocab"] if p not in made_by}  # the alphabet
    todo = list(out)
    while todo:
        for a, b in made_by.get(todo.pop(), ()):
            for part in (a, b):
                if part not in out:
                    out.add(part)
                    todo.append(part)
    return out


def _structural_ids(spec: dict[str, Any], tokenizer: Any) -> set[int]:
    """Ids the tokenizer itself needs: special and added tokens, the post-processor's tokens,
    the padding and unknown ids."""
    ids = set(tokenizer.all_special_ids) | {a["id"] for a in spec.get("added_tokens", [])}
    _post_ids(spec.get("post_processor"), lambda i: ids.add(i) or i)
    if spec.get("padding"):
        ids.add(spec["padding"]["pad_id"])
    model = spec["model"]
    if model["type"] == "Unigram" and model.get("unk_id") is not None:
        ids.add(model["unk_id"])
    elif model.get("unk_token") in model["vocab"]:
        ids.add(model["vocab"][model["unk_token"]])
    return ids


def kept_ids(
    tokenizer: Any, counts: Counter, min_count: int = 1, keep: Sequence[str] = (), extra_ids: Iterable[int] = ()
) -> list[int]:
    """The old ids a trim keeps, increasing: structural ids, `extra_ids`, pieces used at least
    `min_count` times, the pieces named in `keep`, and what exactness needs (module docstring)."""
    spec = _spec(tokenizer)
    model = spec["model"]
    pieces = _pieces(model)
    index = {p: i for i, p in enumerate(pieces)}
    unknown = [p for p in keep if p not in index and tokenizer.convert_tokens_to_ids(p) in (None, tokenizer.unk_token_id)]
    if unknown:
        raise ValueError(f"student.vocab.keep names pieces the tokenizer does not have: {unknown[:10]}")
    ids = _structural_ids(spec, tokenizer) | set(extra_ids)
    ids |= {i for i, c in counts.items() if c >= min_count}
    ids |= {index[p] if p in index else tokenizer.convert_tokens_to_ids(p) for p in keep}
    if model.get("byte_fallback"):
        ids |= {i for i, p in enumerate(pieces) if _BYTE_PIECE.match(p)}
    if model["type"] == "BPE":
        kept = _bpe_closure(model, {pieces[i] for i in ids if i < len(pieces)})
        ids |= {index[p] for p in kept if p in index}
    if model["type"] == "Unigram":
        ids.add(min(range(len(pieces)), key=lambda i: model["vocab"][i][1]))
    return sorted(ids)


# ---------------------------------------------------------------------------------------------
# Rebuilding the tokenizer
# ---------------------------------------------------------------------------------------------


def _post_ids(node: Any, remap: Any) -> None:
    """Apply `remap` to every token id a post-processor names (in place)."""
    if not isinstance(node, dict):
        return
    kind = node.get("type")
    if kind == "TemplateProcessing":
        for token in node.get("special_tokens", {}).values():
            token["ids"] = [remap(i) for i in token["ids"]]
    elif kind in ("RobertaProcessing", "BertProcessing"):
        for key in ("sep", "cls"):
            node[key] = [node[key][0], remap(node[key][1])]
    elif kind == "Sequence":
        for inner in node.get("processors", []):
            _post_ids(inner, remap)


def trimmed_spec(spec: dict[str, Any], old_ids: list[int]) -> dict[str, Any]:
    """tokenizer.json content (a dict) keeping only `old_ids`, renumbered in their order."""
    spec = json.loads(json.dumps(spec))
    new_of = {old: new for new, old in enumerate(old_ids)}
    model = spec["model"]
    pieces = _pieces(model)
    in_model = [i for i in old_ids if i < len(pieces)]
    if in_model != old_ids[: len(in_model)]:
        raise ValueError("added tokens sit between the model's pieces: cannot renumber them apart")
    if model["type"] == "Unigram":
        model["vocab"] = [model["vocab"][i] for i in in_model]
        if model.get("unk_id") is not None:
            model["unk_id"] = new_of[model["unk_id"]]
    else:
        model["vocab"] = {pieces[i]: new_of[i] for i in in_model}
    if model["type"] == "BPE":
        kept = model["vocab"]
        as_strings = bool(model.get("merges")) and isinstance(model["merges"][0], str)
        merges = [(a, b) for a, b in _merges(model) if a in kept and b in kept and _merged(model, a, b) in kept]
        model["merges"] = [f"{a} {b}" for a, b in merges] if as_strings else [[a, b] for a, b in merges]
    for token in spec.get("added_tokens", []):
        token["id"] = new_of[token["id"]]
    _post_ids(spec.get("post_processor"), lambda i: new_of[i])
    if spec.get("padding"):
        spec["padding"]["pad_id"] = new_of[spec["padding"]["pad_id"]]
    return spec


def trim_tokenizer(tokenizer: Any, old_ids: list[int]) -> Any:
    """A tokenizer of the same class and settings whose vocabulary is `old_ids` (renumbered).

    Saved and loaded back through a folder, so that it is what `from_pretrained` will give."""
    spec = trimmed_spec(_spec(tokenizer), old_ids)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        for extra in Path(tmp).iterdir():  # slow-tokenizer vocab files would describe the old vocabulary
            if extra.name not in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
                extra.unlink()
        (Path(tmp) / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
        trimmed = AutoTokenizer.from_pretrained(tmp)
    if len(trimmed) != len(old_ids):
        raise ValueError(
            f"the trimmed {type(trimmed).__name__} has {len(trimmed)} pieces, not the {len(old_ids)} kept: "
            "its class rebuilt the vocabulary instead of reading tokenizer.json"
        )
    trimmed.name_or_path = tokenizer.name_or_path
    return trimmed


# ---------------------------------------------------------------------------------------------
# Rebuilding the model
# ---------------------------------------------------------------------------------------------


def _token_id_keys(config: Any) -> dict[str, int]:
    """The config's token ids (pad_token_id, bos_token_id, ...), where set."""
    return {
        k: v for k, v in config.to_dict().items()
        if k.endswith("_token_id") and isinstance(v, int) and not isinstance(v, bool)
    }


def positions_from_padding(model: nn.Module) -> bool:
    """RoBERTa-style embeddings, whose position ids start after the padding id (they hold it)."""
    return any(not isinstance(m, nn.Embedding) and getattr(m, "padding_idx", None) is not None for m in model.modules())


def trim_embeddings(model: PreTrainedModel, old_ids: list[int]) -> PreTrainedModel:
    """Keep only rows `old_ids` of the input embeddings (in place; returns the model), and of an
    output layer over the vocabulary (tied or not); renumber the config's token ids and
    `vocab_size`, and the padding index the embeddings hold."""
    emb = model.get_input_embeddings()
    idx = torch.tensor(old_ids, device=emb.weight.device)
    if int(idx.max()) >= emb.num_embeddings:
        raise ValueError(f"id {int(idx.max())} is past the {emb.num_embeddings} rows of the embeddings")
    new_of = {old: new for new, old in enumerate(old_ids)}
    old_pad = emb.padding_idx
    new_emb = nn.Embedding(
        len(old_ids), emb.embedding_dim, padding_idx=new_of.get(old_pad) if old_pad is not None else None,
        device=emb.weight.device, dtype=emb.weight.dtype,
    )
    with torch.no_grad():
        new_emb.weight.copy_(emb.weight[idx])  # [kept, dim]
    new_emb.weight.requires_grad_(emb.weight.requires_grad)
    out = model.get_output_embeddings()
    model.set_input_embeddings(new_emb)
    if isinstance(out, nn.Linear) and out.out_features == emb.num_embeddings:
        old_bias = out.bias
        if out.weight is emb.weight:
            out.weight = new_emb.weight
        else:
            out.weight = nn.Parameter(out.weight.detach()[idx].clone())  # [kept, hidden]
        if old_bias is not None:
            out.bias = nn.Parameter(old_bias.detach()[idx].clone())
            for module in model.modules():  # heads that hold the same bias (BERT's predictions.bias)
                if module is not out and getattr(module, "bias", None) is old_bias:
                    module.bias = out.bias
        out.out_features = len(old_ids)
    config = model.config
    for key, value in _token_id_keys(config).items():
        if value in new_of:
            setattr(config, key, new_of[value])
    # embeddings that remember the padding id (RoBERTa's position ids count from it)
    for module in model.modules():
        if old_pad is not None and getattr(module, "padding_idx", None) == old_pad and not isinstance(module, nn.Embedding):
            module.padding_idx = new_of[old_pad]
    config.vocab_size = len(old_ids)
    return model


def trim_vocabulary(
    model: PreTrainedModel, tokenizer: Any, texts: Iterable[Text], min_count: int = 1, keep: Sequence[str] = (),
    keep_ids: Iterable[int] = (),
) -> tuple[PreTrainedModel, Any, TrimReport]:
    """(model, tokenizer, report) keeping the special tokens and the pieces `texts` use at least
    `min_count` times, plus the pieces `keep` and the ids `keep_ids` (the model is changed in
    place). See the module docstring for what the trimmed tokenizer does with other text."""
    if min_count < 1:
        raise ValueError(f"min_count={min_count}: a piece must occur at least once")
    counts = piece_counts(tokenizer, texts)
    extra = [i for i in _token_id_keys(model.config).values() if 0 <= i < len(tokenizer)] + list(keep_ids)
    pad = tokenizer.pad_token_id
    if pad is not None and positions_from_padding(model):
        extra += range(pad + 1)  # the padding id keeps its value: position ids count from it
    rows = model.get_input_embeddings().num_embeddings
    old_ids = kept_ids(tokenizer, counts, min_count, keep, extra_ids=extra)
    if old_ids[-1] >= rows:
        raise ValueError(f"the tokenizer's id {old_ids[-1]} is past the model's {rows} embedding rows: not its tokenizer?")
    parameters_before, pieces_before = count_parameters(model), len(tokenizer)
    new_tokenizer = trim_tokenizer(tokenizer, old_ids)
    trim_embeddings(model, old_ids)
    report = TrimReport(
        pieces_before=pieces_before, pieces_after=len(old_ids),
        parameters_before=parameters_before, parameters_after=count_parameters(model),
        min_count=min_count, from_text=len(counts), old_ids=old_ids,
    )
    return model, new_tokenizer, report
