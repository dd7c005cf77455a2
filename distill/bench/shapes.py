"""The reference study's models as transformers configs, so speed can be measured offline.

Each shape is the exact architecture of a published model (sizes and vocabulary from the
study's model table); `distill bench` builds it with random weights, since speed does not
depend on the weights. ALBETO base-N is ALBETO base with the shared layer applied N times.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from transformers import (
    AlbertConfig,
    AutoConfig,
    BertConfig,
    DistilBertConfig,
    PretrainedConfig,
    RobertaConfig,
)

BETO_VOCAB = 31002
ALBETO_VOCAB = 31000
ROBERTA_BNE_VOCAB = 50262


def _beto() -> BertConfig:
    return BertConfig(
        vocab_size=BETO_VOCAB,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        max_position_embeddings=512,
        type_vocab_size=2,
    )


def _distilbeto() -> DistilBertConfig:
    return DistilBertConfig(
        vocab_size=BETO_VOCAB,
        dim=768,
        n_layers=6,
        n_heads=12,
        hidden_dim=3072,
        max_position_embeddings=512,
    )


def _albeto(layers: int, hidden: int, heads: int, ffn: int) -> AlbertConfig:
    return AlbertConfig(
        vocab_size=ALBETO_VOCAB,
        embedding_size=128,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=ffn,
        num_hidden_groups=1,  # one shared layer, applied `layers` times
        inner_group_num=1,
        max_position_embeddings=512,
        type_vocab_size=2,
    )


def _roberta_bne(layers: int, hidden: int, heads: int, ffn: int) -> RobertaConfig:
    return RobertaConfig(
        vocab_size=ROBERTA_BNE_VOCAB,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=ffn,
        max_position_embeddings=514,  # RoBERTa positions start after the padding index
        type_vocab_size=1,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    )


# name -> (hub id of the published model, config factory)
SHAPES: dict[str, tuple[str, Callable[[], PretrainedConfig]]] = {
    "beto": ("dccuchile/bert-base-spanish-wwm-cased", _beto),
    "beto-uncased": ("dccuchile/bert-base-spanish-wwm-uncased", _beto),
    "distilbeto": ("dccuchile/distilbert-base-spanish-uncased", _distilbeto),
    "albeto-tiny": ("dccuchile/albert-tiny-spanish", lambda: _albeto(4, 312, 12, 1248)),
    "albeto-base": ("dccuchile/albert-base-spanish", lambda: _albeto(12, 768, 12, 3072)),
    "albeto-large": ("dccuchile/albert-large-spanish", lambda: _albeto(24, 1024, 16, 4096)),
    "albeto-xxlarge": ("dccuchile/albert-xxlarge-spanish", lambda: _albeto(12, 4096, 64, 16384)),
    "roberta-bne-base": ("PlanTL-GOB-ES/roberta-base-bne", lambda: _roberta_bne(12, 768, 12, 3072)),
    "roberta-bne-large": ("PlanTL-GOB-ES/roberta-large-bne", lambda: _roberta_bne(24, 1024, 16, 4096)),
}
_BASE_N = re.compile(r"^albeto-base-(\d+)$")

# The models of the study's speed table, in its order; `--all` adds the rest of SHAPES.
STUDY_MODELS = [
    "beto",
    "distilbeto",
    "albeto-tiny",
    "albeto-base-2",
    "albeto-base-4",
    "albeto-base-6",
    "albeto-base-8",
    "albeto-base-10",
]
EXTRA_MODELS = ["albeto-base", "albeto-large", "albeto-xxlarge", "roberta-bne-base", "roberta-bne-large"]


def is_shape(name: str) -> bool:
    """True for a name `shape_config` understands (a SHAPES key or albeto-base-N, 1 <= N <= 12)."""
    match = _BASE_N.match(name)
    return name in SHAPES or (match is not None and 1 <= int(match.group(1)) <= 12)


def shape_config(name: str) -> PretrainedConfig:
    """A fresh config for a study model name (`albeto-base-N` for any N from 1 to 12)."""
    if name in SHAPES:
        return SHAPES[name][1]()
    match = _BASE_N.match(name)
    if match:
        layers = int(match.group(1))
        if not 1 <= layers <= 12:
            raise KeyError(f"{name}: ALBETO base has 12 layers; use albeto-base-N with 1 <= N <= 12")
        return _albeto(layers, 768, 12, 3072)
    raise KeyError(f"'{name}' is not a known shape; known: {', '.join(shape_names())}, albeto-base-N")


def shape_hub_id(name: str) -> str:
    """The hub id of the published model a shape stands for (base-N: ALBETO base's)."""
    if name in SHAPES:
        return SHAPES[name][0]
    if _BASE_N.match(name):
        return SHAPES["albeto-base"][0]
    raise KeyError(f"'{name}' is not a known shape")


def shape_for_hub_id(hub_id: str) -> str | None:
    """The shape name of a published model's hub id (None if it is not one of the study's)."""
    for name, (hid, _) in SHAPES.items():
        if hid == hub_id:
            return name
    return None


def shape_names() -> list[str]:
    """Every shape name, the study's speed-table models first."""
    return STUDY_MODELS + [n for n in SHAPES if n not in STUDY_MODELS]


class ModelNotFound(LookupError):
    """A bench model name that is neither a shape, a catalog name, a local folder nor reachable."""


@dataclass(frozen=True)
class BenchModel:
    """What `distill bench` measures for one name: a config, and where it came from."""

    name: str
    config: PretrainedConfig
    source: str  # shape | catalog | local | hub
    origin: str  # the hub id or path behind the name ("" for a plain shape)


def _catalog(name: str) -> tuple[str, dict[str, Any]] | None:
    """(hub id, config overrides) from the student catalog, None when the catalog lacks it."""
    try:
        from distill.models import resolve_student
    except ImportError:  # the catalog module is optional for bench
        return None
    try:
        return resolve_student(name)
    except KeyError:
        return None


def resolve_model(name: str) -> BenchModel:
    """Shape name -> its config; catalog name -> hub config (offline: the matching shape);
    local folder or hub id -> its config. Weights are never needed: bench uses random ones."""
    if is_shape(name) or _BASE_N.match(name):  # base-N out of range: shape_config says why
        return BenchModel(name, shape_config(name), "shape", shape_hub_id(name))
    entry = _catalog(name)
    if entry is not None:
        hub_id, overrides = entry
        shape = shape_for_hub_id(hub_id)
        if shape is not None:  # a study model: its shape is its config, no network needed
            config = shape_config(shape)
        else:
            config = _hub_config(name, hub_id)
        for key, value in overrides.items():
            setattr(config, key, value)
        return BenchModel(name, config, "catalog", hub_id)
    if Path(name).expanduser().is_dir():
        path = Path(name).expanduser()
        if not (path / "config.json").exists():
            raise ModelNotFound(
                f"'{name}' is a folder without config.json; point to a saved model folder"
            )
        return BenchModel(name, AutoConfig.from_pretrained(path), "local", str(path))
    return BenchModel(name, _hub_config(name, name), "hub", name)


def _hub_config(name: str, hub_id: str) -> PretrainedConfig:
    try:
        return AutoConfig.from_pretrained(hub_id)
    except (OSError, ValueError) as err:
        raise ModelNotFound(
            f"can't get the config of '{name}' ({hub_id}): {str(err).splitlines()[0]}. "
            "Offline, use a local model folder or a shape name: "
            f"{', '.join(shape_names())}, albeto-base-N."
        ) from err
