"""`distill search`: the space, the section's checks, trials as stages (resume, pruning, Pareto),
two workers on one SQLite file, launch scripts, and one tiny search through the CLI.

Most tests inject a fake stage runner (it writes metrics.json like a real stage, from a score
that depends on the trial's values) so the search's own logic runs in a fraction of a second.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from distill.config import ConfigError, load_config
from distill.errors import Preempted
from distill.study import search as S
from tests.search_fakes import FakeStage, fake_score

REPO = Path(__file__).resolve().parents[1]


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
    monkeypatch.setattr(S.Search, "preflight", lambda self: None)


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
    params = S.parse_space({
        "train.lr": {"low": "1e-5", "high": 1e-4, "log": True},  # YAML reads 1e-5 as a string
        "train.batch_size": {"low": 8, "high": 32, "step": 8},
        "distill.ce_weight": {"low": 0.0, "high": 1.0, "step": 0.25},
        "distill.temperature": [1, 2, 5],
        "student": {"from_teacher_layers": [[0, 5], [0, 3, 5]]},  # nested, as the command line gives it
    })
    by_key = {p.key: p for p in params}
    assert by_key["train.lr"] == S.Param("train.lr", "float", 1e-5, 1e-4, log=True)
    assert by_key["train.batch_size"] == S.Param("train.batch_size", "int", 8, 32, step=8)
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
    with pytest.raises(S.SearchError, match=message.replace("(", r"\(").replace("[", r"\[").replace("?", r"\?")):
        S.parse_space(space)


def test_time_budget_and_directions():
    assert S.parse_duration("2h") == 7200 and S.parse_duration("30m") == 1800
    assert S.parse_duration("1h30m") == 5400 and S.parse_duration("5400") == 5400 and S.parse_duration(90) == 90
    for bad in ("2 hours", "h", "0", "-5m"):
        with pytest.raises(S.SearchError, match="time_budget"):
            S.parse_duration(bad)
    assert [S.direction(o) for o in ("accuracy", "f1", "loss", "latency", "macs")] == \
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
    assert S.resolve_objectives(cfg) == ["f1"]  # the family's headline metric
    assert S.pruner_name(cfg, ["f1"]) == "hyperband"
    assert S.pruner_name(cfg, ["f1", "latency"]) == "none"  # the default never blocks a Pareto search
    assert [p.key for p in S.parse_space(cfg.search.space)] == ["distill.temperature"]


def test_every_end_of_the_space_must_make_a_valid_recipe(tmp_path: Path):
    recipe = fake_recipe(tmp_path, "trials: 2\nspace: {distill.kd_loss: [kl, kld]}\n")
    with pytest.raises(S.SearchError, match="search.space.distill.kd_loss: the value 'kld' is not valid here: "
                                            "distill.kd_loss='kld' is not one of: kl, ce, mse"):
        S.Search(recipe, [], tmp_path / "s").preflight()
    recipe = fake_recipe(tmp_path, "trials: 2\nspace: {train.warmup_ratio: {low: 0.0, high: 1.0}}\n")
    with pytest.raises(S.SearchError, match="train.warmup_ratio: the value 1.0 is not valid here: "
                                            "train.warmup_ratio=1.0 is out of range"):
        S.Search(recipe, [], tmp_path / "s").preflight()
    recipe = fake_recipe(tmp_path, "trials: 2\nspace: {train.lr: [1e-4, 1e-3]}\n")
    with pytest.raises(S.SearchError, match="scores trials on the validation split, and this recipe has none"):
        S.Search(recipe, ["data.splits.validation=null"], tmp_path / "s").preflight()
    with pytest.raises(S.SearchError, match="sampler_options .* do not fit TPESampler"):
        S.Search(recipe, ["search.sampler_options={n_startup: 3}"], tmp_path / "s")
    with pytest.raises(S.SearchError, match="pruner_options are set but search.pruner=none"):
        S.Search(recipe, ["search.pruner=none", "search.pruner_options={n_startup_trials: 3}"], tmp_path / "s")
    with pytest.raises(S.SearchError, match="the search has no end"):
        S.Search(recipe, ["search.trials=null"], tmp_path / "s").run()


# --- trials as stages ----------------------------------------------------------------------------
def test_search_shares_the_teacher_and_writes_the_best_recipe(tmp_path: Path, no_preflight):
    recipe = fake_recipe(tmp_path, SPACE + "trials: 5\npruner: none\n")
    root = tmp_path / "search"
    runner = FakeStage()
    assert S.main([str(recipe), "--root", str(root)], runner=runner) == 0
    assert runner.calls[0] == ("teacher", "teacher") and [c for c in runner.calls if c[0] == "teacher"] == [runner.calls[0]]
    folders = [name for stage, name in runner.calls if stage == "student"]
    assert folders == [f"trial-{n}" for n in range(5)]
    for name in folders:
        cfg = runner.configs[name]
        assert cfg.teacher.dir == str(root / "teacher") and cfg.distill.cache_dir == str(root / "teacher_cache")
        assert cfg.output_dir == str(root / name) and cfg.search == S.SearchConfig()

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
    assert cfg.teacher.dir == str(root / "teacher") and cfg.search == S.SearchConfig()
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


def test_resume_continues_the_count_and_never_reruns_a_trial(tmp_path: Path, no_preflight):
    recipe = fake_recipe(tmp_path, SPACE + "pruner: none\n")
    root = tmp_path / "search"
    first = FakeStage()
    assert S.main([str(recipe), "search.trials=3", "--root", str(root)], runner=first) == 0
    assert [n for s, n in first.calls if s == "student"] == ["trial-0", "trial-1", "trial-2"]
    again = FakeStage()
    assert S.main([str(recipe), "search.trials=3", "--root", str(root)], runner=again) == 0
    assert again.calls == []  # the budget is spent; the teacher folder is complete
    more = FakeStage()
    assert S.main([str(recipe), "search.trials=5", "--root", str(root)], runner=more) == 0
    assert more.calls == [("student", "trial-3"), ("student", "trial-4")]
    trials = study_of(root).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 5
    # the resumed run drew new points, not the first run's sequence again
    assert trials[3].params != trials[0].params and trials[4].params != trials[1].params
    # another recipe on the same storage is refused, naming what differs
    with pytest.raises(S.SearchError, match=r"started with another recipe \(differs in train.epochs\)"):
        S.Search(recipe, ["train.epochs=4", "search.trials=6"], root).run()


def test_the_first_trial_runs_the_recipe_as_written(tmp_path: Path, no_preflight):
    # train.lr=5e-5 lies outside the space: the sampler picks it; the other two keys keep the recipe's values
    recipe = fake_recipe(tmp_path, SPACE + "trials: 4\npruner: none\n")
    root = tmp_path / "search"
    runner = FakeStage()
    assert S.main([str(recipe), "distill.temperature=5", "distill.kd_loss=ce", "--root", str(root)], runner=runner) == 0
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
    assert S.main([str(recipe), "distill.temperature=5", "distill.kd_loss=ce", "search.trials=6", "--root", str(root)],
                  runner=FakeStage()) == 0
    assert sum(bool(t.user_attrs.get("recipe_setting")) for t in study_of(root).trials) == 1


def test_start_from_recipe_can_be_turned_off(tmp_path: Path, no_preflight):
    recipe = fake_recipe(tmp_path, SPACE + "trials: 2\npruner: none\nstart_from_recipe: false\n")
    root = tmp_path / "search"
    assert S.main([str(recipe), "--root", str(root)], runner=FakeStage()) == 0
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


def test_several_teachers_are_fine_tuned_once_and_shared(tmp_path: Path, no_preflight):
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
    runner = FakeStage()
    assert S.main([str(recipe), "--root", str(root)], runner=runner) == 0
    # teachers[0] and [2] fine-tuned once, before any trial; teachers[1] is taken as it is
    assert runner.calls[:2] == [("teacher-0", "teacher-0"), ("teacher-2", "my-teacher")]
    assert [c for c in runner.calls if c[0].startswith("teacher")] == runner.calls[:2]
    for name in ("trial-0", "trial-1", "trial-2"):
        dirs = [t.dir for t in runner.configs[name].teachers]
        assert dirs == [str(root / "teacher-0"), None, str(mine)]
    best = load_config(root / "best.yaml")
    assert [t.dir for t in best.teachers] == [str(root / "teacher-0"), None, str(mine)]
    assert best.teachers[1].finetuned and best.search == S.SearchConfig()
    # a teacher key in the space cannot mean one of several teachers
    bad = recipe.read_text().replace("space:", "space:\n    teacher.lr: [1e-5, 2e-5]")
    recipe.write_text(bad)
    with pytest.raises(S.SearchError, match=r"teacher.lr set the single `teacher:`.*lists `teachers:`"):
        S.Search(recipe, [], tmp_path / "other")


def test_a_stopped_trial_is_retried_in_its_own_folder(tmp_path: Path, no_preflight):
    recipe = fake_recipe(tmp_path, SPACE + "trials: 3\npruner: none\n")
    root = tmp_path / "search"
    runner = FakeStage(preempt="trial-1")
    with pytest.raises(Preempted):
        S.main([str(recipe), "--root", str(root)], runner=runner)
    trials = study_of(root).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.WAITING]
    assert trials[2].params == trials[1].params and trials[2].user_attrs["folder"] == "trial-1"

    assert S.main([str(recipe), "--root", str(root)], runner=runner) == 0
    students = [n for s, n in runner.calls if s == "student"]
    assert students == ["trial-0", "trial-1", "trial-1", "trial-3"]  # trial-1 resumed, then one new trial
    assert runner.configs["trial-1"].train.lr == pytest.approx(trials[1].params["train.lr"])
    states = [t.state for t in study_of(root).trials]
    assert states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    table = (root / "trials.md").read_text()
    assert "continues trial-1" in table and "| stopped (signal or crash); continued by trial 2 |" in table


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # the orphan is made by hand, outside optimize
def test_a_trial_left_running_by_a_dead_process_is_retried(tmp_path: Path, no_preflight):
    recipe = fake_recipe(tmp_path, SPACE + "trials: 2\npruner: none\n")
    root = tmp_path / "search"
    search = S.Search(recipe, [], root, runner=FakeStage())
    study = search.study()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = study.ask({"train.lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)})
    for key, value in {"folder": "trial-0", "host": __import__("socket").gethostname(), "pid": dead.pid}.items():
        orphan.set_user_attr(key, value)
    search.run()
    trials = study_of(root).trials
    assert trials[0].state == TrialState.FAIL
    assert trials[1].user_attrs["folder"] == "trial-0" and trials[1].state == TrialState.COMPLETE
    assert trials[1].params["train.lr"] == trials[0].params["train.lr"]
    assert search.used(trials) == 2


def test_a_failing_trial_is_recorded_and_the_search_goes_on(tmp_path: Path, no_preflight):
    recipe = fake_recipe(tmp_path, SPACE + "trials: 3\npruner: none\n")
    root = tmp_path / "search"
    assert S.main([str(recipe), "--root", str(root)], runner=FakeStage(nan="trial-1")) == 0
    trials = study_of(root).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    assert "non-finite loss" in trials[1].user_attrs["error"]
    assert "| 1 | fail |" in (root / "trials.md").read_text()


def test_pruning_stops_bad_trials_at_their_first_evaluation(tmp_path: Path, no_preflight):
    search_section = """\
        trials: 4
        space: {train.lr: [1e-3, 1e-1]}
        pruner: median
        pruner_options: {n_startup_trials: 1}
        """
    recipe = fake_recipe(tmp_path, search_section)
    root = tmp_path / "search"
    runner = FakeStage(epochs=4)
    search = S.Search(recipe, [], root, runner=runner)
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
    by_step = S.Pruning(trial, "accuracy", by_epoch=False, team=S.Team())
    by_step(10, 0, {"accuracy": 0.5})
    by_step(20, 0, {"accuracy": 0.6})  # the same epoch: reported at its own step
    assert study.trials[0].intermediate_values == {10: 0.5, 20: 0.6}
    with pytest.raises(S.SearchError, match="have no 'f1'"):
        S.Pruning(trial, "f1", by_epoch=True, team=S.Team())(10, 1, {"accuracy": 0.5})


def test_pareto_front_of_accuracy_and_size(tmp_path: Path, no_preflight):
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
    assert S.main([str(recipe), "--root", str(root)], runner=FakeStage()) == 0
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


def test_outputs_with_a_single_complete_trial_skip_importances(tmp_path: Path, no_preflight):
    recipe = fake_recipe(tmp_path, SPACE + "trials: 1\npruner: none\n")
    root = tmp_path / "search"
    assert S.main([str(recipe), "--root", str(root)], runner=FakeStage()) == 0
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
    search = S.Search(recipe, [], root)
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


def test_workers_write_launch_scripts(tmp_path: Path):
    recipe = fake_recipe(tmp_path, SPACE + "trials: 30\n")
    root = tmp_path / "search"
    assert S.main([str(recipe), "train.epochs=2", "--root", str(root), "--workers", "3",
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

    timing = S.trial_latency(tiny_bert_dir, SearchLatencyConfig(batch=2, seq=16, runs=3, warmup=1, threads=1, device="cpu"))
    assert timing["batch"] == 2 and timing["seq"] == 16 and timing["runs"] == 3 and timing["median_ms"] > 0
    assert timing["threads"] == 1
    expected = count(AutoConfig.from_pretrained(tiny_bert_dir), batch=1, seq=64).macs / 1e9
    assert S.trial_macs(tiny_bert_dir, 1, 64) == pytest.approx(expected)


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
