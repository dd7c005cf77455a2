"""The search section's grammar and checks: the space, objectives, sampler, pruner, budget, storage.

`distill.config` checks a recipe's `search:` section with these functions whenever it loads one
(`distill validate` included); the search itself (distill/study/search/) runs Optuna on what
they return. Nothing here imports Optuna or any project module but the errors.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import typing
from dataclasses import dataclass, fields, is_dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence

from distill.errors import ConfigError

# Metrics each task family's evaluation produces on the validation split (see distill/tasks).
FAMILY_METRICS = {
    "classification": ("accuracy", "loss"),
    "tagging": ("f1", "precision", "recall", "accuracy", "loss"),
    "qa": ("exact_match", "f1", "loss"),
}
# Objectives measured on the trial's saved model, all minimised: name -> unit in the tables.
MODEL_OBJECTIVES = {"latency": "ms", "macs": "GMACs", "parameters": "M"}
DEFAULT_METRIC = {"classification": "accuracy", "tagging": "f1", "qa": "f1"}  # as each family's default_metric
LOWER_IS_BETTER = ("loss",)  # metrics where lower is better (every task's others are maximized)
SAMPLERS = {
    "tpe": "TPESampler", "random": "RandomSampler", "nsgaii": "NSGAIISampler", "nsgaiii": "NSGAIIISampler",
    "gp": "GPSampler", "cmaes": "CmaEsSampler", "qmc": "QMCSampler", "bruteforce": "BruteForceSampler",
}
SINGLE_OBJECTIVE_SAMPLERS = ("cmaes",)
PRUNERS = ("hyperband", "median", "none")
RANGE_KEYS = ("low", "high", "log", "step")
# Keys a trial sets itself, or that never change a trial's result.
NOT_SEARCHABLE = ("output_dir", "overwrite", "checkpoint", "teacher.dir", "search", "tracking", "hub")
# Keys that change the teacher stage: a space over them gets one teacher per value.
TEACHER_PREFIXES = ("teacher.", "data.", "task.")
TEACHER_EXACT = ("seed",)
STATES = ("complete", "pruned", "fail", "running", "waiting")
MAX_RETRIES = 3  # a trial whose worker dies this often is left failed


class SearchError(ConfigError):
    """A search that cannot run as configured; the message says what was wrong and where."""


# --- the schema's keys ---------------------------------------------------------------------------
def leaf_types(cls: type, prefix: str = "") -> dict[str, Any]:
    """Every settable key of the schema -> its type hint (Optional unwrapped)."""
    out: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        hint = hints[f.name]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if typing.get_origin(hint) is typing.Union and len(args) == 1:
            hint = args[0]
        if is_dataclass(hint):
            out.update(leaf_types(hint, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = hint
    return out


def key_type(key: str, leaves: Mapping[str, Any]) -> Optional[Any]:
    """The type of a recipe key; Any for a key inside a dict-typed field (config_overrides.x);
    None for a key the schema does not have."""
    if key in leaves:
        return leaves[key]
    for leaf, hint in leaves.items():
        if key.startswith(leaf + ".") and typing.get_origin(hint) is dict:
            return Any
    return None


def closest_key(key: str, leaves: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(leaves), n=1, cutoff=0.5)
    return f" Did you mean '{close[0]}'?" if close else ""


def parse_duration(text: Any) -> float:
    """'2h', '30m', '1h30m', '45s', '1.5h', '1d' or a number of seconds -> seconds."""
    raw = str(text).strip().lower().replace(" ", "")
    if re.fullmatch(r"\d+(\.\d+)?", raw):
        seconds = float(raw)
    else:
        parts = re.findall(r"(\d+(?:\.\d+)?)([dhms])", raw)
        if not parts or "".join(n + u for n, u in parts) != raw:
            raise SearchError(f"search.time_budget={text!r} is not a duration; write e.g. 2h, 30m, 1h30m or "
                              "5400 (seconds)")
        scale = {"d": 86400, "h": 3600, "m": 60, "s": 1}
        seconds = sum(float(n) * scale[u] for n, u in parts)
    if seconds <= 0:
        raise SearchError(f"search.time_budget={text!r} must be longer than zero")
    return seconds


# --- the space -----------------------------------------------------------------------------------
def _number(value: Any, where: str, what: str) -> float:
    """YAML reads 1e-5 (no dot) as a string: accept numbers written either way."""
    if isinstance(value, bool):
        raise SearchError(f"{where}: {what} must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise SearchError(f"{where}: {what} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise SearchError(f"{where}: {what} must be finite, got {value!r}")
    return number


def _coerce_choice(value: Any, hint: Any, where: str) -> Any:
    if isinstance(value, dict):
        raise SearchError(f"{where}: a choice cannot be a mapping ({value!r}); choose among numbers, "
                          "strings, booleans, null or lists")
    if hint is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        return _number(value, where, "a choice of a float key")
    return value


@dataclass(frozen=True)
class Param:
    """One searched key: a float or int range, or a list of choices."""

    key: str
    kind: str  # float | int | choice
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    step: Optional[float] = None
    choices: tuple = ()

    @property
    def labels(self) -> Optional[tuple[str, ...]]:
        """Optuna's categorical values must be scalars: list choices are suggested by their text."""
        if any(isinstance(c, (list, tuple)) for c in self.choices):
            return tuple(value_text(c) for c in self.choices)
        return None

    def suggest(self, trial: Any) -> Any:
        if self.kind == "float":
            return trial.suggest_float(self.key, self.low, self.high, log=self.log, step=self.step)
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        labels = self.labels
        if labels is None:
            return trial.suggest_categorical(self.key, list(self.choices))
        return self.choices[labels.index(trial.suggest_categorical(self.key, list(labels)))]

    def stored_of(self, value: Any) -> Optional[Any]:
        """A recipe value -> the value Optuna stores for it; None when it lies outside the space."""
        if self.kind == "choice":
            labels = self.labels
            if labels is None:  # 1 and True are equal in Python, but not the same recipe value
                same = [c for c in self.choices if c == value and isinstance(c, bool) == isinstance(value, bool)]
                return same[0] if same else None
            text = value_text(value)
            return text if text in labels else None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        if not self.low <= value <= self.high:
            return None
        if self.step and abs((value - self.low) / self.step - round((value - self.low) / self.step)) > 1e-9:
            return None
        return int(value) if self.kind == "int" else float(value)

    def value_of(self, stored: Any) -> Any:
        """A value as Optuna stores it -> the recipe value."""
        labels = self.labels
        return self.choices[labels.index(stored)] if labels is not None and stored in labels else stored

    def describe(self) -> str:
        if self.kind == "choice":
            return "one of " + ", ".join(str(c) for c in self.choices)
        text = f"{self.kind} in [{self.low:g}, {self.high:g}]"
        if self.log:
            text += ", log scale"
        if self.step:
            text += f", step {self.step:g}"
        return text


def _parse_range(key: str, spec: Mapping[str, Any], hint: Any) -> Param:
    where = f"search.space.{key}"
    unknown = [k for k in spec if k not in RANGE_KEYS]
    if unknown:
        hint_text = closest_key(str(unknown[0]), RANGE_KEYS)
        raise SearchError(f"{where}: unknown range key '{unknown[0]}'.{hint_text} A range has low, high and "
                          "optionally log (true/false) or step")
    if "low" not in spec or "high" not in spec:
        raise SearchError(f"{where}: a range needs both low and high (got {dict(spec)})")
    low, high = _number(spec["low"], where, "low"), _number(spec["high"], where, "high")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise SearchError(f"{where}: log must be true or false, got {log!r}")
    step = None if spec.get("step") is None else _number(spec["step"], where, "step")
    if low > high:
        raise SearchError(f"{where}: inverted range: low={low:g} is above high={high:g}")
    if low == high:
        raise SearchError(f"{where}: empty range: low and high are both {low:g}; set the key in the recipe "
                          "instead of searching it")
    if log and low <= 0:
        raise SearchError(f"{where}: a log-scale range needs low > 0, got low={low:g}")
    if step is not None:
        if step <= 0:
            raise SearchError(f"{where}: step must be > 0, got {step:g}")
        if log:
            raise SearchError(f"{where}: step and log exclude each other (Optuna samples one or the other)")
        span = (high - low) / step
        if abs(span - round(span)) > 1e-9:
            raise SearchError(f"{where}: high - low = {high - low:g} is not a multiple of step {step:g}")
    if hint is bool or hint is str or typing.get_origin(hint) in (list, dict):
        kind = {bool: "true/false", str: "text"}.get(hint, "list" if typing.get_origin(hint) is list else "mapping")
        raise SearchError(f"{where}: '{key}' is a {kind} key; search it with a list of choices, not a range")
    if hint is int:
        if not all(float(x).is_integer() for x in (low, high, step or 1)):
            raise SearchError(f"{where}: '{key}' is an integer key; low, high and step must be whole numbers")
        return Param(key, "int", int(low), int(high), log, int(step) if step else None)
    return Param(key, "float", low, high, log, step)


def flatten_space(space: Mapping[str, Any], leaves: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """`search.space` with every searched key written in full: `{train: {lr: [..]}}` (what
    `search.space.train.lr=[..]` on the command line makes) and `{train.lr: [..]}` both give
    `{"train.lr": [..]}`, so a command-line entry replaces the recipe's entry for the same key.

    A mapping is a range when it holds a range key (low, high, log, step); otherwise it is a
    section of the recipe (`train`) or of a dict-typed key (`student.config_overrides`), read
    one level deeper. Keys the schema lacks are kept as they are, for `parse_space` to report.
    """
    flat: dict[str, Any] = {}
    for name, spec in space.items():
        key = f"{prefix}{name}"
        hint = key_type(key, leaves)
        section = hint is None and any(leaf.startswith(key + ".") for leaf in leaves)
        in_dict = hint is not None and (hint is Any or typing.get_origin(hint) is dict)
        if isinstance(spec, Mapping) and not any(k in spec for k in RANGE_KEYS) and (section or in_dict):
            items = flatten_space(spec, leaves, key + ".").items()
        else:
            items = [(key, spec)]
        for full, value in items:
            if full in flat:
                raise SearchError(f"search.space: '{full}' is given twice")
            flat[full] = value
    return flat


def parse_space(space: Mapping[str, Any], leaves: Mapping[str, Any]) -> list[Param]:
    """The `search.space` mapping -> Params, every problem reported with the key it concerns.

    Keys are full recipe keys (`train.lr`), or nested as `flatten_space` reads them; `leaves`
    is the schema's keys and types (`leaf_types(Config)`).
    """
    params: list[Param] = []
    for key, spec in flatten_space(space, leaves).items():
        hint = key_type(key, leaves)
        if hint is None:
            raise SearchError(f"search.space: '{key}' is not a recipe key.{closest_key(key, leaves)}")
        if key.split(".")[0] in NOT_SEARCHABLE or key in NOT_SEARCHABLE:
            raise SearchError(f"search.space: '{key}' cannot be searched: the search sets it per trial, or it "
                              "does not change a trial's result")
        where = f"search.space.{key}"
        if isinstance(spec, Mapping):
            if not any(k in spec for k in RANGE_KEYS):
                raise SearchError(f"{where}: a range needs low and high (got keys {', '.join(map(str, spec))})")
            params.append(_parse_range(key, spec, hint))
        elif isinstance(spec, (list, tuple)):
            if not spec:
                raise SearchError(f"{where}: an empty list of choices")
            choices = tuple(_coerce_choice(v, hint, where) for v in spec)
            texts = [json.dumps(c, sort_keys=True) for c in choices]
            if len(set(texts)) != len(texts):
                dup = next(t for t in texts if texts.count(t) > 1)
                raise SearchError(f"{where}: the choice {dup} is listed twice")
            params.append(Param(key, "choice", choices=choices))
        else:
            raise SearchError(f"{where}: {spec!r} is neither a range {{low, high}} nor a list of choices; a fixed "
                              "value belongs in the recipe")
    return params


# --- objectives, sampler, pruner -----------------------------------------------------------------
def family_metrics(cfg: Any) -> tuple[str, ...]:
    names = FAMILY_METRICS.get(cfg.task.family, ())
    return names + ((cfg.task.metric,) if cfg.task.metric and cfg.task.metric not in names else ())


def resolve_objectives(cfg: Any) -> list[str]:
    """search.objectives, or the task's headline metric; each checked against what the task
    family's evaluation produces."""
    objectives = list(cfg.search.objectives)
    if not objectives:
        objectives = [cfg.task.metric or DEFAULT_METRIC.get(cfg.task.family, "loss")]
    produced = family_metrics(cfg)
    for name in objectives:
        if name not in produced and name not in MODEL_OBJECTIVES:
            raise SearchError(
                f"search.objectives: '{name}' is not produced by a {cfg.task.family} task; choose among "
                f"{', '.join(produced)} (validation metrics) or {', '.join(MODEL_OBJECTIVES)}"
                + closest_key(name, [*produced, *MODEL_OBJECTIVES])
            )
    if len(set(objectives)) != len(objectives):
        raise SearchError(f"search.objectives lists an objective twice: {objectives}")
    if not any(name not in MODEL_OBJECTIVES for name in objectives):
        raise SearchError(f"search.objectives={objectives} has no task metric: add one (e.g. "
                          f"{produced[0] if produced else 'accuracy'}), or every trial would be judged by "
                          "speed alone")
    return objectives


def direction(name: str) -> str:
    return "minimize" if name in MODEL_OBJECTIVES or name in LOWER_IS_BETTER else "maximize"


def pruner_name(cfg: Any, objectives: Sequence[str]) -> str:
    name = cfg.search.pruner or ("hyperband" if len(objectives) == 1 else "none")
    if name not in PRUNERS:
        raise SearchError(f"search.pruner='{name}' is not one of: {', '.join(PRUNERS)}")
    if name != "none" and len(objectives) > 1:
        raise SearchError(f"search.pruner={name}: Optuna prunes single-objective studies only; with objectives "
                          f"{list(objectives)} set search.pruner=none")
    return name


def check_section(cfg: Any, leaves: Mapping[str, Any]) -> None:
    """Every check of the search section that needs neither data nor models; called by
    `distill.config.validate`, so `distill validate` and every command catch a bad section."""
    s = cfg.search
    parse_space(s.space, leaves)
    objectives = resolve_objectives(cfg)
    if s.sampler not in SAMPLERS:
        raise SearchError(f"search.sampler='{s.sampler}' is not one of: {', '.join(SAMPLERS)}"
                          + closest_key(s.sampler, SAMPLERS))
    if s.sampler in SINGLE_OBJECTIVE_SAMPLERS and len(objectives) > 1:
        raise SearchError(f"search.sampler={s.sampler} handles one objective; for {objectives} use tpe, nsgaii, "
                          "nsgaiii, gp or random")
    pruner_name(cfg, objectives)
    if s.time_budget is not None:
        parse_duration(s.time_budget)
    lat = s.latency
    checks = {  # key: (value, within range)
        "search.trials": (s.trials, s.trials is None or s.trials >= 1),
        "search.heartbeat": (s.heartbeat, s.heartbeat >= 1),
        "search.latency.batch": (lat.batch, lat.batch >= 1),
        "search.latency.seq": (lat.seq, lat.seq >= 1),
        "search.latency.runs": (lat.runs, lat.runs >= 1),
        "search.latency.warmup": (lat.warmup, lat.warmup >= 0),
        "search.latency.threads": (lat.threads, lat.threads is None or lat.threads >= 1),
    }
    for key, (value, ok) in checks.items():
        if not ok:
            raise SearchError(f"{key}={value} is out of range")
    if s.storage is not None and "://" not in s.storage and journal_path(s.storage) is None:
        raise SearchError(f"search.storage={s.storage!r} is not a database URL nor a journal file; write e.g. "
                          "sqlite:///runs/study.db, postgresql://user@host/db, journal:///runs/study.log or a path "
                          "ending in .log or .journal (default: study.db in the search folder)")


def journal_path(storage: str) -> Optional[str]:
    """The file of an Optuna journal storage (`journal:///runs/study.log`, or a path ending in
    .log or .journal; `journal:////shared/study.log` is absolute, as with sqlite:///), else None."""
    if storage.startswith("journal:///"):
        return storage[len("journal:///"):] or None
    if "://" not in storage and storage.endswith((".log", ".journal")):
        return storage
    return None


def value_text(value: Any) -> str:
    """A value as `key=value` text that the config parser reads back as the same value (as
    `distill grid` writes its overrides)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(value_text(v) for v in value) + "]"
    return repr(value) if isinstance(value, float) else str(value)
