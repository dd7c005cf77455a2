"""How a recipe becomes a validated config: the YAML merged over the schema, `key=value`
overrides merged over the recipe, then `checks.validate`. Unknown keys and wrong types stop the
run before any work with a message naming the key and the closest valid one."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from distill.errors import ConfigError
from distill.config.search_space import flatten_space, leaf_types
from distill.config.schema import Config
from distill.config.checks import validate


def _valid_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    for key in node:
        full = f"{prefix}{key}"
        keys.append(full)
        child = node[key] if not OmegaConf.is_missing(node, key) else None
        if isinstance(child, DictConfig) and OmegaConf.get_type(child) not in (dict, None):
            keys.extend(_valid_keys(child, full + "."))
    return keys


def _explain(err: OmegaConfBaseException, where: str) -> ConfigError:
    schema = OmegaConf.structured(Config)
    key = getattr(err, "full_key", None) or "?"
    if isinstance(err, ConfigKeyError):
        close = difflib.get_close_matches(key, _valid_keys(schema), n=1, cutoff=0.5)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        return ConfigError(f"{where}: unknown key '{key}'.{hint}")
    if isinstance(err, ValidationError):
        msg = str(err).splitlines()[0]
        return ConfigError(f"{where}: bad value for '{key}': {msg}")
    return ConfigError(f"{where}: {str(err).splitlines()[0]} (key '{key}')")


def _read_recipe(path: str | Path) -> DictConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: malformed YAML{at}: {getattr(err, 'problem', err)}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections, got {type(raw).__name__}")
    return OmegaConf.create(raw)


def _parse_overrides(overrides: list[str]) -> DictConfig:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. train.lr=1e-4)")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as err:
        raise ConfigError(f"overrides: {str(err).splitlines()[0]}") from None


def _search_space_replacing(cfg: DictConfig, node: DictConfig) -> DictConfig:
    """`node` (a recipe, or the command line's overrides) ready to merge onto `cfg`: its
    `search.space` keys written in full (`search_space.flatten_space`), and each one dropped
    from `cfg` first, so that the later source replaces a searched key's whole entry (its range
    or its choices) however either source nests it."""
    search = node.get("search")
    space = search.get("space") if isinstance(search, DictConfig) else None
    if isinstance(space, DictConfig):
        search.space = flatten_space(OmegaConf.to_container(space), leaf_types(Config))
        for key in search.space:
            cfg.search.space.pop(key, None)
    return node


def load_config(recipe: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults <- recipe YAML <- `key=value` overrides, validated against the schema."""
    cfg = OmegaConf.structured(Config)
    if recipe is not None:
        try:
            cfg = OmegaConf.merge(cfg, _search_space_replacing(cfg, _read_recipe(recipe)))
        except OmegaConfBaseException as err:
            raise _explain(err, str(recipe)) from None
    if overrides:
        try:
            cfg = OmegaConf.merge(cfg, _search_space_replacing(cfg, _parse_overrides(list(overrides))))
        except OmegaConfBaseException as err:
            raise _explain(err, "command line") from None
        except TypeError:  # a dotted key that indexes into a list (teachers.1.seed=3)
            raise ConfigError(
                f"command line: cannot merge {list(overrides)}: an override cannot set one entry "
                "of a list (e.g. teachers.1.seed); give the whole list, e.g. "
                "'teachers=[{model: a, seed: 1}, {model: a, seed: 2}]', or edit the recipe"
            ) from None
    try:
        config: Config = OmegaConf.to_object(cfg)  # resolves interpolations, checks types
    except OmegaConfBaseException as err:
        raise _explain(err, str(recipe or "config")) from None
    validate(config)
    return config
