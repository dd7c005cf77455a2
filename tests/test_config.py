"""The recipe schema: merging, overrides, and errors that name the key."""

from pathlib import Path

import pytest

from distill.config import ConfigError, load_config, stage_train, to_yaml

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


BASE = """
task: {family: classification, name: t}
data: {files: {train: a.jsonl}}
teacher: {model: some/teacher}
student: {model: albeto-tiny}
"""


def test_recipe_then_overrides(tmp_path):
    cfg = load_config(write(tmp_path, BASE + "train: {lr: 1e-4, batch_size: 16}\n"), ["train.lr=3e-5", "seed=3"])
    assert cfg.train.lr == pytest.approx(3e-5)
    assert cfg.train.batch_size == 16  # from the recipe
    assert cfg.train.epochs == 3  # default
    assert cfg.seed == 3


def test_user_overrides_from_the_issue(tmp_path):
    overrides = [
        "output_dir=/tmp/x",
        "student.model=albeto-base-6",
        "teacher.model=other/teacher",
        "train.lr=1e-4",
        "train.batch_size=64",
        "train.epochs=50",
        "train.max_steps=10",
        "data.max_train_samples=100",
        "data.max_eval_samples=20",
        "seed=1",
    ]
    cfg = load_config(write(tmp_path, BASE), overrides)
    assert (cfg.output_dir, cfg.student.model, cfg.teacher.model) == ("/tmp/x", "albeto-base-6", "other/teacher")
    assert (cfg.train.batch_size, cfg.train.epochs, cfg.train.max_steps) == (64, 50, 10)
    assert (cfg.data.max_train_samples, cfg.data.max_eval_samples) == (100, 20)


def test_list_override(tmp_path):
    cfg = load_config(write(tmp_path, BASE.replace("student: {model: albeto-tiny}", "")), ["student.from_teacher_layers=[0,4,8,11]"])
    assert cfg.student.from_teacher_layers == [0, 4, 8, 11]


@pytest.mark.parametrize(
    "where, override, message",
    [
        ("cli", "train.lrr=1e-4", "unknown key 'train.lrr'. Did you mean 'train.lr'?"),
        ("cli", "train.epochs=many", "bad value for 'train.epochs'"),
        ("cli", "distill.temprature=2", "Did you mean 'distill.temperature'?"),
        ("cli", "distill.kd_loss=js", "distill.kd_loss='js' is not one of: kl, ce, mse"),
        ("cli", "distill.temperature=0", "distill.temperature must be > 0"),
        ("cli", "train.lr", "not of the form key=value"),
        ("recipe", "trian: {lr: 1}\n", "unknown key 'trian'. Did you mean 'train'?"),
        ("recipe", "task: {familly: qa}\n", "Did you mean 'task.family'?"),
    ],
)
def test_errors_name_the_key(tmp_path, where, override, message):
    with pytest.raises(ConfigError) as err:
        if where == "cli":
            load_config(write(tmp_path, BASE), [override])
        else:
            load_config(write(tmp_path, BASE + override))
    assert message in str(err.value)


def test_recipe_errors_name_the_file(tmp_path):
    path = write(tmp_path, BASE + "train: {batch_size: [1, 2]}\n")
    with pytest.raises(ConfigError, match=r"recipe\.yaml: bad value for 'train.batch_size'"):
        load_config(path)


def test_malformed_yaml_gives_line(tmp_path):
    path = write(tmp_path, "task:\n  family: [classification\n")
    with pytest.raises(ConfigError, match=r"malformed YAML at line \d+"):
        load_config(path)


def test_missing_recipe():
    with pytest.raises(ConfigError, match="recipe not found"):
        load_config("nope/none.yaml")


def test_student_required_and_exclusive(tmp_path):
    with pytest.raises(ConfigError, match="no student"):
        load_config(write(tmp_path, BASE.replace("student: {model: albeto-tiny}", "")))
    with pytest.raises(ConfigError, match="exclude each other"):
        load_config(write(tmp_path, BASE), ["student.num_layers=2"])


def test_all_loss_weights_zero(tmp_path):
    with pytest.raises(ConfigError, match="all loss weights are zero"):
        load_config(write(tmp_path, BASE), ["distill.kd_weight=0"])


def test_teacher_stage_overrides(tmp_path):
    cfg = load_config(write(tmp_path, BASE + "teacher: {model: t, lr: 2e-5, epochs: 7}\n"))
    t = stage_train(cfg, "teacher")
    s = stage_train(cfg, "student")
    assert (t.lr, t.epochs) == (2e-5, 7)
    assert (s.lr, s.epochs) == (cfg.train.lr, cfg.train.epochs)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["train.lr=1e-4"])
    saved = tmp_path / "config.yaml"
    saved.write_text(to_yaml(cfg))
    assert load_config(saved) == cfg


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.name for r in RECIPES])
def test_every_shipped_recipe_validates(recipe):
    cfg = load_config(recipe)
    text = recipe.read_text()
    assert text.lstrip().startswith("#"), "a recipe opens with a comment giving its command"
    assert "distill run" in text.split("\n\n")[0] or "distill" in text.splitlines()[1]
    assert cfg.task.name and cfg.output_dir
