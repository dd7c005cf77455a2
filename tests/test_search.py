"""`distill search`: the space, the section's checks, trials as stages (resume, retries, pruning,
Pareto), workers sharing one SQLite file or journal file, the processes of one worker, launch
scripts, and tiny searches through the CLI with the real stages.

Most tests put a fake stage runner where the search looks up `run_stage` (it resolves stage names
with the loop's own planner and writes metrics.json like a real stage, from a score that depends
on the trial's values), so the search's own logic runs in a fraction of a second.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from distill.config import Config, ConfigError, SearchConfig, leaf_types, load_config
from distill.config.search_space import (
    Param, SearchError, direction, parse_duration, parse_space, pruner_name, resolve_objectives,
)
from distill.errors import Preempted
from distill.study.search.command import main as search_main
from distill.study.search.team import Team
from distill.study.search.trials import Pruning, Search, trial_latency, trial_macs
from tests.search_fakes import FakeStage, fake_score

REPO = Path(__file__).resolve().parents[1]
LEAVES = leaf_types(Config)


def space_of(space: dict) -> list[Param]:
    return parse_space(space, LEAVES)


def use(monkeypatch, runner: FakeStage) -> FakeStage:
    """Stages run as `runner` (where the search looks up the loop's run_stage)."""
    monkeypatch.setattr("distill.loop.train.run_stage", runner)
    return runner


def fake_recipe(folder: Path, search: str, name: str = "polarity") -> Path:
    """A classification recipe (never trained: the runner is fake) with a search section."""
    recipe = folder / f"{name}.yaml"
    recipe.write_text(textwrap.dedent("""\
        task: {family: classification, name: %s}
        data: {files: {train: t.jsonl, validation: v.jsonl}}
        teacher: {model: some/teacher}
        student: {num_layers: 2}
        train: {lr: 5e-5, epochs: 3}
        tracking: {report_to: []}
        output_dir: runs/x
        search:
        """ % name) + textwrap.indent(textwrap.dedent(search), "  "))
    return recipe


@pytest.fixture
def no_preflight(monkeypatch):
    """The fake runs have no data or models to check; preflight is covered end to end below."""
    monkeypatch.setattr(Search, "preflight", lambda self: None)


def study_of(root: Path, name: str = "polarity") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{root / 'study.db'}")


SPACE = textwrap.dedent("""\
    sampler: random
    space:
      train.lr: {low: 1e-4, high: 1e-2, log: true}
      distill.temperature: [1, 2, 5]
      distill.kd_loss: [kl, ce]
    """)


# --- the space -----------------------------------------------------------------------------------
def test_space_kinds_and_suggestions():
    params = space_of({
        "train.lr": {"low": "1e-5", "high": 1e-4, "log": True},  # YAML reads 1e-5 as a string
        "train.batch_size": {"low": 8, "high": 32, "step": 8},
        "distill.ce_weight": {"low": 0.0, "high": 1.0, "step": 0.25},
        "distill.temperature": [1, 2, 5],
        "student": {"from_teacher_layers": [[0, 5], [0, 3, 5]]},  # nested, as the command line gives it
    })
    by_key = {p.key: p for p in params}
    assert by_key["train.lr"] == Param("train.lr", "float", 1e-5, 1e-4, log=True)
    assert by_key["train.batch_size"] == Param("train.batch_size", "int", 8, 32, step=8)
    assert by_key["distill.ce_weight"].step == 0.25
    assert by_key["distill.temperature"].choices == (1.0, 2.0, 5.0)  # a float key's choices are floats
    layers = by_key["student.from_teacher_layers"]
    assert layers.labels == ("[0,5]", "[0,3,5]")  # Optuna stores list choices by their text
    fixed = optuna.trial.FixedTrial({"train.lr": 3e-5, "train.batch_size": 24, "distill.ce_weight": 0.5,
                                     "distill.temperature": 2.0, "student.from_teacher_layers": "[0,3,5]"})
    values = {p.key: p.suggest(fixed) for p in params}
    assert values == {"train.lr": 3e-5, "train.batch_size": 24, "distill.ce_weight": 0.5,
                      "distill.temperature": 2.0, "student.from_teacher_layers": [0, 3, 5]}
    assert layers.value_of("[0,5]") == [0, 5]


@pytest.mark.parametrize("space, message", [
    ({"train.lrr": [1e-4]}, "'train.lrr' is not a recipe key. Did you mean 'train.lr'?"),
    ({"distill.temprature": [1, 2]}, "Did you mean 'distill.temperature'"),
    ({"train.lr": {"low": 1e-3, "high": 1e-4}}, "inverted range: low=0.001 is above high=0.0001"),
    ({"train.lr": {"low": 1e-4, "high": 1e-4}}, "empty range"),
    ({"train.lr": {"low": 0, "high": 1e-3, "log": True}}, "log-scale range needs low > 0"),
    ({"train.lr": {"low": 1e-5}}, "needs both low and high"),
    ({"train.lr": {"low": 1e-5, "hihg": 1e-4}}, "unknown range key 'hihg'. Did you mean 'high'?"),
    ({"train.lr": {"min": 1e-5, "max": 1e-4}}, "a range needs low and high"),
    ({"train.lr": {"low": "fast", "high": 1e-4}}, "low must be a number"),
    ({"train.lr": {"low": 1e-5, "high": 1e-3, "log": True, "step": 1e-5}}, "step and log exclude each other"),
    ({"train.batch_size": {"low": 8, "high": 30, "step": 8}}, "not a multiple of step"),
    ({"train.batch_size": {"low": 8.5, "high": 32}}, "integer key"),
    ({"distill.kd_loss": {"low": 0, "high": 1}}, "search it with a list of choices"),
    ({"distill.kd_loss": []}, "an empty list of choices"),
    ({"distill.kd_loss": ["kl", "kl"]}, "listed twice"),
    ({"train.lr": 1e-4}, "neither a range"),
    ({"output_dir": ["a", "b"]}, "cannot be searched"),
    ({"teacher.dir": ["a", "b"]}, "cannot be searched"),
])
def test_space_errors(space: dict, message: str):
    with pytest.raises(SearchError, match=message.replace("(", r"\(").replace("[", r"\[").replace("?", r"\?")):
        space_of(space)


def test_time_budget_and_directions():
    assert parse_duration("2h") == 7200 and parse_duration("30m") == 1800
    assert parse_duration("1h30m") == 5400 and parse_duration("5400") == 5400 and parse_duration(90) == 90
    for bad in ("2 hours", "h", "0", "-5m"):
        with pytest.raises(SearchError, match="time_budget"):
            parse_duration(bad)
    assert [direction(o) for o in ("accuracy", "f1", "loss", "latency", "macs")] == \
        ["maximize", "maximize", "minimize", "minimize", "minimize"]


# --- the section, checked with the recipe ---------------------------------------------------------
@pytest.mark.parametrize("family, search, message", [
    ("classification", "{objectives: [f1]}", "'f1' is not produced by a classification task; choose among accuracy, loss"),
    ("qa", "{objectives: [accuracy]}", "choose among exact_match, f1, loss"),
    ("classification", "{objectives: [latency]}", "has no task metric"),
    ("classification", "{objectives: [accuracy, accuracy]}", "twice"),
    ("classification", "{objectives: [accuracy, latency], pruner: median}", "single-objective studies only"),
    ("classification", "{objectives: [accuracy, macs], sampler: cmaes}", "handles one objective"),
    ("classification", "{sampler: tpee}", "Did you mean 'tpe'"),
    ("classification", "{pruner: asha}", "search.pruner='asha' is not one of"),
    ("classification", "{time_budget: two hours}", "not a duration"),
    ("classification", "{trials: 0}", "search.trials=0 is out of range"),
    ("classification", "{storage: runs/study.db}", "not a database URL"),
    ("classification", "{latency: {seq: 0}}", "search.latency.seq=0 is out of range"),
    ("classification", "{space: {train: {lr: {low: 1e-3, high: 1e-4}}}}", "inverted range"),
])
def test_section_errors_stop_the_recipe(tmp_path: Path, family: str, search: str, message: str):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [f"task.family={family}", "student.model=x", f"search={search}"])


def test_section_defaults_and_command_line_form():
    cfg = load_config(None, ["task.family=tagging", "student.model=x", "search.trials=5",
                             "search.space.distill.temperature=[1,2]"])
    assert resolve_objectives(cfg) == ["f1"]  # the family's headline metric
    assert pruner_name(cfg, ["f1"]) == "hyperband"
    assert pruner_name(cfg, ["f1", "latency"]) == "none"  # the default never blocks a Pareto search
    assert [p.key for p in space_of(cfg.search.space)] == ["distill.temperature"]


def test_a_command_line_space_entry_replaces_the_recipes(tmp_path: Path, no_preflight, monkeypatch, capsys):
    """`search.space.<key>=...` on the command line (as docs/search.md shows it) replaces the
    recipe's entry for that key, whether the recipe writes it dotted or nested."""
    recipe = fake_recipe(tmp_path, SPACE + "trials: 3\npruner: none\n")
    over = ["search.space.distill.temperature=[2,4]", "search.space.train.lr={low: 1e-3, high: 1e-2}"]
    params = {p.key: p for p in Search(recipe, over, tmp_path / "s").params}
    assert sorted(params) == ["distill.kd_loss", "distill.temperature", "train.lr"]
    assert params["distill.temperature"].choices == (2.0, 4.0)
    assert (params["train.lr"].low, params["train.lr"].high, params["train.lr"].log) == (1e-3, 1e-2, False)
    root = tmp_path / "search"
    assert search_main([str(recipe), *over, "--root", str(root), "--dry-run"]) == 0
    assert "distill.temperature: one of 2.0, 4.0" in capsys.readouterr().out
    runner = use(monkeypatch, FakeStage())
    assert search_main([str(recipe), *over, "--root", str(root)]) == 0
    assert {runner.configs[f"trial-{n}"].distill.temperature for n in range(3)} <= {2.0, 4.0}
    # the recipe's nested form is replaced alike; one recipe giving a key both ways is refused
    nested = fake_recipe(tmp_path, "trials: 3\nspace: {distill: {temperature: [1, 2]}}\n", name="nested")
    assert space_of(load_config(nested, over[:1]).search.space)[0].choices == (2.0, 4.0)
    both = fake_recipe(tmp_path, "trials: 3\nspace: {distill.temperature: [1], distill: {temperature: [2]}}\n",
                       name="both")
    with pytest.raises(ConfigError, match="search.space: 'distill.temperature' is given twice"):
        load_config(both)


def test_keys_inside_config_overrides_can_be_searched(tmp_path: Path, no_preflight, monkeypatch):
    """`student.config_overrides` is a mapping: a key inside it is searched like any recipe key,
    in the recipe or on the command line, as a list of choices or a range."""
    recipe = fake_recipe(tmp_path, textwrap.dedent("""\
        trials: 4
        sampler: bruteforce
        pruner: none
        space:
          student:
            config_overrides: {hidden_dropout_prob: [0.0, 0.2]}
        """))
    over = ["search.space.student.config_overrides.attention_probs_dropout_prob=[0.0,0.1]"]
    keys = ["student.config_overrides.hidden_dropout_prob", "student.config_overrides.attention_probs_dropout_prob"]
    assert [p.key for p in Search(recipe, over, tmp_path / "s").params] == keys
    ranged = load_config(recipe, ["search.space.student.config_overrides.hidden_dropout_prob={low: 0.0, high: 0.3}"])
    assert space_of(ranged.search.space)[0] == Param(keys[0], "float", 0.0, 0.3)
    root = tmp_path / "search"
    runner = use(monkeypatch, FakeStage())
    assert search_main([str(recipe), *over, "--root", str(root)]) == 0
    trials = study_of(root).trials
    assert {tuple(t.params[k] for k in keys) for t in trials} == {(0.0, 0.0), (0.0, 0.1), (0.2, 0.0), (0.2, 0.1)}
    for t in trials:
        overrides = runner.configs[f"trial-{t.number}"].student.config_overrides
        assert overrides == {"hidden_dropout_prob": t.params[keys[0]], "attention_probs_dropout_prob": t.params[keys[1]]}
    best = load_config(root / "best.yaml")
    assert best.student.config_overrides["hidden_dropout_prob"] in (0.0, 0.2)


def test_the_storage_may_be_a_journal_file(tmp_path: Path, no_preflight, monkeypatch):
    from distill.config.search_space import journal_path

    assert journal_path("journal:///runs/study.log") == "runs/study.log"
    assert journal_path("journal:////shared/study.log") == "/shared/study.log"
    assert journal_path("/shared/study.journal") == "/shared/study.journal" and journal_path("runs/s.db") is None
    journal = tmp_path / "shared" / "study.log"
    recipe = fake_recipe(tmp_path, SPACE + f"trials: 3\npruner: none\nstorage: {journal}\n")
    root = tmp_path / "search"
    use(monkeypatch, FakeStage())
    assert search_main([str(recipe), "--root", str(root)]) == 0
    assert journal.is_file() and not (root / "study.db").exists()
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    trials = optuna.load_study(study_name="polarity", storage=storage).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    assert f"storage journal:///{journal}" not in (root / "trials.md").read_text()  # the path as given
    assert f"storage {journal}" in (root / "trials.md").read_text()


def test_every_end_of_the_space_must_make_a_valid_recipe(tmp_path: Path):
    recipe = fake_recipe(tmp_path, "trials: 2\nspace: {distill.kd_loss: [kl, kld]}\n")
    with pytest.raises(SearchError, match="search.space.distill.kd_loss: the value 'kld' is not valid here: "
                                            "distill.kd_loss='kld' is not one of: kl, ce, mse"):
        Search(recipe, [], tmp_path / "s").preflight()
    recipe = fake_recipe(tmp_path, "trials: 2\nspace: {train.warmup_ratio: {low: 0.0, high: 1.0}}\n")
    with pytest.raises(SearchError, match="train.warmup_ratio: the value 1.0 is not valid here: "
                                            "train.warmup_ratio=1.0 is out of range"):
        Search(recipe, [], tmp_path / "s").preflight()
    recipe = fake_recipe(tmp_path, "trials: 2\nspace: {train.lr: [1e-4, 1e-3]}\n")
    with pytest.raises(SearchError, match="scores trials on the validation split, and this recipe has none"):
        Search(recipe, ["data.splits.validation=null"], tmp_path / "s").preflight()
    with pytest.raises(SearchError, match="sampler_options .* do not fit TPESampler"):
        Search(recipe, ["search.sampler_options={n_startup: 3}"], tmp_path / "s")
    with pytest.raises(SearchError, match="pruner_options are set but search.pruner=none"):
        Search(recipe, ["search.pruner=none", "search.pruner_options={n_startup_trials: 3}"], tmp_path / "s")
    with pytest.raises(SearchError, match="the search has no end"):
        Search(recipe, ["search.trials=null"], tmp_path / "s").run()


# --- trials as stages ----------------------------------------------------------------------------
def test_search_shares_the_teacher_and_writes_the_best_recipe(tmp_path: Path, no_preflight, monkeypatch):
    recipe = fake_recipe(tmp_path, SPACE + "trials: 5\npruner: none\n")
    root = tmp_path / "search"
    runner = use(monkeypatch, FakeStage())
    assert search_main([str(recipe), "--root", str(root)]) == 0
    assert runner.calls[0] == ("teacher", "teacher") and [c for c in runner.calls if c[0] == "teacher"] == [runner.calls[0]]
    folders = [name for stage, name in runner.calls if stage == "student"]
    assert folders == [f"trial-{n}" for n in range(5)]
    for name in folders:
        cfg = runner.configs[name]
        assert cfg.teacher.dir == str(root / "teacher") and cfg.distill.cache_dir == str(root / "teacher_cache")
        assert cfg.output_dir == str(root / name) and cfg.search == SearchConfig()

    study = study_of(root)
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 5
    for t in complete:  # each value is the fake score of the config the trial trained
        assert t.values[0] == pytest.approx(fake_score(runner.configs[f"trial-{t.number}"]))
    best = max(complete, key=lambda t: t.values[0])
    text = (root / "best.yaml").read_text()
    assert text.startswith(f"# distill search 'polarity': trial {best.number} (trial-{best.number}), best")
    cfg = load_config(root / "best.yaml")
    assert cfg.train.lr == pytest.approx(best.params["train.lr"])
    assert (cfg.distill.temperature, cfg.distill.kd_loss) == (best.params["distill.temperature"], best.params["distill.kd_loss"])
    assert cfg.teacher.dir == str(root / "teacher") and cfg.search == SearchConfig()
    assert cfg.output_dir == "runs/x"  # the user's own output folder

    table = (root / "trials.md").read_text()
    assert table.count("| complete") == 5 and f"| {best.number} | complete (best) |" in table
    info = json.loads((root / "search.json").read_text())
    assert info["best"][0]["trial"] == best.number and info["states"]["complete"] == 5
    assert set(info["importances"]["accuracy"]) == {"train.lr", "distill.temperature", "distill.kd_loss"}
    assert (root / "plots" / "history.png").stat().st_size > 1000
    assert (root / "plots" / "importances.png").stat().st_size > 1000

    # `distill report` reads the folder
    from distill.study import report

    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert report.main([str(root)]) == 0
    assert f"Best: trial {best.number}" in out.getvalue() and "| trial | state | train.lr |" in out.getvalue()


def test_resume_continues_the_count_and_never_reruns_a_trial(tmp_path: Path, no_preflight, monkeypatch):
    recipe = fake_recipe(tmp_path, SPACE + "pruner: none\n")
    root = tmp_path / "search"
    first = FakeStage()
    use(monkeypatch, first)
    assert search_main([str(recipe), "search.trials=3", "--root", str(root)]) == 0
    assert [n for s, n in first.calls if s == "student"] == ["trial-0", "trial-1", "trial-2"]
    again = FakeStage()
    use(monkeypatch, again)
    assert search_main([str(recipe), "search.trials=3", "--root", str(root)]) == 0
    assert again.calls == []  # the budget is spent; the teacher folder is complete
    more = FakeStage()
    use(monkeypatch, more)
    assert search_main([str(recipe), "search.trials=5", "--root", str(root)]) == 0
    assert more.calls == [("student", "trial-3"), ("student", "trial-4")]
    trials = study_of(root).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 5
    # the resumed run drew new points, not the first run's sequence again
    assert trials[3].params != trials[0].params and trials[4].params != trials[1].params
    # another recipe on the same storage is refused, naming what differs
    with pytest.raises(SearchError, match=r"started with another recipe \(differs in train.epochs\)"):
        Search(recipe, ["train.epochs=4", "search.trials=6"], root).run()


def test_the_first_trial_runs_the_recipe_as_written(tmp_path: Path, no_preflight, monkeypatch):
    # train.lr=5e-5 lies outside the space: the sampler picks it; the other two keys keep the recipe's values
    recipe = fake_recipe(tmp_path, SPACE + "trials: 4\npruner: none\n")
    root = tmp_path / "search"
    runner = use(monkeypatch, FakeStage())
    assert search_main([str(recipe), "distill.temperature=5", "distill.kd_loss=ce", "--root", str(root)]) == 0
    trials = study_of(root).trials
    first = trials[0]
    assert first.user_attrs["recipe_setting"] is True and not any(t.user_attrs.get("recipe_setting") for t in trials[1:])
    assert (first.params["distill.temperature"], first.params["distill.kd_loss"]) == (5, "ce")
    assert 1e-4 <= first.params["train.lr"] <= 1e-2
    cfg = runner.configs["trial-0"]
    assert (cfg.distill.temperature, cfg.distill.kd_loss) == (5, "ce")
    info = json.loads((root / "search.json").read_text())
    best = max(trials, key=lambda t: t.values[0])
    assert info["recipe_setting"] == {"recipe_trial": 0, "recipe_value": pytest.approx(first.values[0]),
                                      "best_trial": best.number, "best_value": pytest.approx(best.values[0]),
                                      "gain": pytest.approx(best.values[0] - first.values[0])}
    table = (root / "trials.md").read_text()
    assert "| 0 | complete" in table and "the recipe's own setting |" in table
    expected = ("The recipe's own setting (trial 0) is still the best: accuracy" if best.number == 0
                else "The recipe's own setting (trial 0): accuracy")
    assert expected in table
    # a resumed study never queues it again
    use(monkeypatch, FakeStage())
    assert search_main([str(recipe), "distill.temperature=5", "distill.kd_loss=ce", "search.trials=6", "--root", str(root)]) == 0
    assert sum(bool(t.user_attrs.get("recipe_setting")) for t in study_of(root).trials) == 1


def test_start_from_recipe_can_be_turned_off(tmp_path: Path, no_preflight, monkeypatch):
    recipe = fake_recipe(tmp_path, SPACE + "trials: 2\npruner: none\nstart_from_recipe: false\n")
    root = tmp_path / "search"
    use(monkeypatch, FakeStage())
    assert search_main([str(recipe), "--root", str(root)]) == 0
    assert not any(t.user_attrs.get("recipe_setting") for t in study_of(root).trials)
    assert "recipe's own setting" not in (root / "trials.md").read_text()


def test_recipe_values_map_onto_the_space():
    from distill.config.search_space import Param

    assert Param("a", "float", 0.0, 1.0).stored_of(0.25) == 0.25
    assert Param("a", "float", 0.0, 1.0).stored_of(1.5) is None
    assert Param("a", "float", 0.0, 1.0, step=0.5).stored_of(0.25) is None
    assert Param("a", "int", 1, 9, step=2).stored_of(5) == 5 and Param("a", "int", 1, 9, step=2).stored_of(4) is None
    assert Param("t", "choice", choices=(1, 2, 5)).stored_of(2.0) == 2
    assert Param("t", "choice", choices=(1, 2, 5)).stored_of(True) is None
    assert Param("b", "choice", choices=(True, False)).stored_of(1) is None
    layers = Param("l", "choice", choices=([0, 5], [0, 3, 5]))
    assert layers.value_of(layers.stored_of([0, 3, 5])) == [0, 3, 5] and layers.stored_of([1]) is None
    assert Param("a", "float", 0.0, 1.0).stored_of("x") is None


def test_several_teachers_are_fine_tuned_once_and_shared(tmp_path: Path, no_preflight, monkeypatch):
    recipe = tmp_path / "ensemble.yaml"
    mine = tmp_path / "my-teacher"
    recipe.write_text(textwrap.dedent("""\
        task: {family: classification, name: polarity}
        data: {files: {train: t.jsonl, validation: v.jsonl}}
        teachers:
          - {model: some/teacher, seed: 1}
          - {model: other/teacher, finetuned: true}
          - {model: some/teacher, seed: 2, dir: %s}
        student: {num_layers: 2}
        train: {lr: 5e-5, epochs: 3}
        tracking: {report_to: []}
        output_dir: runs/x
        search:
        """ % mine) + textwrap.indent(SPACE + "trials: 3\npruner: none\n", "  "))
    root = tmp_path / "search"
    runner = use(monkeypatch, FakeStage())
    assert search_main([str(recipe), "--root", str(root)]) == 0
    # teachers[0] and [2] fine-tuned once, before any trial; teachers[1] is taken as it is
    assert runner.calls[:2] == [("teacher-0", "teacher-0"), ("teacher-2", "my-teacher")]
    assert [c for c in runner.calls if c[0].startswith("teacher")] == runner.calls[:2]
    assert (runner.configs["teacher-0"].seed, runner.configs["my-teacher"].seed) == (1, 2)  # each its own
    for name in ("trial-0", "trial-1", "trial-2"):
        dirs = [t.dir for t in runner.configs[name].teachers]
        assert dirs == [str(root / "teacher-0"), None, str(mine)]
    best = load_config(root / "best.yaml")
    assert [t.dir for t in best.teachers] == [str(root / "teacher-0"), None, str(mine)]
    assert best.teachers[1].finetuned and best.search == SearchConfig()
    # a teacher key in the space cannot mean one of several teachers
    bad = recipe.read_text().replace("space:", "space:\n    teacher.lr: [1e-5, 2e-5]")
    recipe.write_text(bad)
    with pytest.raises(SearchError, match=r"teacher.lr set the single `teacher:`.*lists `teachers:`"):
        Search(recipe, [], tmp_path / "other")


def test_the_teacher_stage_trains_with_the_teachers_own_seed(tmp_path: Path, no_preflight, monkeypatch):
    """The search runs the `teacher` stage as `distill run` does: the loop resolves the teacher's
    own seed; the search sets none of its own for it, nor for the trials."""
    recipe = fake_recipe(tmp_path, SPACE + "trials: 2\npruner: none\n")
    recipe.write_text(recipe.read_text().replace("teacher: {model: some/teacher}", "teacher: {model: some/teacher, seed: 3}"))
    runner = use(monkeypatch, FakeStage())
    assert search_main([str(recipe), "--root", str(tmp_path / "search")]) == 0
    assert runner.configs["teacher"].seed == 3
    assert runner.configs["trial-0"].seed == runner.configs["trial-1"].seed == 42  # the recipe's


def test_a_stopped_trial_is_retried_in_its_own_folder(tmp_path: Path, no_preflight, monkeypatch):
    recipe = fake_recipe(tmp_path, SPACE + "trials: 3\npruner: none\n")
    root = tmp_path / "search"
    runner = use(monkeypatch, FakeStage(preempt="trial-1"))
    with pytest.raises(Preempted):
        search_main([str(recipe), "--root", str(root)])
    trials = study_of(root).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.WAITING]
    assert trials[2].params == trials[1].params and trials[2].user_attrs["folder"] == "trial-1"

    assert search_main([str(recipe), "--root", str(root)]) == 0
    students = [n for s, n in runner.calls if s == "student"]
    assert students == ["trial-0", "trial-1", "trial-1", "trial-3"]  # trial-1 resumed, then one new trial
    assert runner.configs["trial-1"].train.lr == pytest.approx(trials[1].params["train.lr"])
    states = [t.state for t in study_of(root).trials]
    assert states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    table = (root / "trials.md").read_text()
    assert "continues trial-1" in table and "| stopped (signal or crash); continued by trial 2 |" in table


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # the orphan is made by hand, outside optimize
def test_a_trial_left_running_by_a_dead_process_is_retried(tmp_path: Path, no_preflight, monkeypatch):
    recipe = fake_recipe(tmp_path, SPACE + "trials: 2\npruner: none\n")
    root = tmp_path / "search"
    use(monkeypatch, FakeStage())
    search = Search(recipe, [], root)
    study = search.study()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = study.ask({"train.lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)})
    orphan.set_user_attr("folder", "trial-0")
    orphan.set_user_attr("process", {"trial": 0, "host": __import__("socket").gethostname(), "pid": dead.pid})
    search.run()
    trials = study_of(root).trials
    assert trials[0].state == TrialState.FAIL
    assert trials[1].user_attrs["folder"] == "trial-0" and trials[1].state == TrialState.COMPLETE
    assert trials[1].params["train.lr"] == trials[0].params["train.lr"]
    assert search.used(trials) == 2


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")  # retried_trial_number
def test_a_trial_whose_heartbeat_goes_stale_is_retried(tmp_path: Path, no_preflight, monkeypatch):
    """A worker on another machine beat once and went silent: after two heartbeats Optuna fails
    its trial and its retry callback queues a copy, which the next trial resumes in its folder."""
    recipe = fake_recipe(tmp_path, SPACE + "trials: 2\npruner: none\nheartbeat: 1\nstart_from_recipe: false\n")
    root = tmp_path / "search"
    runner = use(monkeypatch, FakeStage())
    search = Search(recipe, [], root)
    study, storage = search.study(), search.storage()
    with pytest.warns(UserWarning, match="Heartbeat of storage"):  # a trial asked for outside optimize
        silent = study.ask({"train.lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)})
    silent.set_user_attr("folder", "trial-0")
    silent.set_user_attr("process", {"trial": 0, "host": "another-machine", "pid": 1})
    study_id = storage.get_study_id_from_name("polarity")
    storage.record_heartbeat(storage.get_trial_id_from_study_id_trial_number(study_id, silent.number))
    time.sleep(3.5)  # longer than the grace period of 2 heartbeats (SQLite keeps whole seconds)
    search.run()
    trials = study_of(root).trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert trials[1].user_attrs["folder"] == "trial-0"
    assert trials[1].params["train.lr"] == trials[0].params["train.lr"]  # what the silent trial had chosen
    assert optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(trials[1]) == 0
    assert [n for s, n in runner.calls if s == "student"] == ["trial-0", "trial-2"]
    assert search.used(trials) == 2


def test_two_workers_never_take_the_same_waiting_trial(tmp_path: Path):
    """Two workers asking a SQLite study for trials at the same instant each get their own (the
    queued ones included): the storage takes its write lock before it checks a trial is free."""
    import multiprocessing

    from distill.study.search.study import make_storage
    from tests.search_fakes import take_waiting_trials

    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="race", storage=make_storage(url, heartbeat=60))
    for k in range(3):
        study.enqueue_trial({"x": k})
    spawn = multiprocessing.get_context("spawn")
    start, taken = spawn.Barrier(2), spawn.Queue()
    workers = [spawn.Process(target=take_waiting_trials, args=(url, start, taken)) for _ in range(2)]
    for w in workers:
        w.start()
    numbers = [n for _ in workers for n in taken.get(timeout=120)]
    for w in workers:
        w.join(timeout=60)
    assert sorted(numbers) == list(range(6))


def test_a_failing_trial_is_recorded_and_the_search_goes_on(tmp_path: Path, no_preflight, monkeypatch):
    recipe = fake_recipe(tmp_path, SPACE + "trials: 3\npruner: none\n")
    root = tmp_path / "search"
    use(monkeypatch, FakeStage(nan="trial-1"))
    assert search_main([str(recipe), "--root", str(root)]) == 0
    trials = study_of(root).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    assert "non-finite loss" in trials[1].user_attrs["error"]
    assert "| 1 | fail |" in (root / "trials.md").read_text()


def test_pruning_stops_bad_trials_at_their_first_evaluation(tmp_path: Path, no_preflight, monkeypatch):
    search_section = """\
        trials: 4
        space: {train.lr: [1e-3, 1e-1]}
        pruner: median
        pruner_options: {n_startup_trials: 1}
        """
    recipe = fake_recipe(tmp_path, search_section)
    root = tmp_path / "search"
    runner = use(monkeypatch, FakeStage(epochs=4))
    search = Search(recipe, [], root)
    for lr in (1e-3, 1e-1, 1e-3, 1e-1):  # good, bad, good, bad
        search.study().enqueue_trial({"train.lr": lr})
    search.run()
    states = [t.state for t in study_of(root).trials]
    assert states == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.COMPLETE, TrialState.PRUNED]
    # a pruned trial stopped inside its stage after one evaluation; its stage never completed
    assert runner.evaluations == {"trial-0": 4, "trial-1": 1, "trial-2": 4, "trial-3": 1}
    assert not (root / "trial-1" / "student" / "metrics.json").exists()
    assert (root / "trial-1" / "student").is_dir() and not (root / "trial-1" / "student" / "checkpoints").exists()
    assert study_of(root).trials[1].intermediate_values == {1: pytest.approx(fake_score(runner.configs["trial-1"]) / 4)}
    assert "| 1 | pruned |" in (root / "trials.md").read_text() and "at epoch 1: accuracy" in (root / "trials.md").read_text()


def test_pruning_callback_reports_by_step_when_the_loop_evaluates_by_step():
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.NopPruner())
    trial = study.ask()
    by_step = Pruning(trial, "accuracy", by_epoch=False, team=Team())
    by_step(10, 0, {"accuracy": 0.5})
    by_step(20, 0, {"accuracy": 0.6})  # the same epoch: reported at its own step
    assert study.trials[0].intermediate_values == {10: 0.5, 20: 0.6}
    with pytest.raises(SearchError, match="have no 'f1'"):
        Pruning(trial, "f1", by_epoch=True, team=Team())(10, 1, {"accuracy": 0.5})


def test_pareto_front_of_accuracy_and_size(tmp_path: Path, no_preflight, monkeypatch):
    search_section = """\
        trials: 8
        sampler: random
        objectives: [accuracy, parameters]
        space:
          student.num_layers: [1, 2, 3]
          train.lr: {low: 1e-4, high: 1e-2, log: true}
        """
    recipe = fake_recipe(tmp_path, search_section)
    root = tmp_path / "search"
    use(monkeypatch, FakeStage())
    assert search_main([str(recipe), "--root", str(root)]) == 0
    trials = [t for t in study_of(root).trials if t.state == TrialState.COMPLETE]
    assert len(trials) == 8
    points = {t.number: (t.values[0], t.values[1]) for t in trials}
    for t in trials:
        assert t.values[1] == t.params["student.num_layers"]  # millions of parameters, from the stage's info

    def dominated(a, b):  # b dominates a: accuracy >= and size <=, one of them strictly
        return b[0] >= a[0] and b[1] <= a[1] and (b[0] > a[0] or b[1] < a[1])

    front = {n for n, p in points.items() if not any(dominated(p, q) for m, q in points.items() if m != n)}
    written = {int(p.stem.split("-")[1]) for p in (root / "pareto").glob("trial-*.yaml")}
    assert written == front
    for n in front:
        cfg = load_config(root / "pareto" / f"trial-{n}.yaml")
        assert cfg.student.num_layers == points[n][1]
    assert (root / "plots" / "pareto.png").stat().st_size > 1000
    assert (root / "plots" / "history-accuracy.png").exists() and (root / "plots" / "history-parameters.png").exists()
    info = json.loads((root / "search.json").read_text())
    assert {b["trial"] for b in info["best"]} == front
    assert "complete (pareto)" in (root / "trials.md").read_text()


def test_outputs_with_a_single_complete_trial_skip_importances(tmp_path: Path, no_preflight, monkeypatch):
    recipe = fake_recipe(tmp_path, SPACE + "trials: 1\npruner: none\n")
    root = tmp_path / "search"
    use(monkeypatch, FakeStage())
    assert search_main([str(recipe), "--root", str(root)]) == 0
    info = json.loads((root / "search.json").read_text())
    assert info["importances"] == {"skipped": "needs 2 complete trials, the study has 1"}
    assert info["plots"]["importances.png"].startswith("skipped: needs 2 complete trials")
    assert (root / "plots" / "history.png").exists() and (root / "best.yaml").exists()


# --- several workers -----------------------------------------------------------------------------
def test_two_workers_share_one_sqlite_file(tmp_path: Path):
    recipe = fake_recipe(tmp_path, SPACE + "trials: 8\npruner: none\nheartbeat: 5\n")
    root = tmp_path / "search"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    code = "import sys; from tests.search_fakes import run_worker; run_worker(sys.argv[1], sys.argv[2], int(sys.argv[3]))"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(recipe), str(root), str(i)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert not any("database is locked" in out for out in outputs)
    trials = study_of(root).trials
    assert all(t.state == TrialState.COMPLETE for t in trials)
    # a race at the very end may start one extra trial; never fewer, and never a folder twice
    assert 8 <= len(trials) <= 9
    folders = [t.user_attrs["folder"] for t in trials]
    assert sorted(folders) == sorted(f"trial-{t.number}" for t in trials)
    assert {t.user_attrs["worker"] for t in trials} == {0, 1}  # both did work
    assert all((root / f / "student" / "metrics.json").exists() for f in folders)


@pytest.mark.slow
def test_the_processes_of_one_worker_run_the_same_trials(tmp_path: Path):
    """Under torchrun / accelerate launch the main process talks to the study; the other one
    trains the same trial and stops where the main one's pruner says."""
    recipe = fake_recipe(tmp_path, textwrap.dedent("""\
        trials: 4
        space: {train.lr: [1e-3, 1e-1]}
        pruner: median
        pruner_options: {n_startup_trials: 1}
        """))
    root = tmp_path / "search"
    search = Search(recipe, [], root)
    for lr in (1e-3, 1e-1, 1e-3, 1e-1):
        search.study().enqueue_trial({"train.lr": lr})
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    code = "import sys; from tests.search_fakes import run_team; run_team(sys.argv[1], sys.argv[2])"
    script = tmp_path / "team.py"
    script.write_text(code)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(recipe), str(root)], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = sorted((json.loads(line[len("RESULT "):]) for line in proc.stdout.splitlines()
                      if line.startswith("RESULT ")), key=lambda r: r["rank"])
    assert [r["rank"] for r in results] == [0, 1] and [r["code"] for r in results] == [0, 0]
    assert results[0]["students"] == results[1]["students"] == ["trial-0", "trial-1", "trial-2", "trial-3"]
    expected = {"trial-0": 4, "trial-1": 1, "trial-2": 4, "trial-3": 1}  # bad trials pruned at epoch 1, on both
    assert results[0]["evaluations"] == results[1]["evaluations"] == expected
    assert [t.state for t in study_of(root).trials] == [TrialState.COMPLETE, TrialState.PRUNED] * 2


def run_two_processes(tmp_path: Path, recipe: Path, root: Path, trouble: str) -> list[dict]:
    """tests.search_fakes.run_team under torchrun with 2 CPU processes: each one's RESULT line."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    script = tmp_path / "team.py"
    script.write_text("import sys; from tests.search_fakes import run_team; run_team(sys.argv[1], sys.argv[2], sys.argv[3])")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(recipe), str(root), trouble], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=240)
    results = sorted((json.loads(line[len("RESULT "):]) for line in proc.stdout.splitlines()
                      if line.startswith("RESULT ")), key=lambda r: r["rank"])
    assert proc.returncode == 0 and [r["rank"] for r in results] == [0, 1], proc.stderr[-3000:]
    return results


@pytest.mark.slow
def test_a_failure_of_the_main_process_reaches_the_others(tmp_path: Path):
    """The main process fails while it suggests trial 1's values, before it shares them: the
    other process stops at once with an error naming the main process, what it was doing and
    the line that raised, instead of waiting for a trial that never comes."""
    # the pruner's reports keep the processes in step (it prunes nothing before 5 trials)
    recipe = fake_recipe(tmp_path, SPACE + "trials: 3\npruner: median\npruner_options: {n_startup_trials: 5}\n")
    root = tmp_path / "search"
    Search(recipe, [], root).study()  # created here: the processes only open it
    started = time.monotonic()
    main, other = run_two_processes(tmp_path, recipe, root, "fail")
    assert time.monotonic() - started < 200  # far below the wait limit (30 min)
    assert main["code"] == "RuntimeError: the sampler broke"
    assert main["students"] == other["students"] == ["trial-0"]
    assert other["code"] == 2
    assert ("distill search: process 1 of 2 stops: the main process (0) failed while choosing trial 1: "
            "RuntimeError: the sampler broke (raised in troubled, search_fakes.py:") in other["stderr"]


@pytest.mark.slow
def test_the_others_stop_waiting_for_a_silent_main_process(tmp_path: Path):
    """The main process stalls before it shares trial 1 (20 s, against a wait limit of 8 s set
    for the test): the other process gives up with an error instead of waiting forever."""
    # the pruner's reports keep the processes in step (it prunes nothing before 5 trials)
    recipe = fake_recipe(tmp_path, SPACE + "trials: 3\npruner: median\npruner_options: {n_startup_trials: 5}\n")
    root = tmp_path / "search"
    Search(recipe, [], root).study()
    main, other = run_two_processes(tmp_path, recipe, root, "hang")
    assert other["code"] == 2 and other["students"] == ["trial-0"]
    assert ("distill search: process 1 of 2 waited for the main process (0) while choosing the next trial, and "
            "heard nothing within 8 s") in other["stderr"]
    assert main["code"] == 2 and "the main process could not reach the other 1 process(es) while choosing trial 1" \
        in main["stderr"]


def test_workers_write_launch_scripts(tmp_path: Path):
    recipe = fake_recipe(tmp_path, SPACE + "trials: 30\n")
    root = tmp_path / "search"
    assert search_main([str(recipe), "train.epochs=2", "--root", str(root), "--workers", "3",
                   "--slurm-opt", "partition=gpu", "--slurm-opt", "gres=gpu:1"]) == 0
    commands = (root / "commands.sh").read_text()
    assert commands.count(" --prepare") == 1 and commands.count("--worker") == 3
    for i in range(3):
        assert f"CUDA_VISIBLE_DEVICES=${{GPUS[{i}]:-{i}}} accelerate launch -m distill search {recipe} train.epochs=2 --root {root} --worker {i} &" in commands
    assert commands.index("--prepare") < commands.index("--worker 0") < commands.index("--summarize")
    workers = (root / "slurm" / "workers.sbatch").read_text()
    assert "#SBATCH --array=0-2" in workers and '--worker "$SLURM_ARRAY_TASK_ID"' in workers
    assert "#SBATCH --gres=gpu:1" in workers and "scontrol requeue" in workers
    assert "gres" not in (root / "slurm" / "summary.sbatch").read_text()
    submit = (root / "slurm" / "submit.sh").read_text()
    assert "--dependency=afterok:$t" in submit and "--dependency=afterany:$w" in submit
    for name in ("commands.sh", "slurm/teacher.sbatch", "slurm/workers.sbatch", "slurm/summary.sbatch", "slurm/submit.sh"):
        subprocess.run(["bash", "-n", str(root / name)], check=True)  # valid shell
    assert not (root / "study.db").exists()  # writing scripts trains nothing


# --- model objectives ----------------------------------------------------------------------------
def test_latency_and_macs_of_a_saved_model(tiny_bert_dir: Path):
    from distill.config import SearchLatencyConfig
    from distill.bench.flops import count
    from transformers import AutoConfig

    timing = trial_latency(tiny_bert_dir, SearchLatencyConfig(batch=2, seq=16, runs=3, warmup=1, threads=1, device="cpu"))
    assert timing["batch"] == 2 and timing["seq"] == 16 and timing["runs"] == 3 and timing["median_ms"] > 0
    assert timing["threads"] == 1
    expected = count(AutoConfig.from_pretrained(tiny_bert_dir), batch=1, seq=64).macs / 1e9
    assert trial_macs(tiny_bert_dir, 1, 64) == pytest.approx(expected)


# --- one tiny search, for real, through the CLI ----------------------------------------------------
from tests.test_grid import small_vocab_models, write_recipe  # noqa: E402,F401  (fixture and data)


@pytest.mark.slow
def test_tiny_search_through_the_cli(tmp_path: Path, small_vocab_models, capsys):
    from distill.cli import main as cli

    teacher, _ = small_vocab_models
    search_section = """
search:
  trials: 2
  sampler: bruteforce               # every value once: both students
  objectives: [accuracy, macs]
  latency: {batch: 1, seq: 16}
  space:
    student.num_layers: [1, 2]
"""
    recipe = write_recipe(tmp_path, teacher, extra=search_section)
    root = tmp_path / "search"
    assert cli(["search", str(recipe), "--root", str(root), "--dry-run"]) == 0
    assert "student.num_layers: one of 1, 2" in capsys.readouterr().out and not (root / "study.db").exists()

    assert cli(["search", str(recipe), "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "Best: trial" in out
    teacher_metrics = json.loads((root / "teacher" / "metrics.json").read_text())
    assert teacher_metrics["info"]["stage"] == "teacher"
    trials = study_of(root).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    for t in trials:
        metrics = json.loads((root / f"trial-{t.number}" / "student" / "metrics.json").read_text())
        assert metrics["info"]["teacher"] == str(root / "teacher" / "model")  # the shared teacher
        assert t.values[0] == metrics["validation"]["accuracy"]
        saved = load_config(root / f"trial-{t.number}" / "student" / "config.yaml")
        assert saved.student.num_layers == t.params["student.num_layers"]
        assert saved.distill.cache_dir == str(root / "teacher_cache")
        assert t.user_attrs["test"]["accuracy"] == metrics["test"]["accuracy"]
    macs = {t.params["student.num_layers"]: t.values[1] for t in trials}
    assert macs[2] > macs[1] > 0  # the 2-layer student costs more
    assert list((root / "pareto").glob("trial-*.yaml")) and (root / "trials.md").exists()
    assert (root / "plots" / "history-accuracy.png").exists()

    # a second run finds the study done and trains nothing
    stamps = {p: p.stat().st_mtime for p in root.glob("*/student/metrics.json")}
    assert cli(["search", str(recipe), "--root", str(root)]) == 0
    assert len(study_of(root).trials) == 2
    assert all(p.stat().st_mtime == t for p, t in stamps.items())


@pytest.mark.slow
def test_two_workers_share_one_journal_file(tmp_path: Path, small_vocab_models):
    """Two worker processes on one Optuna journal file (no database server), 2 trials each, with
    the real stages: every trial once, in its own folder, and both workers did work."""
    teacher, _ = small_vocab_models
    journal = tmp_path / "shared" / "study.log"
    recipe = write_recipe(tmp_path, teacher, extra=f"""
search:
  trials: 4
  sampler: random
  pruner: none
  storage: journal:///{journal}
  space:
    train.lr: [1e-3, 5e-4, 2e-4, 1e-4]
""")
    root = tmp_path / "search"
    from distill.cli import main as cli

    assert cli(["search", str(recipe), "--root", str(root), "--prepare"]) == 0  # the teacher, once
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-m", "distill", "search", str(recipe), "--root", str(root),
                               "--worker", str(i), "--max-trials", "2"], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=500)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [out[-3000:] for out in outputs]
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    trials = optuna.load_study(study_name="polarity", storage=storage).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    assert sorted(t.user_attrs["worker"] for t in trials) == [0, 0, 1, 1]
    assert sorted(t.user_attrs["folder"] for t in trials) == [f"trial-{n}" for n in range(4)]
    for t in trials:
        metrics = json.loads((root / t.user_attrs["folder"] / "student" / "metrics.json").read_text())
        assert t.values[0] == metrics["validation"]["accuracy"]
    assert not (root / "study.db").exists() and "storage journal:///" in (root / "trials.md").read_text()


@pytest.mark.slow
def test_a_search_over_two_teachers_through_the_cli(tmp_path: Path, small_vocab_models):
    """`distill search` on a recipe with `teachers:`, with the real stages: each teacher is
    fine-tuned once with its own seed into the search folder, as the very run `distill run`
    would make (so `distill teacher` on best.yaml finds both complete), and the trials use them."""
    from distill.cli import main as cli
    from distill.loop.plan import plan_stage

    teacher, _ = small_vocab_models
    recipe = write_recipe(tmp_path, teacher, extra="""
search:
  trials: 2
  sampler: bruteforce
  space:
    distill.temperature: [1, 2]
""")
    recipe.write_text(recipe.read_text().replace(
        f"teacher: {{model: {teacher}, epochs: 1}}",
        f"teachers:\n  - {{model: {teacher}, epochs: 1, seed: 7}}\n  - {{model: {teacher}, epochs: 1, seed: 8}}"))
    root = tmp_path / "search"
    assert cli(["search", str(recipe), "--root", str(root)]) == 0
    trials = study_of(root).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    for i, seed in ((0, 7), (1, 8)):
        folder = root / f"teacher-{i}"
        saved = load_config(folder / "config.yaml")
        assert saved.seed == seed and json.loads((folder / "metrics.json").read_text())["info"]["stage"] == "teacher"
        # the run `distill run` makes for this teacher: the same identity (folders aside)
        assert plan_stage(saved, "teacher").identity == plan_stage(load_config(recipe), f"teacher-{i}").identity
    for t in trials:
        saved = load_config(root / f"trial-{t.number}" / "student" / "config.yaml")
        assert [x.dir for x in saved.teachers] == [str(root / "teacher-0"), str(root / "teacher-1")]
        assert saved.distill.temperature == t.params["distill.temperature"] and saved.seed == 42
    stamps = {p: p.stat().st_mtime for p in root.glob("teacher-*/metrics.json")}
    assert cli(["teacher", str(root / "best.yaml")]) == 0  # both found complete: nothing trains again
    assert len(stamps) == 2 and all(p.stat().st_mtime == t for p, t in stamps.items())
