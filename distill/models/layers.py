"""Cutting an encoder down to some of its layers, whatever its layout.

The list of transformer layers is found by looking at the model, not by its name: the one
`nn.ModuleList` of `num_hidden_layers` like modules in the base model (BERT, RoBERTa, XLM-R,
ELECTRA: `encoder.layer`; DistilBERT: `transformer.layer`; DeBERTa-v2: `encoder.layer`, whose
relative position embeddings sit beside the list and are kept; ModernBERT: `layers`). ALBERT
shares one layer that runs `num_hidden_layers` times, so cutting it means running it fewer
times. A cut rewrites the config to match (the layer count under the config's own name, and
per-layer lists such as ModernBERT's `layer_types`), renumbers each kept layer's `layer_idx`,
and is checked against a model built afresh from the cut config, so that what is trained is
what `from_pretrained` will load.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from distill.errors import ModelLoadError


def layer_count(config: Any) -> int:
    """The number of transformer layers a config builds (`num_hidden_layers`, or the name the
    config maps it to: DistilBERT's `n_layers`)."""
    n = getattr(config, "num_hidden_layers", None)
    if not isinstance(n, int):
        raise ModelLoadError(
            f"{type(config).__name__} (model_type '{getattr(config, 'model_type', '?')}') names no "
            "layer count (num_hidden_layers): cannot cut its layers"
        )
    return n


def _shared_layers(config: Any) -> bool:
    """ALBERT-style models: a few layer groups, each run several times."""
    return hasattr(config, "num_hidden_groups")


def find_layers(model: nn.Module) -> tuple[nn.Module, str, str]:
    """(parent module, attribute name, dotted name) of the model's list of transformer layers:
    the one ModuleList of `num_hidden_layers` modules of one class (the outermost, when one
    list holds another). A ModelLoadError names the model type and the lists it saw otherwise."""
    config = model.config
    n = layer_count(config)
    names = dict(model.named_modules())
    lists = {name: m for name, m in names.items() if isinstance(m, nn.ModuleList)}
    fits = [
        name for name, m in lists.items()
        if len(m) == n and n > 0 and len({type(layer) for layer in m}) == 1
    ]
    outer = [name for name in fits if not any(name != o and name.startswith(o + ".") for o in fits)]
    if len(outer) != 1:
        seen = ", ".join(f"{name} ({len(m)})" for name, m in lists.items()) or "none"
        why = "several" if outer else "none"
        raise ModelLoadError(
            f"cannot find the transformer layers of {type(model).__name__} (model_type "
            f"'{getattr(config, 'model_type', '?')}', {n} layers): {why} of its module lists hold "
            f"{n} layers of one kind; lists seen: {seen}. A layer cut needs an encoder with one "
            "list of layers (BERT, RoBERTa, XLM-R, ELECTRA, DistilBERT, DeBERTa-v2, ModernBERT) "
            "or ALBERT's shared layer"
        )
    name = outer[0]
    parent_name, _, attr = name.rpartition(".")
    return names[parent_name], attr, name


def cut_config(config: Any, layers: list[int]) -> Any:
    """A copy of `config` for a model of `layers` (indices into the original's): the layer
    count and every per-layer list (`layer_types`, ...) follow the kept layers."""
    n = layer_count(config)
    check_layers(layers, n)
    if _shared_layers(config) and config.num_hidden_groups != 1:
        raise ModelLoadError(
            f"{type(config).__name__} has {config.num_hidden_groups} layer groups: only ALBERTs with "
            "one shared layer (num_hidden_groups=1) can be cut (by running the layer fewer times)"
        )
    out = copy.deepcopy(config)
    for key, value in config.to_dict().items():
        # per-layer settings (ModernBERT's global/sliding attention pattern, layer_types lists)
        if "layer" in key and isinstance(value, (list, tuple)) and len(value) == n:
            setattr(out, key, [value[i] for i in layers])
    out.num_hidden_layers = len(layers)  # DistilBERT maps it to n_layers
    return out


def check_layers(layers: list[int], n: int, name: str = "layers") -> None:
    """Layer indices a cut can keep: some, increasing, unique, each in 0..n-1 (ValueError,
    naming them as `name`)."""
    if not layers or any(not 0 <= i < n for i in layers):
        raise ValueError(f"{name}={list(layers)}: indices must be in 0..{n - 1}")
    if sorted(set(layers)) != list(layers):
        raise ValueError(f"{name}={list(layers)} must be increasing and unique")


def cut_layers(model: nn.Module, layers: list[int]) -> nn.Module:
    """Keep only `layers` of `model` (in place; returns it), head and embeddings untouched.

    ALBERT (one shared layer): the layer runs len(layers) times, every weight stays."""
    config = cut_config(model.config, layers)
    if not _shared_layers(model.config):
        parent, attr, _ = find_layers(model)
        kept = nn.ModuleList([getattr(parent, attr)[i] for i in layers])
        setattr(parent, attr, kept)
        # caches, masks and layer-type lookups index by the layer's own number
        for new_index, layer in enumerate(kept):
            for module in layer.modules():
                if isinstance(getattr(module, "layer_idx", None), int):
                    module.layer_idx = new_index
    # every module holding the config object sees the cut one
    old = model.config
    for module in model.modules():
        if getattr(module, "config", None) is old:
            module.config = config
    check_loadable(model)
    return model


def check_loadable(model: nn.Module) -> None:
    """The cut model has exactly the weights (names and shapes) of a model built from its config:
    otherwise saving and loading it would silently drop or re-initialise some (ModernBERT's
    first layer, for one, has no attention norm: a cut must keep layer 0)."""
    with torch.device("meta"):
        fresh = type(model)(copy.deepcopy(model.config))
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    if ours == theirs:
        return
    extra = sorted(set(ours) - set(theirs))
    missing = sorted(set(theirs) - set(ours))
    shapes = sorted(k for k in set(ours) & set(theirs) if ours[k] != theirs[k])
    hint = ""
    if getattr(model.config, "model_type", "") == "modernbert":
        hint = " (ModernBERT's first layer has no attention norm: keep layer 0)"
    raise ModelLoadError(
        f"the cut {type(model).__name__} does not match a model built from its config{hint}: "
        f"weights only the cut has {extra[:5]}, only a fresh model has {missing[:5]}, "
        f"other shapes {shapes[:5]}"
    )
