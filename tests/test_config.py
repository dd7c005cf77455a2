"""The recipe schema: merging, overrides, and errors that name the key."""

import re
from pathlib import Path

import pytest

from distill.config import ConfigError, load_config, stage_train, to_yaml

ROOT = Path(__file__).parent.parent
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def recipe_path(recipe: Path) -> str:
    return recipe.relative_to(ROOT).as_posix()


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
    with pytest.raises(ConfigError, match="picks layers of the teacher"):
        load_config(write(tmp_path, BASE), ["student.from_teacher_layers=[0,2]"])
    # student.num_layers with student.model cuts that model
    assert load_config(write(tmp_path, BASE), ["student.num_layers=2"]).student.num_layers == 2


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
    header = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    assert header, "a recipe opens with a comment giving its command"
    # the opening comment holds the command that runs this very recipe
    command = re.compile(rf"(^|\s)(distill|python -m distill|accelerate launch .*-m distill) run {re.escape(recipe_path(recipe))}(\s|$)")
    assert any(command.search(line.lstrip("# ")) for line in header), header[:3]
    assert cfg.task.name and cfg.output_dir


def test_the_recipe_command_check_can_fail(tmp_path):
    """The header check above must refuse a header that names another recipe or no command."""
    text = "# POS tagging.\n#   distill run recipes/ner.yaml\ntask: {family: tagging}\n"
    command = re.compile(r"(^|\s)(distill|python -m distill|accelerate launch .*-m distill) run recipes/pos\.yaml(\s|$)")
    assert not any(command.search(line.lstrip("# ")) for line in text.splitlines()[:2])
    assert command.search("accelerate launch -m distill run recipes/pos.yaml student.model=x")


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.columns.lable=sentiment", "data.columns.lable: 'lable' is not a column role of classification (roles: text, text_pair, label). Did you mean 'data.columns.label'?"),
        ("data.columns.text_par=hypothesis", "Did you mean 'data.columns.text_pair'?"),
        ("data.columns.tags=upos", "'tags' is not a column role of classification"),
        ("seed=-1", "seed=-1 is out of range: use an integer in 0..4294967295"),
        ("seed=4294967296", "seed=4294967296 is out of range"),
        ("data.validation_from_train=1.5", "data.validation_from_train=1.5: use a fraction of the training split in (0, 1), a whole number of rows"),
        ("data.validation_from_train=-0.1", "data.validation_from_train=-0.1"),
        ("tracking.report_to=[wandb,tensorbord]", "tracking.report_to: unknown tracker 'tensorbord'"),
        ("task.labels=[neg,pos,neg]", "task.labels names ['neg'] more than once"),
        ("data.format=conlu", "data.format='conlu' is not one of"),
    ],
)
def test_values_that_would_fail_later_are_checked_now(tmp_path, override, message):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, BASE), [override])
    assert message in str(err.value)


def test_good_data_values_pass(tmp_path):
    cfg = load_config(
        write(tmp_path, BASE),
        [
            "data.columns.text=premise", "data.columns.text_pair=hypothesis", "seed=0",
            "data.validation_from_train=500", "tracking.report_to=[tensorboard,wandb]",
            "task.labels=[neg,pos]", "data.format=conllu", "data.drop_invalid=true",
        ],
    )
    assert cfg.data.validation_from_train == 500 and cfg.data.drop_invalid
    assert load_config(write(tmp_path, BASE), ["data.validation_from_train=0.1"]).data.validation_from_train == 0.1


def test_column_roles_and_labels_follow_the_family(tmp_path):
    tagging = BASE.replace("family: classification", "family: tagging")
    cfg = load_config(write(tmp_path, tagging), ["data.columns.tags=xpos", "data.columns.tokens=tokens"])
    assert cfg.data.columns == {"tags": "xpos", "tokens": "tokens"}
    with pytest.raises(ConfigError, match="Did you mean 'data.columns.tags'"):
        load_config(write(tmp_path, tagging), ["data.columns.tag=xpos"])
    qa = BASE.replace("family: classification", "family: qa")
    with pytest.raises(ConfigError, match="task.labels: qa has no labels"):
        load_config(write(tmp_path, qa), ["task.labels=[a]"])
