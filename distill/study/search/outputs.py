"""What a search writes in its folder, from the study alone, and how `distill report` reads it back.

    trials.md, trials.csv   one row per trial: state, parameters, objectives, duration, a note
    best.yaml | pareto/     the best trial's recipe (or each Pareto-optimal one's), runnable
    plots/                  optimisation history, parameter importances, Pareto front (PNG)
    search.json             what the search is, its state, the best trial(s), importances

Figures need matplotlib; without it they are listed as skipped, with the reason.
"""

from __future__ import annotations

import csv
import io
import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

from distill.config.search_space import MODEL_OBJECTIVES, STATES
from distill.study.search.study import redact


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def recipe_text(search: Any, params: dict[str, Any], header: str) -> str:
    """The user's recipe (interpolations kept) with the command line and `params` applied,
    pointing at the search's teacher and caches, without the search section."""
    from omegaconf import OmegaConf

    node = OmegaConf.load(search.recipe)
    plain = [o for o in search.overrides if not o.startswith("search.")]
    if plain:
        node = OmegaConf.merge(node, OmegaConf.from_dotlist(plain))
    for item in search.shared_overrides(params):
        key, value = item.split("=", 1)
        OmegaConf.update(node, key, value, merge=False)
    for key, value in params.items():
        OmegaConf.update(node, key, value, merge=False)
    for i, folder in search.shared_teacher_dirs().items():
        OmegaConf.update(node, f"teachers.{i}.dir", folder, merge=False)
    if "search" in node:
        node.pop("search")
    return header + OmegaConf.to_yaml(node)


# --- the trials ----------------------------------------------------------------------------------
def best_trials(search: Any, study: Any) -> list[Any]:
    from optuna.trial import TrialState

    if not any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
        return []
    if len(search.objectives) == 1:
        return [study.best_trial]
    return sorted(study.best_trials, key=lambda t: t.number)


def rows(search: Any, study: Any) -> list[dict[str, Any]]:
    best = {t.number for t in best_trials(search, study)}
    mark = "best" if len(search.objectives) == 1 else "pareto"
    out = []
    trials = study.get_trials(deepcopy=False)
    folder_of = {t.number: t.user_attrs.get("folder", f"trial-{t.number}") for t in trials}
    for t in trials:
        state = t.state.name.lower()
        note = t.user_attrs.get("error", "")
        if state == "fail" and not note:
            later = [u.number for u in trials if u.number > t.number and folder_of[u.number] == folder_of[t.number]]
            note = f"stopped (signal or crash); continued by trial {later[0]}" if later else "stopped (signal or crash)"
        if state == "pruned" and t.intermediate_values:
            step = max(t.intermediate_values)
            unit = "epoch" if search.by_epoch() else "step"
            note = f"at {unit} {step}: {search.objectives[0]} {t.intermediate_values[step]:.4g}"
        if t.user_attrs.get("recipe_setting"):
            note = "the recipe's own setting" + ("; " + note if note else "")
        if folder_of[t.number] != f"trial-{t.number}":
            note = (note + "; " if note else "") + f"continues {folder_of[t.number]}"
        values = dict(zip(search.objectives, t.values or []))
        duration = t.duration.total_seconds() if t.duration else None
        row = {"trial": t.number, "state": state + (f" ({mark})" if t.number in best else ""),
               "folder": folder_of[t.number]}
        values_of = search.recipe_values(t)
        row.update({p.key: values_of.get(p.key) for p in search.params})
        row.update({f"{o} ({MODEL_OBJECTIVES.get(o, 'validation')})": values.get(o) for o in search.objectives})
        row["duration (s)"] = None if duration is None else round(duration, 1)
        row["note"] = note
        out.append(row)
    return out


def gain(search: Any, study: Any) -> Optional[dict[str, Any]]:
    """The recipe's own setting against the best trial (validation), one objective."""
    from optuna.trial import TrialState

    own = next((t for t in study.get_trials(deepcopy=False)
                if t.user_attrs.get("recipe_setting") and t.state == TrialState.COMPLETE), None)
    best = best_trials(search, study)
    if own is None or not best or len(search.objectives) != 1:
        return None
    top = best[0]
    return {"recipe_trial": own.number, "recipe_value": own.values[0], "best_trial": top.number,
            "best_value": top.values[0], "gain": top.values[0] - own.values[0]}


def gain_lines(search: Any, study: Any) -> list[str]:
    g = gain(search, study)
    if g is None:
        return []
    o = search.objectives[0]
    if g["best_trial"] == g["recipe_trial"]:
        return [f"The recipe's own setting (trial {g['recipe_trial']}) is still the best: {o} "
                f"{g['recipe_value']:.4g} on validation.", ""]
    return [f"The recipe's own setting (trial {g['recipe_trial']}): {o} {g['recipe_value']:.4g} on validation; "
            f"the best (trial {g['best_trial']}): {g['best_value']:.4g} ({g['gain']:+.4g}).", ""]


def table(search: Any, study: Any) -> str:
    found = rows(search, study)
    head = ["trial", "state", *[p.key for p in search.params],
            *[f"{o} ({MODEL_OBJECTIVES.get(o, 'validation')})" for o in search.objectives], "duration (s)", "note"]
    lines = [f"# Search `{search.study_name}`: {len(found)} trials",
             "",
             f"Objectives: {', '.join(f'{o} ({d})' for o, d in zip(search.objectives, search.directions))}; "
             f"sampler {search.cfg.sampler}, pruner {search.pruner}; storage {redact(search.storage_url)}.",
             "", *gain_lines(search, study),
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in found:
        lines.append("| " + " | ".join(fmt(row.get(h)).replace("|", "\\|") for h in head) + " |")
    return "\n".join(lines) + "\n"


def write_info(search: Any, study: Any, extra: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    info = {
        "kind": "distill-search",
        "study_name": search.study_name,
        "storage": redact(search.storage_url),
        "recipe": os.path.abspath(search.recipe),
        "overrides": search.overrides,
        "objectives": search.objectives,
        "directions": search.directions,
        "sampler": search.cfg.sampler,
        "pruner": search.pruner,
        "space": {p.key: p.describe() for p in search.params},
        "trials_wanted": search.cfg.trials,
        "states": {s: sum(t.state == getattr(TrialState, s.upper()) for t in trials) for s in STATES},
        "best": [
            {"trial": t.number, "folder": t.user_attrs.get("folder"), "params": search.recipe_values(t),
             "values": dict(zip(search.objectives, t.values)),
             "recipe": "best.yaml" if len(search.objectives) == 1 else f"pareto/trial-{t.number}.yaml"}
            for t in best_trials(search, study)
        ],
        "recipe_setting": gain(search, study),
        **(extra or {}),
    }
    atomic_write(search.root / "search.json", json.dumps(info, indent=2, default=str))
    return info


def write_outputs(search: Any, study: Any, plots: bool = True) -> dict[str, Any]:
    """trials.md/.csv, the best recipe(s), search.json and (with plots) the PNG figures."""
    root = search.root
    atomic_write(root / "trials.md", table(search, study))
    found = rows(search, study)
    buffer = io.StringIO()
    if found:
        writer = csv.DictWriter(buffer, fieldnames=list(found[0]))
        writer.writeheader()
        writer.writerows(found)
    atomic_write(root / "trials.csv", buffer.getvalue())
    best = best_trials(search, study)
    for t in best:
        values = ", ".join(f"{o}={v:.4g}" for o, v in zip(search.objectives, t.values))
        name = "best.yaml" if len(search.objectives) == 1 else f"pareto/trial-{t.number}.yaml"
        header = (f"# distill search '{search.study_name}': trial {t.number} ({t.user_attrs.get('folder')}), "
                  f"{'best' if len(best) == 1 and len(search.objectives) == 1 else 'Pareto-optimal'}: {values} "
                  f"(validation)\n# run it: distill run {root / name}\n")
        atomic_write(root / name, recipe_text(search, search.recipe_values(t), header))
    if len(search.objectives) > 1 and (root / "pareto").is_dir():
        keep = {f"trial-{t.number}.yaml" for t in best}
        for old in (root / "pareto").glob("trial-*.yaml"):
            if old.name not in keep:  # a trial that a later one dominates
                old.unlink()
    extra: dict[str, Any] = {}
    if plots:
        extra["plots"] = plot(search, study)
        extra["importances"] = importances(search, study)
    return write_info(search, study, extra)


# --- importances and figures ---------------------------------------------------------------------
def _targets(search: Any) -> list[tuple[str, Optional[Callable]]]:
    if len(search.objectives) == 1:
        return [(search.objectives[0], None)]
    return [(o, (lambda t, i=i: t.values[i])) for i, o in enumerate(search.objectives)]


def _importance_problem(study: Any) -> Optional[str]:
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 2:
        return f"needs 2 complete trials, the study has {len(complete)}"
    varying = [k for k in {k for t in complete for k in t.params}
               if len({json.dumps(t.params.get(k), default=str) for t in complete}) > 1]
    if not varying:
        return "no searched parameter varies across the complete trials"
    return None


def _importance_evaluator() -> tuple[Any, str]:
    import optuna

    try:
        import sklearn  # noqa: F401

        return optuna.importance.FanovaImportanceEvaluator(seed=0), "fanova"
    except ImportError:
        return optuna.importance.PedAnovaImportanceEvaluator(), "ped-anova"


def importances(search: Any, study: Any) -> dict[str, Any]:
    """Each parameter's share of the objective's variance (fANOVA when scikit-learn is
    installed, PED-ANOVA otherwise), per objective."""
    import optuna

    problem = _importance_problem(study)
    if problem:
        return {"skipped": problem}
    out: dict[str, Any] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        evaluator, name = _importance_evaluator()
        out["evaluator"] = name
        for objective, target in _targets(search):
            try:
                out[objective] = optuna.importance.get_param_importances(study, evaluator=evaluator, target=target)
            except (ValueError, RuntimeError) as err:
                out[objective] = {"skipped": str(err)}
    return out


def plot(search: Any, study: Any) -> dict[str, str]:
    """PNG figures via Optuna's matplotlib visualisations; a figure that cannot be drawn is
    listed with the reason."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from optuna.visualization import matplotlib as vis
    except ImportError as err:
        return {"all": f"skipped: matplotlib is not installed ({err}); pip install matplotlib"}
    from optuna.trial import TrialState

    folder = search.root / "plots"
    folder.mkdir(parents=True, exist_ok=True)
    done: dict[str, str] = {}
    objectives, multi = search.objectives, len(search.objectives) > 1

    def save(name: str, draw: Callable[[], Any]) -> None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = draw()
            fig = (ax.flat[0] if hasattr(ax, "flat") else ax).get_figure()
            fig.set_size_inches(8, 5)
            fig.tight_layout()
            fig.savefig(folder / name, dpi=110)
            done[name] = str(folder / name)
        except (ValueError, RuntimeError, TypeError, KeyError, IndexError) as err:
            done[name] = f"skipped: {err}"
        finally:
            plt.close("all")

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    for objective, target in _targets(search):
        suffix = f"-{objective}" if multi else ""
        if complete:
            save(f"history{suffix}.png", lambda: vis.plot_optimization_history(study, target=target, target_name=objective))
        else:
            done[f"history{suffix}.png"] = "skipped: no complete trial yet"
        problem = _importance_problem(study)
        if problem:
            done[f"importances{suffix}.png"] = f"skipped: {problem}"
        else:
            evaluator, _ = _importance_evaluator()
            save(f"importances{suffix}.png", lambda: vis.plot_param_importances(
                study, evaluator=evaluator, target=target, target_name=objective))
    if multi:
        if len(objectives) > 3:
            done["pareto.png"] = "skipped: a Pareto plot shows 2 or 3 objectives"
        elif not complete:
            done["pareto.png"] = "skipped: no complete trial yet"
        else:
            save("pareto.png", lambda: vis.plot_pareto_front(study, target_names=objectives))
    return done


# --- reading a search folder (distill report) ----------------------------------------------------
def is_search_folder(path: str | Path) -> bool:
    info = Path(path) / "search.json"
    if not info.is_file():
        return False
    try:
        return json.loads(info.read_text()).get("kind") == "distill-search"
    except (OSError, ValueError):
        return False


def search_report(path: str | Path) -> str:
    """The trials table and best trial(s) of a search folder, from its files alone."""
    root = Path(path)
    info = json.loads((root / "search.json").read_text())
    text = (root / "trials.md").read_text() if (root / "trials.md").is_file() else "(no trials table yet)\n"
    lines = [text.rstrip(), ""]
    states = ", ".join(f"{n} {s}" for s, n in info.get("states", {}).items() if n)
    lines.append(f"States: {states or 'no trials yet'}.")
    for best in info.get("best", []):
        values = ", ".join(f"{k}={v:.4g}" for k, v in best["values"].items())
        lines.append(f"Best: trial {best['trial']} ({values}) -> {root / best['recipe']}")
    for objective, shares in (info.get("importances") or {}).items():
        if isinstance(shares, dict) and shares and all(isinstance(v, (int, float)) for v in shares.values()):
            lines.append(f"Importances ({objective}): " + ", ".join(f"{k} {v:.2f}" for k, v in shares.items()))
    return "\n".join(lines) + "\n"
