"""Analytic multiply-accumulate (MAC) and FLOP counts of a transformer encoder, from its config.

Three counts, per forward of the bare encoder (`AutoModel`: embeddings, layers, pooler):

- `linear_macs`: every nn.Linear (in_features x output elements; biases not counted).
- `macs`: the study's count. Its "Speedup" column divides MACs at batch 1, seq 512 by BETO's,
  as the module-hook profiler `thop` reports them: nn.Linear MACs plus 4 ops per element of
  every affine LayerNorm; embedding lookups, activations, softmax and the attention score and
  context matmuls (functional calls, not modules) count zero. This reproduces the published
  GMACs (BETO 43.53, ALBETO tiny 2.42, base-2...10 7.31/14.56/21.81/29.07/36.32) to two decimals.
- `flops`: 2 x (linear MACs + attention score and context matmul MACs), the usual FLOP count
  with attention included; it grows with seq^2 where the others grow with seq.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from transformers import PretrainedConfig

# LayerNorm as `thop` counts it: 2 ops per element (normalise), doubled for the affine part.
NORM_OPS_PER_ELEMENT = 4

BERT_LIKE = ("bert", "roberta", "xlm-roberta", "camembert")
SUPPORTED = BERT_LIKE + ("albert", "distilbert", "electra")


class UnsupportedModelError(ValueError):
    """A config whose architecture this module cannot count analytically."""


@dataclass(frozen=True)
class EncoderShape:
    """The sizes that decide an encoder's compute, read from any supported config."""

    model_type: str
    layers: int  # forward applications of a transformer layer (ALBERT: shared weights, applied N times)
    hidden: int
    heads: int
    ffn: int
    embedding: int  # width of the embedding lookups (ALBERT/ELECTRA: can be below `hidden`)
    vocab: int
    projection: bool  # an embedding -> hidden nn.Linear (ALBERT always; ELECTRA when sizes differ)
    pooler: bool  # a hidden x hidden nn.Linear on the first token (BERT, RoBERTa, ALBERT)
    max_positions: int  # longest sequence the position embeddings allow


def encoder_shape(config: PretrainedConfig) -> EncoderShape:
    """Normalise a transformers config to an EncoderShape (raises UnsupportedModelError)."""
    kind = getattr(config, "model_type", "")
    if kind == "distilbert":
        return EncoderShape(
            kind, config.n_layers, config.dim, config.n_heads, config.hidden_dim, config.dim,
            config.vocab_size, False, False, config.max_position_embeddings,
        )
    if kind in BERT_LIKE or kind in ("albert", "electra"):
        hidden = config.hidden_size
        embedding = hidden
        if kind in ("albert", "electra"):
            embedding = getattr(config, "embedding_size", hidden)
        projection = kind == "albert" or (kind == "electra" and embedding != hidden)
        max_positions = config.max_position_embeddings
        if kind in ("roberta", "xlm-roberta", "camembert"):
            max_positions -= (config.pad_token_id or 0) + 1  # positions start after the padding index
        return EncoderShape(
            kind, config.num_hidden_layers, hidden, config.num_attention_heads,
            config.intermediate_size, embedding, config.vocab_size, projection,
            kind != "electra", max_positions,
        )
    raise UnsupportedModelError(
        f"cannot count MACs for model_type '{kind}': supported are {', '.join(SUPPORTED)}. "
        "Latency can still be measured; the MAC columns stay empty."
    )


@dataclass(frozen=True)
class Counts:
    """Compute of one forward at (batch, seq); every field is an exact integer count."""

    batch: int
    seq: int
    linear_macs: int  # nn.Linear only
    norm_ops: int  # LayerNorm ops as the study's profiler counted them
    macs: int  # the study's MACs: linear_macs + norm_ops
    attention_macs: int  # Q.K^T and softmax(.).V matmuls
    flops: int  # 2 * (linear_macs + attention_macs)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def count(config: PretrainedConfig | EncoderShape, batch: int = 1, seq: int = 512) -> Counts:
    """MACs and FLOPs of one encoder forward on `batch` sequences of `seq` tokens."""
    s = config if isinstance(config, EncoderShape) else encoder_shape(config)
    if batch < 1 or seq < 1:
        raise ValueError(f"batch and seq must be positive, got batch={batch}, seq={seq}")
    tokens = batch * seq
    h = s.hidden
    # per token and layer: Q, K, V and output projections (4 h^2) + the two FFN matrices (2 h f)
    per_layer = 4 * h * h + 2 * h * s.ffn
    linear = tokens * s.layers * per_layer
    if s.projection:
        linear += tokens * s.embedding * h
    if s.pooler:
        linear += batch * h * h  # first token only
    # LayerNorms: one after the embeddings (at embedding width), two per layer (at hidden width)
    norm = NORM_OPS_PER_ELEMENT * tokens * (s.embedding + 2 * s.layers * h)
    # per layer: scores [b, heads, seq, seq] = Q K^T costs b*seq*seq*h MACs; context the same
    attention = s.layers * 2 * batch * seq * seq * h
    return Counts(
        batch=batch,
        seq=seq,
        linear_macs=linear,
        norm_ops=norm,
        macs=linear + norm,
        attention_macs=attention,
        flops=2 * (linear + attention),
    )


def speedup(reference: Counts, other: Counts) -> float:
    """How many times fewer MACs `other` needs than `reference` (the study's Speedup)."""
    if other.macs == 0:
        raise ValueError("speedup of a model with zero MACs is undefined")
    return reference.macs / other.macs
