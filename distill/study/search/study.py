"""The search's Optuna study: its storage, sampler and pruner, the check that a stored study is this
search's, the recipe's own setting as the first trial, and the retry of trials whose worker stopped.

Storages (search.storage):
    sqlite:///<root>/study.db       the default: workers on one machine (local disk)
    postgresql://..., mysql://...   any database URL Optuna accepts: workers anywhere
    journal:///shared/study.log     Optuna's journal file (also any path ending in .log or
                                    .journal): workers on machines sharing a filesystem, no server

A database storage records a heartbeat of every running trial: a trial silent for two
search.heartbeat periods is failed by Optuna and queued again by Optuna's retry callback
(`RetryHeartbeatStaleTrialCallback`, at most MAX_RETRIES times), with its values and folder, so
the next worker resumes it from its checkpoint. Optuna's journal storage has no heartbeat: there a
trial left running by a killed worker is found only on the machine that ran it, whose next run
sees the trial's process gone (databases get that same-machine check too, before the heartbeat
would tell). A trial stopped by a signal is queued again by the same callback at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

from distill.config.search_space import MAX_RETRIES, SAMPLERS, SearchError, journal_path


def redact(url: str) -> str:
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)


def storage_file(url: str) -> Optional[Path]:
    """The file a SQLite or journal storage lives in (None for a server)."""
    if url.startswith("sqlite:///") and ":memory:" not in url:
        return Path(url[len("sqlite:///"):])
    journal = journal_path(url)
    return Path(journal) if journal else None


@contextlib.contextmanager
def file_lock(path: Optional[Path]) -> Iterator[None]:
    """An exclusive lock beside a storage file (POSIX flock); nothing for a server. The lock file
    is not the journal's own `<file>.lock`, which Optuna takes and releases by itself."""
    if path is None:
        yield
        return
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".search-lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def retry_callback(max_retry: Optional[int]) -> Any:
    """Optuna's callback that queues a copy of a failed trial: the same values, user attributes
    (its folder) and reported evaluations."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry, inherit_intermediate_values=True)


def make_storage(url: str, heartbeat: int) -> Any:
    import optuna

    journal = journal_path(url)
    if journal:
        Path(journal).parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(journal))
    local = storage_file(url)
    # several workers on one SQLite file wait for its lock instead of failing at once
    engine = {"connect_args": {"timeout": 120}} if local else {"pool_pre_ping": True}

    def connect() -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                url, engine_kwargs=engine, heartbeat_interval=heartbeat, grace_period=2 * heartbeat,
                heartbeat_stale_trial_callback=retry_callback(MAX_RETRIES))

    # Workers starting together would each create the tables of a new database, and all but one
    # fail on the schema's version stamp: on a SQLite file they take turns under a file lock; on
    # a server, a worker that loses the race retries once the tables exist.
    from sqlalchemy.exc import SQLAlchemyError

    for attempt in range(5):
        try:
            with file_lock(local):
                storage = connect()
            if local:
                serialize_sqlite(storage.engine)
            return storage
        except SQLAlchemyError:
            if attempt == 4:
                raise
            time.sleep(1.0 + attempt)


def serialize_sqlite(engine: Any) -> None:
    """Every transaction on a SQLite file takes its write lock when it begins (SQLAlchemy's
    recipe for pysqlite), so that a check and the update it allows cannot interleave between
    workers: without it, two workers starting at once can both take the same waiting trial."""
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _autocommit_driver(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.isolation_level = None  # SQLAlchemy, not the driver, begins transactions

    @event.listens_for(engine, "begin")
    def _begin_immediate(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections opened before the listeners are replaced


def make_sampler(name: str, options: Mapping[str, Any], seed: int) -> Any:
    import optuna

    cls = getattr(optuna.samplers, SAMPLERS[name])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return cls(**{"seed": seed, **options})
    except TypeError as err:
        raise SearchError(f"search.sampler_options {dict(options)} do not fit {cls.__name__}: {err}") from None


def make_pruner(name: str, options: Mapping[str, Any]) -> Any:
    import optuna

    if name == "none":
        if options:
            raise SearchError("search.pruner_options are set but search.pruner=none")
        return optuna.pruners.NopPruner()
    cls = optuna.pruners.HyperbandPruner if name == "hyperband" else optuna.pruners.MedianPruner
    try:
        return cls(**dict(options))
    except (TypeError, ValueError) as err:
        raise SearchError(f"search.pruner_options {dict(options)} do not fit {cls.__name__}: {err}") from None


def identity(search: Any) -> dict[str, Any]:
    """What makes two runs the same study: the recipe and command line, less the searched keys,
    the search section and the folders."""
    from distill.config import to_dict

    view = to_dict(search.base)
    for key in ("search", "tracking", "hub", "output_dir", "overwrite", "checkpoint"):
        view.pop(key, None)
    for p in search.params:  # a searched key's recipe value never reaches a trial
        *path, last = p.key.split(".")
        node: Any = view
        for part in path:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    return json.loads(json.dumps(view, default=str))


def _diff_keys(a: Any, b: Any, prefix: str = "") -> set[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: set[str] = set()
        for k in set(a) | set(b):
            out |= _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return set() if a == b else {prefix.rstrip(".")}


def open_study(search: Any, storage: Any, create: bool = True) -> Any:
    """This search's study in `storage`: created, or loaded and checked to be the same search."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # each trial is reported by the search instead
    where = f"study '{search.study_name}' in {redact(search.storage_url)}"
    if not create:
        try:
            return optuna.load_study(study_name=search.study_name, storage=storage)
        except KeyError:
            raise SearchError(f"no {where} yet") from None
    s = search.cfg
    study = optuna.create_study(storage=storage, study_name=search.study_name, load_if_exists=True,
                                sampler=make_sampler(s.sampler, s.sampler_options, 0),
                                pruner=make_pruner(search.pruner, s.pruner_options), directions=search.directions)
    # Workers, and a resumed run, must not replay one random sequence (the same first points
    # again): the seed moves with the worker index and the trials the study already holds.
    seed = (s.seed if s.seed is not None else search.base.seed) + 7919 * search.worker
    study.sampler = make_sampler(s.sampler, s.sampler_options, seed + len(study.get_trials(deepcopy=False)))
    stored = [d.name.lower() for d in study.directions]
    if stored != search.directions:
        raise SearchError(f"{where} optimises {stored}, but search.objectives={search.objectives} asks for "
                          f"{search.directions}; use another --root, search.storage or search.study_name")
    attrs, mine = study.user_attrs, identity(search)
    if "recipe" not in attrs:
        study.set_user_attr("recipe", mine)
        study.set_user_attr("objectives", search.objectives)
    elif attrs["recipe"] != mine:
        diff = sorted(_diff_keys(attrs["recipe"], mine))
        raise SearchError(f"{where} was started with another recipe (differs in {', '.join(diff[:6])}); use "
                          "another --root, search.storage or search.study_name")
    elif attrs.get("objectives") != search.objectives:
        raise SearchError(f"study '{search.study_name}' was started with objectives {attrs.get('objectives')}, "
                          f"not {search.objectives}; use another --root or search.study_name")
    return study


def recipe_setting(search: Any) -> tuple[dict[str, Any], list[str]]:
    """The recipe's own values of the searched keys, as Optuna stores them, and the keys whose
    value lies outside the space (the sampler picks those)."""
    from omegaconf import OmegaConf

    recipe = OmegaConf.structured(search.base)
    params, outside = {}, []
    for p in search.params:
        stored = p.stored_of(OmegaConf.select(recipe, p.key))
        if stored is None:
            outside.append(p.key)
        else:
            params[p.key] = stored
    return params, outside


def queue_recipe_setting(search: Any, study: Any) -> Optional[tuple[dict[str, Any], list[str]]]:
    """search.start_from_recipe: a new study's first trial is the recipe as written, once for all
    workers (the flag is set under the storage file's lock). Returns what `recipe_setting` found
    when this call queued it."""
    if not search.cfg.start_from_recipe:
        return None
    with file_lock(storage_file(search.storage_url)):
        if study.user_attrs.get("recipe_setting_queued") or study.get_trials(deepcopy=False):
            return None
        params, outside = recipe_setting(search)
        if params:
            study.enqueue_trial(params, user_attrs={"recipe_setting": True})
        study.set_user_attr("recipe_setting_queued", True)
    return (params, outside) if params else None


def this_process(number: int) -> dict[str, Any]:
    """The `process` attribute of a running trial: where it runs. It names the trial, because
    Optuna's retry copies a trial's attributes to its successor, which runs elsewhere."""
    return {"trial": number, "host": socket.gethostname(), "pid": os.getpid()}


def _gone(process: Mapping[str, Any], number: int) -> bool:
    """The trial's process ran on this machine and no longer does."""
    if process.get("trial") != number or process.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(process["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, KeyError, TypeError, ValueError):
        return False
    return False


def fail_dead_trials(search: Any, study: Any, storage: Any) -> None:
    """Trials left running by a process of this machine that is gone: failed and retried now
    (a database's heartbeat would tell after 2 x search.heartbeat s; a journal's never)."""
    from optuna.trial import TrialState

    study_id = storage.get_study_id_from_name(search.study_name)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if _gone(t.user_attrs.get("process") or {}, t.number):
            trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
            if storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
                search.echo(f"[distill search] trial {t.number} was left running by a stopped process: retrying it")
                retry_callback(MAX_RETRIES)(study, storage.get_trial(trial_id))


def retry(study: Any, number: int) -> None:
    """Queue a trial stopped by a signal or crash again, with its values and folder (its
    checkpoint resumes); as often as it takes."""
    trial = next(t for t in study.get_trials(deepcopy=False) if t.number == number)
    retry_callback(None)(study, trial)
