"""Intermediate-layer distillation and transfer rows through `distill run`: the attention and
relation terms for every task family, TinyBERT's two phases with a resume inside the first one,
and unlabelled transfer rows (leak-filtered) that add soft-label rows without gold loss.

Tiny models from configs (2-layer BERT teacher, hidden 32, 2 heads; a 1-layer student cut from
it), the keyword data of the resume tests, the shipped NER and QA mini sets.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distill.cli import main
from tests.conftest import minilm_path, save_tiny, tiny_bert_config
from tests.test_resume import max_diff, sigterm_at_forward, write_data

DATA = Path(__file__).parent.parent / "distill" / "sample_data"


def recipe(root: Path, teacher: Path, body: str, family: str = "classification") -> Path:
    path = root / "recipe.yaml"
    data = {
        "classification": f"files: {{train: {root}/train.jsonl, validation: {root}/validation.jsonl, test: {root}/test.jsonl}}",
        "tagging": f"source: {DATA / 'ner_es'}\n  splits: {{train: train, validation: validation, test: null}}",
        "qa": f"files: {{train: {DATA / 'qa_es' / 'train.json'}, validation: {DATA / 'qa_es' / 'validation.json'}}}",
    }[family]
    path.write_text(
        f"""# intermediate terms: distill run recipe.yaml
task: {{family: {family}, name: tiny}}
data:
  {data}
  max_length: 48
  doc_stride: 16
teacher: {{model: {teacher}, epochs: 1, lr: 1e-3}}
student: {{num_layers: 1}}
train: {{lr: 1e-3, batch_size: 8, epochs: 2, logging_steps: 1, checkpoint_steps: 3}}
tracking: {{report_to: []}}
seed: 3
{body}
"""
    )
    return path


def log_of(run: Path, stage: str = "student") -> list[dict]:
    return [json.loads(x) for x in (run / stage / "log.jsonl").read_text().splitlines()]


TWO_PHASE = "distill: {ce_weight: 0.5, kd_weight: 1.0, hidden_weight: 1.0, attention_weight: 1.0, relation_weight: 1.0, intermediate_epochs: 1}"


@pytest.fixture(scope="module")
def two_phase(tmp_path_factory, tiny_bert_dir):
    root = tmp_path_factory.mktemp("phases")
    write_data(root)
    path = recipe(root, tiny_bert_dir, TWO_PHASE)
    assert main(["run", str(path), f"output_dir={root / 'run'}"]) == 0
    return root, path


def test_two_phases_train_intermediate_terms_then_predictions(two_phase):
    root, _ = two_phase
    steps = [r for r in log_of(root / "run") if "train/loss" in r]
    assert [r["phase"] for r in steps] == ["intermediate"] * 8 + ["prediction"] * 8
    first, second = steps[:8], steps[8:]
    for r in first:  # phase 1: the intermediate terms alone
        assert {"train/loss_hidden", "train/loss_attention", "train/loss_relations"} <= set(r)
        assert "train/loss_kd" not in r and "train/loss_ce" not in r
        assert r["train/loss_attention"] > 0 and r["train/loss_relations"] > 0
    for r in second:
        assert {"train/loss_kd", "train/loss_ce"} <= set(r) and "train/loss_attention" not in r
    assert first[-1]["train/loss_relations"] < first[0]["train/loss_relations"]  # it learns them
    evals = [r for r in log_of(root / "run") if "validation/loss" in r]
    assert [r["epoch"] for r in evals] == [2]  # no model selection on the first phase
    info = json.loads((root / "run" / "student" / "metrics.json").read_text())["info"]
    assert set(info["loss_weights"]) == {"ce", "kd", "hidden", "attention", "relations"}


def test_resume_inside_the_first_phase_reaches_the_same_weights(two_phase, tmp_path, monkeypatch):
    root, path = two_phase
    run = tmp_path / "run"
    shared = [f"output_dir={run}", f"teacher.dir={root / 'run' / 'teacher'}"]
    with monkeypatch.context() as patch:
        sigterm_at_forward(patch, 4)
        with pytest.raises(SystemExit) as info:
            main(["student", str(path), *shared])
    assert info.value.code == 75
    assert main(["student", str(path), *shared]) == 0
    from safetensors.torch import load_file

    a = load_file(str(run / "student" / "model" / "model.safetensors"))
    b = load_file(str(root / "run" / "student" / "model" / "model.safetensors"))
    assert max_diff(a, b) <= 1e-6


@pytest.mark.parametrize("family", ["tagging", "qa"])
def test_relations_and_attention_for_tagging_and_qa(tmp_path, tiny_bert_dir, family):
    body = "distill: {kd_weight: 1.0, attention_weight: 1.0, relation_weight: 1.0, relation_heads: 4}"
    path = recipe(tmp_path, tiny_bert_dir, body, family)
    assert main(["run", str(path), f"output_dir={tmp_path / 'run'}", "train.epochs=1"]) == 0
    steps = [r for r in log_of(tmp_path / "run") if "train/loss" in r]
    assert steps and all(r["train/loss_relations"] > 0 and r["train/loss_attention"] >= 0 for r in steps)


def test_cached_logits_with_attention_terms_stop_the_teacher_early(tmp_path, tiny_bert_dir, monkeypatch, capsys):
    """Logits come from the cache; the teacher runs online only up to the layer the relation
    term reads (its last layer here is 2; relation_layer=1 stops it after layer 1)."""
    write_data(tmp_path)
    body = "distill: {kd_weight: 1.0, relation_weight: 1.0, relation_layer: 1}"
    path = recipe(tmp_path, tiny_bert_dir, body)
    from distill.objective import capture

    stops: list = []
    original = capture.Capture.select

    def spy(self, qkv=(), hidden=(), stop_after=None):
        stops.append(stop_after)
        original(self, qkv, hidden, stop_after)

    monkeypatch.setattr(capture.Capture, "select", spy)
    assert main(["run", str(path), f"output_dir={tmp_path / 'run'}", "train.epochs=1"]) == 0
    assert "teacher cache: building" in capsys.readouterr().out
    assert 1 in stops  # the teacher's pass, stopped after layer 1
    assert None in stops  # the student's pass runs whole


def test_the_second_phase_runs_no_capture_no_online_teacher_and_gathers_no_hidden_states(tmp_path, tiny_bert_dir, monkeypatch):
    """Two phases, logits and hidden states from the cache, attention and relations online: in
    phase 1 the student's and the teacher's Q/K/V are captured (the teacher's forward cut after
    the layer read); in phase 2 only the soft-label term is on, so neither capture is armed, the
    online teacher never runs, the student is not asked for hidden states, and the collate
    gathers the cached logits alone. The hooks are registered once for the whole stage."""
    write_data(tmp_path)
    body = ("distill: {kd_weight: 1.0, hidden_weight: 1.0, attention_weight: 1.0, relation_weight: 1.0, "
            "intermediate_epochs: 1, cache_hidden_states: true}")
    path = recipe(tmp_path, tiny_bert_dir, body)
    from distill.loop import train
    from distill.objective import capture
    from distill.teachers import teacher as teachers

    counts = {"student capture": 0, "teacher capture": 0, "teacher forward": 0, "student hidden states": 0, "attach": 0}
    models: dict = {}

    def bump(key):
        counts[key] += 1

    def online_init(self, model, *args, **kwargs):
        online_original(self, model, *args, **kwargs)
        models["teacher"] = model
        model.register_forward_pre_hook(lambda *a: bump("teacher forward"))

    def trainee_init(self, model, *args, **kwargs):
        trainee_original(self, model, *args, **kwargs)
        model.register_forward_pre_hook(lambda m, a, kw: bump("student hidden states") if kw.get("output_hidden_states") else None, with_kwargs=True)

    def enter(self):
        bump("teacher capture" if self.model is models.get("teacher") else "student capture")
        return enter_original(self)

    def attach(self):
        if not self._handles:
            bump("attach")
        return attach_original(self)

    steps: list = []

    def step(accelerator, trainee, batch, *args, **kwargs):
        before = dict(counts)
        objective = accelerator.unwrap_model(trainee).objective
        result = step_original(accelerator, trainee, batch, *args, **kwargs)
        if objective.two_phase:  # the student stage (the teacher stage trains first)
            changes = {k: counts[k] - before[k] for k in counts}
            steps.append((objective.intermediate_phase, changes, sorted(k for k in batch if k.startswith("cached/"))))
        return result

    online_original, trainee_original = teachers.OnlineTeacher.__init__, train.Trainee.__init__
    enter_original, attach_original, step_original = capture.Capture.__enter__, capture.Capture.attach, train.train_step
    monkeypatch.setattr(teachers.OnlineTeacher, "__init__", online_init)
    monkeypatch.setattr(train.Trainee, "__init__", trainee_init)
    monkeypatch.setattr(capture.Capture, "__enter__", enter)
    monkeypatch.setattr(capture.Capture, "attach", attach)
    monkeypatch.setattr(train, "train_step", step)
    assert main(["run", str(path), f"output_dir={tmp_path / 'run'}"]) == 0
    first = [c for phase, c, _ in steps if phase]
    second = [(c, keys) for phase, c, keys in steps if not phase]
    assert len(first) == len(second) == 8
    for c in first:
        assert c["student capture"] == c["teacher capture"] == c["teacher forward"] == c["student hidden states"] == 1
    for c, keys in second:
        assert c == {k: 0 for k in counts}, c
        assert keys == ["cached/0/logits"]  # no hidden states gathered for a phase that reads none
    assert counts["attach"] == 2  # the student's hooks and the teacher's, once each
    log = [r for r in log_of(tmp_path / "run") if "train/loss" in r]
    assert {"train/loss_hidden", "train/loss_attention", "train/loss_relations"} <= set(log[0]) and "train/loss_kd" in log[-1]


@pytest.mark.slow
def test_a_compiled_student_with_attention_and_relation_terms_does_not_recompile(tmp_path, tiny_bert_dir, monkeypatch):
    """train.compile=true with Q/K/V captured on every step: Dynamo compiles the training graph
    in the first steps (once more when the sequence length first changes: dynamic shapes) and
    the evaluation graph once, then never again: its frame and graph counters stay put for the
    rest of the run. (Dynamo's guards decide recompilation whatever the backend; the eager
    backend keeps the test quick.)"""
    import torch
    from torch._dynamo.utils import counters

    from distill.loop import train

    write_data(tmp_path)
    path = recipe(tmp_path, tiny_bert_dir, "distill: {kd_weight: 1.0, attention_weight: 1.0, relation_weight: 1.0}")
    compile_original = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compile_original(self, backend="eager"))
    seen: list = []
    step_original = train.train_step

    def step(accelerator, trainee, *args, **kwargs):
        result = step_original(accelerator, trainee, *args, **kwargs)
        seen.append((accelerator.unwrap_model(trainee).capture is not None, dict(counters["frames"]), dict(counters["stats"])))
        return result

    monkeypatch.setattr(train, "train_step", step)
    torch._dynamo.reset()
    counters.clear()
    assert main(["run", str(path), f"output_dir={tmp_path / 'run'}", "train.compile=true", "train.epochs=2"]) == 0
    student = seen[-16:]  # the student's 2 epochs of 8 steps (the teacher stage trains first, uncompiled)
    assert all(has_capture for has_capture, _, _ in student)
    frames = [f.get("total", 0) for _, f, _ in student]
    graphs = [g.get("unique_graphs", 0) for _, _, g in student]
    print(f"Dynamo frames compiled after each step: {frames}; graphs: {graphs}")
    assert frames[0] > 0  # it did compile
    assert len(set(frames[3:8])) == 1 and len(set(graphs[3:8])) == 1  # epoch 1 after its first steps
    assert len(set(frames[8:])) == 1 and len(set(graphs[8:])) == 1  # epoch 2: nothing new at all


def test_different_tokenizers_refuse_position_terms_before_any_step(tmp_path, tiny_roberta_dir, capsys):
    write_data(tmp_path)
    labels = dict(enumerate(["neg", "neu", "pos"]))
    teacher = save_tiny(tiny_bert_config(id2label=labels), tmp_path / "teacher", minilm_path())
    path = recipe(tmp_path, teacher, "distill: {kd_weight: 1.0, relation_weight: 1.0}")
    overrides = [f"student.model={tiny_roberta_dir}", "student.num_layers=null", "teacher.finetuned=true"]
    assert main(["student", str(path), f"output_dir={tmp_path / 'run'}", *overrides]) == 2
    err = capsys.readouterr().err
    assert "relations term compares token positions" in err and "distill.relation_weight" in err
    assert not (tmp_path / "run" / "student" / "config.yaml").exists()


def test_transfer_rows_join_the_student_and_leaks_are_dropped(tmp_path, tiny_bert_dir, capsys):
    write_data(tmp_path)
    validation = [json.loads(x) for x in (tmp_path / "validation.jsonl").read_text().splitlines()]
    unlabelled = [{"text": f"texto sin etiqueta número {i} bueno"} for i in range(20)] + [{"text": validation[0]["text"]}]
    (tmp_path / "unlabelled.jsonl").write_text("".join(json.dumps(r) + "\n" for r in unlabelled))
    path = recipe(tmp_path, tiny_bert_dir, "distill: {ce_weight: 1.0, kd_weight: 1.0}")
    overrides = [f"output_dir={tmp_path / 'run'}", f"data.transfer=[{{files: [{tmp_path / 'unlabelled.jsonl'}]}}]", "train.epochs=1"]
    assert main(["run", str(path), *overrides]) == 0
    out = capsys.readouterr().out
    assert "student training rows: labelled 64, transfer 20" in out
    info = json.loads((tmp_path / "run" / "student" / "metrics.json").read_text())["info"]
    assert info["train_rows"]["labelled"] == 64 and info["train_rows"]["transfer"] == 20
    assert info["train_rows"]["leaked_dropped"] == 1
    teacher = json.loads((tmp_path / "run" / "teacher" / "metrics.json").read_text())["info"]
    assert teacher["train_rows"] == {"labelled": 64}  # the teacher trains on the labels alone
    from distill.ship.export import export_student

    card = (export_student(tmp_path / "run" / "student", tmp_path / "export") / "README.md").read_text()
    assert "64 labelled, 20 unlabelled (transfer sets), 0 augmented copies" in card
    assert "1 rows equal to validation or test rows were dropped" in card
