"""Several teachers (`teachers:`): the combined teacher against hand computations for each task
layout, the recipe checks, and `distill run` with two tiny teachers for classification (two
seeds of one model) and tagging (two sizes, the hidden term following the second), re-runs
that skip complete stages, and the model card's teacher rows.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from distill.cli import main
from distill.config import ConfigError, load_config
from distill.teachers.ensemble import MASKED_LOGIT
from distill.objective.losses import Signals
from distill.teachers.teacher import EnsembleTeacher, combine_targets
from tests.conftest import minilm_path, save_tiny, tiny_bert_config
from tests.test_resume import write_data

DATA = Path(__file__).parent.parent / "distill" / "sample_data"
LN3, LN9 = math.log(3.0), math.log(9.0)


def fixed(targets: dict, hidden=None):
    """A teacher that always answers `targets` (and `hidden`)."""
    return lambda batch: Signals(targets=targets, hidden=hidden, attention_mask=batch.get("attention_mask"))


def probs(logits: torch.Tensor, temperature: float = 1.0) -> list:
    """softmax(logits / T), flattened (pytest.approx compares flat lists)."""
    return torch.softmax(logits / temperature, dim=-1).flatten().tolist()


def flat(rows: list) -> list:
    return [x for row in rows for x in row] if rows and isinstance(rows[0], list) else rows


def task_of(family: str):
    from distill.tasks import get_task

    return _task_of(load_config(overrides=[f"task.family={family}", "student.model=x"]))


# ---------------------------------------------------------------------------------------------
# The combined teacher against hand computations
# ---------------------------------------------------------------------------------------------

# row 0: teacher A is uniform (p = [1/2, 1/2]), B says [3/4, 1/4]; row 1: A says [9/10, 1/10], B uniform
A = torch.tensor([[0.0, 0.0], [LN9, 0.0]])
B = torch.tensor([[LN3, 0.0], [0.0, 0.0]])


def test_mean_of_two_classification_teachers_by_hand():
    teacher = EnsembleTeacher([fixed({"logits": A}), fixed({"logits": B})], task_of("classification"), "mean")
    out = teacher({})
    expected = [[(0.5 + 0.75) / 2, (0.5 + 0.25) / 2], [(0.9 + 0.5) / 2, (0.1 + 0.5) / 2]]
    assert probs(out.targets["logits"]) == pytest.approx(flat(expected), abs=1e-6)


def test_mean_at_a_temperature_averages_the_softened_distributions():
    # at T = 2: A row 0 stays uniform, B row 0 becomes [sqrt3, 1] / (1 + sqrt3)
    r = math.sqrt(3.0) / (1 + math.sqrt(3.0))
    teacher = EnsembleTeacher([fixed({"logits": A}), fixed({"logits": B})], task_of("classification"), "mean", 2.0)
    out = teacher({}).targets["logits"]
    assert probs(out[:1], 2.0) == pytest.approx([(0.5 + r) / 2, (0.5 + 1 - r) / 2], abs=1e-6)


def test_weighted_teachers_by_hand():
    teacher = EnsembleTeacher(
        [fixed({"logits": A}), fixed({"logits": B})], task_of("classification"), "weighted", weights=[1.0, 3.0]
    )
    out = teacher({}).targets["logits"]
    # weights normalised to [1/4, 3/4]
    expected = [[0.25 * 0.5 + 0.75 * 0.75, 0.25 * 0.5 + 0.75 * 0.25], [0.25 * 0.9 + 0.75 * 0.5, 0.25 * 0.1 + 0.75 * 0.5]]
    assert probs(out) == pytest.approx(flat(expected), abs=1e-6)


def test_confident_takes_the_lowest_entropy_teacher_per_row():
    # row 0: H(A) = ln 2 = 0.693 > H(B) = 0.562 -> B; row 1: H(A) = 0.325 < ln 2 -> A
    teacher = EnsembleTeacher([fixed({"logits": A}), fixed({"logits": B})], task_of("classification"), "confident")
    out = teacher({}).targets["logits"]
    assert out.flatten().tolist() == pytest.approx([LN3, 0.0, LN9, 0.0])  # B's row 0, A's row 1


def test_hidden_states_and_projections_come_from_the_intermediate_teacher():
    hidden_a, hidden_b = (torch.zeros(1, 3, 4),), (torch.ones(1, 3, 4),)
    teachers = [fixed({"logits": A}, hidden_a), fixed({"logits": B}, hidden_b)]
    out = EnsembleTeacher(teachers, task_of("classification"), "mean", main=1)({})
    assert out.hidden is hidden_b
    out = EnsembleTeacher(teachers, task_of("classification"), "mean", main=0)({})
    assert out.hidden is hidden_a


def test_tagging_combines_per_word_where_every_teacher_has_the_word():
    # one sentence, 3 words, 2 tags; teacher B's row is cached one word narrower, and it lost word 0
    a = {"word_logits": torch.tensor([[[0.0, 0.0], [LN3, 0.0], [0.0, LN9]]]), "word_mask": torch.tensor([[True, True, True]])}
    b = {"word_logits": torch.tensor([[[5.0, 0.0], [0.0, 0.0]]]), "word_mask": torch.tensor([[False, True]])}
    out = combine_targets(task_of("tagging"), [a, b], {}, "mean", 1.0)
    assert out["word_mask"].tolist() == [[False, True, False]]
    assert out["word_logits"].shape == (1, 3, 2)
    # word 1: mean of [3/4, 1/4] and [1/2, 1/2]
    assert probs(out["word_logits"][0, 1]) == pytest.approx([0.625, 0.375], abs=1e-6)
    assert out["word_logits"][0, 0].tolist() == [0.0, 0.0] and out["word_logits"][0, 2].tolist() == [0.0, 0.0]


def test_qa_combines_over_the_context_and_cls_only():
    """Positions: 0 = CLS, 1 = a question token (outside every softmax), 2-3 = context. Teacher
    A puts a large logit on the question token: over {0, 2, 3} A says [1, 1, 3]/5 and B
    [3, 1, 1]/5, so the mean is [2, 1, 2]/5 there; a combination over all four positions would
    have let A's question token squeeze its context mass."""
    task = task_of("qa")
    batch = {"context_mask": torch.tensor([[0, 0, 1, 1]]), "cls_index": torch.tensor([0])}
    a = {"start_logits": torch.tensor([[0.0, 5.0, 0.0, LN3]]), "end_logits": torch.tensor([[0.0, 0.0, 0.0, 0.0]])}
    b = {"start_logits": torch.tensor([[LN3, -2.0, 0.0, 0.0]]), "end_logits": torch.tensor([[0.0, 0.0, 0.0, LN3]])}
    out = combine_targets(task, [a, b], batch, "mean", 1.0)
    start = out["start_logits"][0]
    assert start[1].item() == MASKED_LOGIT
    assert probs(start[[0, 2, 3]]) == pytest.approx([0.4, 0.2, 0.4], abs=1e-6)
    # end: A uniform [1/3] * 3, B [1, 1, 3]/5
    assert probs(out["end_logits"][0, [0, 2, 3]]) == pytest.approx(
        [(1 / 3 + 0.2) / 2, (1 / 3 + 0.2) / 2, (1 / 3 + 0.6) / 2], abs=1e-6
    )


def test_qa_across_tokenizers_keeps_only_positions_every_teacher_covers():
    task = task_of("qa")
    batch = {"context_mask": torch.tensor([[0, 1, 1, 1]]), "cls_index": torch.tensor([0])}
    a = {"start_logits": torch.zeros(1, 4), "end_logits": torch.zeros(1, 4), "kd_mask": torch.tensor([[True, True, True, False]])}
    b = {"start_logits": torch.zeros(1, 4), "end_logits": torch.zeros(1, 4), "kd_mask": torch.tensor([[True, False, True, True]])}
    out = combine_targets(task, [a, b], batch, "mean", 1.0)
    assert out["kd_mask"].tolist() == [[True, False, True, False]]
    start = out["start_logits"][0]
    assert start[1].item() == start[3].item() == MASKED_LOGIT
    assert probs(start[[0, 2]]) == pytest.approx([0.5, 0.5], abs=1e-6)


def test_a_target_layout_it_does_not_know_is_refused_by_name():
    odd = {"span_scores": torch.zeros(1, 2, 2, 2)}
    with pytest.raises(ValueError, match="span_scores"):
        combine_targets(task_of("classification"), [odd, odd], {}, "mean", 1.0)


# ---------------------------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------------------------

BASE = """task: {family: classification, name: tiny}
data: {files: {train: t.jsonl}}
student: {num_layers: 1}
"""
TWO = "teachers: [{model: m, seed: 1}, {model: m, seed: 2}]\n"


@pytest.mark.parametrize(
    "body, message",
    [
        (TWO + "teacher: {model: m}\n", "teacher and teachers are both set (teacher.model='m')"),
        (TWO + "distill: {teacher_combine: weighted, teacher_weights: [1.0]}\n", "teacher_weights has 1 ([1.0]) for 2 teachers"),
        (TWO + "distill: {teacher_combine: weighted}\n", "needs one weight per teacher"),
        (TWO + "distill: {teacher_combine: weighted, teacher_weights: [0, 0]}\n", "at least one > 0"),
        (TWO + "distill: {teacher_weights: [1, 2]}\n", "used only by distill.teacher_combine=weighted"),
        (TWO + "distill: {teacher_combine: vote}\n", "distill.teacher_combine='vote' is not one of: mean, weighted, confident"),
        (TWO + "distill: {intermediate_teacher: 2}\n", "distill.intermediate_teacher=2 is out of range: the recipe has 2 teachers (use 0..1)"),
        ("teacher: {model: m}\ndistill: {intermediate_teacher: 1}\n", "intermediate_teacher=1 is out of range: the recipe has 1 teacher"),
        (TWO + "distill: {kd_weight: 0, ce_weight: 1}\n", "only teachers[0] would be used"),
        ("teachers: [{model: m}, {model: m}]\n", "teachers[1] and teachers[0] are the same teacher"),
        ("teachers: [{model: m, dir: x}, {model: n, dir: x}]\n", "write the same stage folder x"),
        ("teachers: [{model: m}, {seed: 2}]\n", "teachers[1].model is not set"),
        ("teachers: [{model: m}, {model: n, epochs: 0}]\n", "teachers[1].epochs=0 is out of range"),
        ("teachers: [{model: m}, {model: n, modle: 2}]\n", "unknown key 'modle'"),
    ],
)
def test_bad_teacher_settings_are_refused_naming_the_key(tmp_path, body, message):
    path = tmp_path / "recipe.yaml"
    path.write_text(BASE + body)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert message in str(err.value)


def test_an_override_into_one_entry_of_the_list_says_to_give_the_whole_list(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(BASE + TWO)
    with pytest.raises(ConfigError, match="give the whole list"):
        load_config(path, ["teachers.1.seed=3"])


def test_teacher_stages_and_their_one_teacher_configs(tmp_path):
    from distill.cli import stages_of
    from distill.loop.plan import plan_stage, stage_dir

    path = tmp_path / "recipe.yaml"
    path.write_text(BASE + "teachers: [{model: m, seed: 1}, {model: n, dir: elsewhere}, {model: f, finetuned: true}]\n"
                    f"run: {{baseline: true}}\noutput_dir: {tmp_path}/run\nseed: 7\n")
    cfg = load_config(path)
    assert stages_of(cfg) == ["teacher-0", "teacher-1", "student", "baseline"]
    assert stage_dir(cfg, "teacher-0") == tmp_path / "run" / "teacher-0"
    assert stage_dir(cfg, "teacher-1") == Path("elsewhere")
    plan = plan_stage(cfg, "teacher-0")
    one = plan.recipe
    assert plan.kind == "teacher" and one.teachers == [] and one.teacher.model == "m" and one.seed == plan.seed == 1
    assert Path(one.teacher.dir) == plan.folder == tmp_path / "run" / "teacher-0"
    plan = plan_stage(cfg, "teacher-1")
    assert plan.recipe.teacher.model == "n" and plan.seed == 7  # the recipe's seed when the teacher has none
    assert plan.folder == Path("elsewhere")
    student = plan_stage(cfg, "student")
    assert student.recipe is cfg and student.kind == "student" and student.seed == 7
    assert [(t.stage, t.folder, t.finetuned) for t in student.teachers] == [
        ("teacher-0", tmp_path / "run" / "teacher-0", False), ("teacher-1", Path("elsewhere"), False), ("teacher-2", tmp_path / "run" / "teacher-2", True)]
    assert student.teachers[2].source == "f" and student.teachers[0].source == str(tmp_path / "run" / "teacher-0" / "model")


# ---------------------------------------------------------------------------------------------
# Through `distill run`
# ---------------------------------------------------------------------------------------------


def write_recipe(root: Path, body: str, family: str = "classification") -> Path:
    data = {
        "classification": f"files: {{train: {root}/train.jsonl, validation: {root}/validation.jsonl, test: {root}/test.jsonl}}",
        "tagging": f"source: {DATA / 'ner_es'}\n  splits: {{train: train, validation: validation, test: null}}",
        "qa": f"files: {{train: {DATA / 'qa_es' / 'train.json'}, validation: {DATA / 'qa_es' / 'validation.json'}}}",
    }[family]
    path = root / "recipe.yaml"
    path.write_text(
        f"""# two teachers: distill run recipe.yaml
task: {{family: {family}, name: tiny}}
data:
  {data}
  max_length: 32
  doc_stride: 8
train: {{lr: 1e-3, batch_size: 8, epochs: 2, logging_steps: 1}}
tracking: {{report_to: []}}
output_dir: {root}/run
seed: 5
{body}
"""
    )
    return path


@pytest.fixture(scope="module")
def classification_run(tmp_path_factory, tiny_bert_dir):
    """Two seeds of one tiny teacher, each fine-tuned in its own stage, then the student of
    their mean; every call of the ensemble's combination is recorded."""
    import distill.teachers.teacher as teachers_mod

    root = tmp_path_factory.mktemp("two-teachers")
    write_data(root)
    path = write_recipe(
        root,
        f"""teachers:
  - {{model: {tiny_bert_dir}, lr: 1e-3, epochs: 2, seed: 1}}
  - {{model: {tiny_bert_dir}, lr: 1e-3, epochs: 2, seed: 2}}
student: {{num_layers: 1}}
distill: {{kd_weight: 1.0, temperature: 2.0, teacher_combine: mean}}""",
    )
    calls: list = []
    original = teachers_mod.combine_targets

    def spy(task, targets, batch, *args, **kwargs):
        calls.append(len(targets))
        return original(task, targets, batch, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(teachers_mod, "combine_targets", spy)
        assert main(["run", str(path)]) == 0
    return root, path, calls


def test_each_teacher_trains_in_its_own_stage_with_its_seed(classification_run):
    root, _, _ = classification_run
    from safetensors.torch import load_file

    run = root / "run"
    weights = []
    for i, seed in enumerate((1, 2)):
        stage = run / f"teacher-{i}"
        assert (stage / "metrics.json").exists() and (stage / "model" / "model.safetensors").exists()
        saved = load_config(stage / "config.yaml")
        assert saved.seed == seed and saved.teachers == [] and Path(saved.teacher.dir) == stage
        weights.append(load_file(str(stage / "model" / "model.safetensors")))
    diff = max((weights[0][k] - weights[1][k]).abs().max().item() for k in weights[0])
    assert diff > 1e-3  # two seeds, two different teachers
    assert len(list((run / "teacher_cache").iterdir())) == 2  # each teacher's own cache


def test_the_student_learns_from_the_combined_teachers(classification_run):
    root, _, calls = classification_run
    run = root / "run"
    assert calls and set(calls) == {2}  # every student step combined both teachers
    metrics = json.loads((run / "student" / "metrics.json").read_text())
    assert metrics["info"]["teacher"] == [str(run / "teacher-0" / "model"), str(run / "teacher-1" / "model")]
    assert 0.0 <= metrics["test"]["accuracy"] <= 1.0
    steps = [json.loads(x) for x in (run / "student" / "log.jsonl").read_text().splitlines()]
    assert all(r["train/loss_kd"] > 0 for r in steps if "train/loss" in r)
    rows = json.loads((run / "summary.json").read_text())
    assert [r["stage"] for r in rows] == ["teacher-0", "teacher-1", "student"]
    assert rows[0]["model"] == "teacher 0 (fine-tuned)" and rows[0]["speedup"] == 1.0


def test_a_rerun_skips_every_complete_stage(classification_run, capsys):
    root, path, _ = classification_run
    capsys.readouterr()
    assert main(["run", str(path)]) == 0
    out = capsys.readouterr().out
    for stage in ("teacher-0", "teacher-1", "student"):
        assert f"complete with the same config, skipping ({root / 'run' / stage})" in out
    assert main(["teacher", str(path), "--index", "1"]) == 0
    out = capsys.readouterr().out
    assert f"skipping ({root / 'run' / 'teacher-1'})" in out and "teacher-0" not in out
    assert main(["teacher", str(path), "--index", "2"]) == 2
    assert "--index 2: the recipe lists 2 teachers" in capsys.readouterr().err


def test_a_changed_combination_rule_is_a_new_student_not_new_teachers(classification_run, capsys):
    root, path, _ = classification_run
    from distill.loop.folders import check_stage_dir
    from distill.loop.plan import plan_stage

    cfg = load_config(path, ["distill.teacher_combine=confident"])
    assert check_stage_dir(plan_stage(cfg, "teacher-0")) == "complete"
    with pytest.raises(Exception, match=r"different config \(differs in: distill.teacher_combine\)"):
        check_stage_dir(plan_stage(cfg, "student"))


def test_the_card_lists_every_teacher_and_its_score(classification_run):
    root, _, _ = classification_run
    from distill.ship.card import card_body, load_evidence

    ev = load_evidence(root / "run" / "student")
    assert [t["stage"] for t in ev.teachers] == ["teacher-0", "teacher-1"]
    body = card_body(ev, "org/tiny", "text-classification")
    scores = [json.loads((root / "run" / f"teacher-{i}" / "metrics.json").read_text())["test"]["accuracy"] for i in (0, 1)]
    for i, score in enumerate(scores):
        assert f"| teacher {i} (fine-tuned) |" in body
        assert f"  {i}. a local model, fine-tuned on the task in the same run (2 epochs, lr 0.001, batch 8, seed {i + 1}); accuracy {score:.4f}" in body
    assert "soft targets combined as the mean of their probabilities at temperature T" in body
    assert "an ensemble of 2 fine-tuned teachers" in body
    assert ev.teacher["test"]["accuracy"] == max(scores)


def test_tagging_with_two_teacher_sizes_and_the_hidden_term_following_one(tmp_path, tiny_bert_dir):
    """A 2-layer and a 3-layer teacher (one tokenizer), per-word targets combined by the
    confident rule; the student is cut from teacher 1 and its hidden term follows teacher 1
    (online: hidden states are not cached) while teacher 0's targets come from its cache."""
    big = save_tiny(tiny_bert_config(layers=3), tmp_path / "big", minilm_path())
    path = write_recipe(
        tmp_path,
        f"""teachers:
  - {{model: {tiny_bert_dir}, lr: 1e-3, epochs: 1}}
  - {{model: {big}, lr: 1e-3, epochs: 1}}
student: {{num_layers: 1}}
distill: {{kd_weight: 1.0, ce_weight: 0.5, hidden_weight: 1.0, teacher_combine: confident, intermediate_teacher: 1}}""",
        family="tagging",
    )
    assert main(["run", str(path), "train.epochs=1"]) == 0
    run = tmp_path / "run"
    for stage in ("teacher-0", "teacher-1", "student"):
        metrics = json.loads((run / stage / "metrics.json").read_text())
        assert 0.0 <= metrics["validation"]["f1"] <= 1.0
    student = json.loads((run / "student" / "metrics.json").read_text())
    assert set(student["info"]["loss_weights"]) == {"ce", "kd", "hidden"}
    steps = [json.loads(x) for x in (run / "student" / "log.jsonl").read_text().splitlines() if "train/loss" in x]
    assert steps and all(r["train/loss_kd"] > 0 and r["train/loss_hidden"] > 0 for r in steps)
    assert len(list((run / "teacher_cache").iterdir())) == 1  # teacher 0 only: teacher 1 runs online
    config = json.loads((run / "student" / "model" / "config.json").read_text())
    assert config["num_hidden_layers"] == 1


def test_qa_teachers_of_another_tokenizer_than_the_student_are_refused_before_any_step(tmp_path, tiny_bert_dir, tiny_roberta_dir, capsys):
    """QA: several teachers must share the student's tokenizer (teachers that tokenize apart
    from each other elsewhere: tests/test_teachers_tokenizers.py)."""
    write_data(tmp_path)
    teachers, student = f"[{{model: {tiny_roberta_dir}, seed: 1}}, {{model: {tiny_roberta_dir}, seed: 2}}]", tiny_bert_dir
    message = "QA with several teachers needs teachers that share the student's tokenizer; teachers[0] (" + str(tiny_roberta_dir)
    path = write_recipe(tmp_path, f"teachers: {teachers}\nstudent: {{model: {student}}}", family="qa")
    # windows long enough for every question in both tokenizers (that check comes first, see test_bad_inputs)
    assert main(["run", str(path), "data.max_length=64"]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").rglob("config.yaml"))


def _task_of(cfg):
    from distill.tasks import get_task

    return get_task(cfg.task, cfg.data)
