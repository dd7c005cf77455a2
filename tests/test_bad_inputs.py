"""Bad inputs are caught before any training step, with a message naming the problem and the
fix, and without losing anything already written.

Every case runs `distill.cli.main` against a copy of an output folder that already holds a
complete teacher stage, and checks: exit status 2, the message, no traceback, no training
forward, and every file of the earlier run unchanged (no config.yaml written for the failed
stage either, so the fixed command is not refused as "a different config" afterwards).
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch
from torch import nn
from transformers import AutoModelForSequenceClassification

import distill.loop.train as train
from distill.loop.preflight import preflight
from distill import models
from distill.loop import setup
from distill.cli import main
from tests.conftest import minilm_path, save_tiny, tiny_bert_config

LABELS = ["neg", "neu", "pos"]
WORDS = {"pos": ["bueno", "genial"], "neg": ["malo", "roto"], "neu": ["normal", "regular"]}
FILLER = "el la un producto servicio llegó hoy ayer muy bastante casa envío".split()


def rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        label = rng.choice(LABELS)
        words = rng.choices(FILLER, k=rng.randint(2, 8)) + [rng.choice(WORDS[label])]
        out.append({"text": " ".join(words), "label": label})
    return out


def write_jsonl(path: Path, items: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in items))
    return path


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@dataclass
class World:
    root: Path
    recipe: Path
    base_run: Path  # holds a complete teacher stage
    paths: dict[str, Path] = field(default_factory=dict)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_bert_dir, tiny_roberta_dir) -> World:
    root = tmp_path_factory.mktemp("bad")
    write_jsonl(root / "train.jsonl", rows(32, 0))
    write_jsonl(root / "validation.jsonl", rows(8, 1))
    write_jsonl(root / "test.jsonl", rows(8, 2))
    (root / "empty.jsonl").write_text("")
    write_jsonl(root / "unseen.jsonl", rows(7, 3) + [{"text": "muy raro", "label": "mixto"}])
    # data read as meant or refused (docs/launching.md, "Data the run refuses")
    write_jsonl(root / "null-label.jsonl", rows(3, 4) + [{"text": "sin etiqueta", "label": None}] + rows(3, 5))
    write_jsonl(root / "empty-text.jsonl", rows(2, 6) + [{"text": " ", "label": "pos"}])
    write_jsonl(root / "mixed-types.jsonl", rows(5, 7) + [{"text": "uno", "label": 1}])
    write_jsonl(root / "case-variant.jsonl", rows(5, 8) + [{"text": "genial", "label": "Pos"}])
    (root / "latin1.jsonl").write_bytes(
        json.dumps(rows(1, 9)[0]).encode() + b"\n" + '{"text": "ni\u00f1o", "label": "pos"}\n'.encode("latin-1")
    )
    (root / "latin1.txt").write_bytes("muy bueno\n".encode() + "el ni\u00f1o lleg\u00f3\n".encode("latin-1"))
    write_jsonl(root / "numbers.jsonl", [{"text": i} for i in range(5)])
    (root / "ud.conllu").write_text("# sent_id = 1\n1\tHola\thola\tINTJ\ti\t_\t0\troot\t_\t_\n\n")
    (root / "not-a-model").mkdir()
    (root / "not-a-model" / "config.json").write_text("{}")
    (root / "a-file").write_text("output_dir must be a folder, this is a file")
    # "fine-tuned" teachers: one with other label names, one with 2 labels
    abc = tiny_bert_config(id2label={0: "A", 1: "B", 2: "C"})
    save_tiny(abc, root / "teacher-abc", minilm_path())
    recipe = root / "recipe.yaml"
    recipe.write_text(
        f"""# bad-input table: distill <stage> recipe.yaml output_dir=... <the case's overrides>
task: {{family: classification, name: tiny}}
data:
  files: {{train: {root}/train.jsonl, validation: {root}/validation.jsonl, test: {root}/test.jsonl}}
  max_length: 32
teacher: {{model: {tiny_bert_dir}, epochs: 1}}
student: {{num_layers: 1}}
distill: {{ce_weight: 0.0, kd_weight: 1.0, temperature: 2.0}}
train: {{lr: 1e-3, batch_size: 16, epochs: 1, logging_steps: 1}}
tracking: {{report_to: []}}
seed: 1
"""
    )
    (root / "malformed.yaml").write_text("task: {family: classification\ntrain:\n  lr: 1e-3\n   batch_size: 4\n")
    base = root / "base"
    assert main(["teacher", str(recipe), f"output_dir={base}"]) == 0
    paths = {"bert": tiny_bert_dir, "roberta": tiny_roberta_dir}
    return World(root, recipe, base, paths)


@dataclass
class Case:
    command: str  # distill <command>
    overrides: list[str]
    expect: list[str]  # substrings of the message ({root}, {run} filled in)
    recipe: Optional[str] = None  # another recipe file under {root}
    patch: Optional[Callable] = None  # (monkeypatch) -> None


def tiny_disk(monkeypatch) -> None:
    """Every disk reports 64 bytes free (less than the tiny test cache's few hundred bytes)."""
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=64))


CASES = {
    "malformed-yaml": Case("run", [], ["malformed.yaml: malformed YAML at line 2, column 6"], recipe="malformed.yaml"),
    "unknown-key": Case("run", ["train.bacth_size=8"], ["unknown key 'train.bacth_size'", "Did you mean 'train.batch_size'?"]),
    "wrong-type": Case("run", ["train.batch_size=big"], ["bad value for 'train.batch_size'"]),
    "bad-choice": Case("run", ["distill.kd_loss=kld"], ["distill.kd_loss='kld' is not one of: kl, ce, mse"]),
    "temperature-zero": Case("run", ["distill.temperature=0"], ["distill.temperature must be > 0, got 0"]),
    "logging-steps-zero": Case("run", ["train.logging_steps=0"], ["train.logging_steps=0 is out of range"]),
    "all-weights-zero": Case("run", ["distill.kd_weight=0"], ["all loss weights are zero", "set at least one > 0"]),
    "model-path-not-a-model": Case(
        "student", ["student.num_layers=null", "student.model={root}/not-a-model"],
        ["cannot load model '{root}/not-a-model'", "exists but is not a loadable model"],
    ),
    "hub-id-offline-not-cached": Case(
        "student", ["student.num_layers=null", "student.model=nobody-here/no-such-model"],
        ["cannot load model 'nobody-here/no-such-model'", "HF_HUB_OFFLINE is set and it is not in the local cache"],
    ),
    "data-file-missing": Case(
        "student", ["data.files.validation={root}/missing.jsonl"], ["data file not found: {root}/missing.jsonl"]
    ),
    "missing-column": Case(
        "student", ["data.columns.text=sentence"], ["has no column 'sentence'", "data.columns.text=<column>"]
    ),
    "empty-split": Case("student", ["data.files.validation={root}/empty.jsonl"], ["split 'validation' is empty"]),
    "label-unseen-in-training": Case(
        "student", ["data.files.test={root}/unseen.jsonl"], ["split 'test' has labels never seen in training: ['mixto']"]
    ),
    "teacher-label-names-differ": Case(
        "student", ["teacher.finetuned=true", "teacher.model={root}/teacher-abc"],
        ["was fine-tuned with labels ['A', 'B', 'C'] but the dataset's are ['neg', 'neu', 'pos']", "the names differ"],
    ),
    "teacher-label-count-mismatch": Case(
        "student", ["teacher.finetuned=true", "teacher.model={bert}"],
        ["predicts 2 labels ['LABEL_0', 'LABEL_1'] but the dataset has 3", "fine-tuned on the same label set"],
    ),
    "tokenizers-cannot-be-aligned": Case(
        "student", ["student.num_layers=null", "student.model={roberta}", "distill.hidden_weight=1.0"],
        ["the hidden term compares token positions, which needs teacher and student with the same tokenizer"],
    ),
    "layer-map-out-of-range": Case(
        "run", ["distill.hidden_weight=1.0", "distill.layer_map=[7]"],
        ["distill.layer_map=[7]: teacher layers [7] are out of range 1..2"],
    ),
    "student-layers-out-of-range": Case(
        "student", ["student.num_layers=5"], ["cannot cut the student out of teacher", "cannot take 5 layers out of a 2-layer"],
    ),
    "no-finetuned-teacher": Case(
        "student", ["output_dir={root}/elsewhere"], ["no fine-tuned teacher at {root}/elsewhere/teacher/model", "distill teacher"]
    ),
    "output-dir-not-writable": Case(
        "teacher", ["output_dir={root}/a-file/run"], ["output_dir is not writable", "{root}/a-file/run/teacher"]
    ),
    "not-enough-disk-for-cache": Case(
        "student", ["distill.teacher_outputs=cached"], ["not enough disk space to write the teacher cache", "distill.cache_dir"],
        patch=tiny_disk,
    ),
    "overwrite-with-bad-data-deletes-nothing": Case(
        "teacher", ["overwrite=true", "train.lr=5e-4", "data.files.train={root}/missing.jsonl"],
        ["data file not found: {root}/missing.jsonl"],
    ),
    "null-label": Case(
        "student", ["data.files.test={root}/null-label.jsonl"],
        ["split 'test' ({root}/null-label.jsonl): row 3: column 'label' is null", "data.drop_invalid=true"],
    ),
    "empty-text": Case(
        "student", ["data.files.validation={root}/empty-text.jsonl"],
        ["split 'validation' ({root}/empty-text.jsonl): row 2: column 'text' is empty"],
    ),
    "label-types-mixed": Case(
        "student", ["data.files.test={root}/mixed-types.jsonl"],
        ["column 'label' mixes label kinds: integer ids 1 (split 'test' ({root}/mixed-types.jsonl), row 5)"],
    ),
    "labels-differ-only-by-case": Case(
        "student", ["data.files.test={root}/case-variant.jsonl"],
        ["differ only by case or surrounding spaces: 'Pos' (split 'test' ({root}/case-variant.jsonl), row 5) vs 'pos'"],
    ),
    "label-not-in-task-labels": Case(
        "student", ["task.labels=[neg,pos]"], ["has labels that are not in task.labels ['neg', 'pos']: 'neu'"],
    ),
    "file-not-utf8": Case(
        "student", ["data.files.validation={root}/latin1.jsonl"],
        ["{root}/latin1.jsonl:2: not valid UTF-8 (byte 0xf1", "iconv"],
    ),
    "conllu-declared-as-conll": Case(
        "student", ["data.files.train={root}/ud.conllu", "data.format=conll"],
        ["{root}/ud.conllu:2: this is CoNLL-U", "Set data.format=conllu"],
    ),
    "column-role-typo": Case(
        "student", ["data.columns.lable=label"],
        ["data.columns.lable: 'lable' is not a column role of classification", "Did you mean 'data.columns.label'?"],
    ),
    "unknown-tracker": Case("run", ["tracking.report_to=[wandbb]"], ["unknown tracker 'wandbb'", "Did you mean 'wandb'?"]),
    "negative-seed": Case("run", ["seed=-3"], ["seed=-3 is out of range"]),
    "albeto-base-beyond-12-layers": Case(
        "student", ["student.num_layers=null", "student.model=albeto-base-13"],
        ["'albeto-base-13' is not in the student catalog: ALBETO base has 12 layers (albeto-base-N: N in 1..12)"],
    ),
    "model-folder-missing": Case(
        "student", ["student.num_layers=null", "student.model={root}/models/gone"], ["no such folder: {root}/models/gone"],
    ),
    "eval-checkpoint-missing": Case(
        "eval", ["checkpoint={root}/no-such-run/student/model"], ["checkpoint={root}/no-such-run/student/model: no such folder"],
    ),
    "augment-mlm-without-head": Case(
        "run", ["augment.copies=1", "augment.method=mlm", "augment.model={bert}"],
        ["augment.model='{bert}' has no trained masked-LM head", "method=embedding"],
    ),
    "transfer-file-not-utf8": Case(
        "student", ["data.transfer=[{{files: [{root}/latin1.txt]}}]"],
        ["data.transfer[0]: {root}/latin1.txt:2: not valid UTF-8 (byte 0xf1", "latin1"],
    ),
    "transfer-column-of-numbers": Case(
        "student", ["data.transfer=[{{files: [{root}/numbers.jsonl]}}]"],
        ["data.transfer[0]: column 'text' (text) holds int values", "data.transfer[0].columns.text=<column>"],
    ),
    "validation-from-train-not-a-fraction-or-count": Case(
        "run", ["data.validation_from_train=1.5"], ["data.validation_from_train=1.5: use a fraction"],
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_caught_early_and_loses_nothing(name, world, tmp_path, monkeypatch, capsys):
    case = CASES[name]
    run = tmp_path / "run"
    shutil.copytree(world.base_run, run)
    before = snapshot(run)
    fill = {"root": str(world.root), "run": str(run), **{k: str(v) for k, v in world.paths.items()}}
    forwards = {"n": 0}
    original = train.Trainee.forward

    def counting(self, *args, **kwargs):
        forwards["n"] += self.training
        return original(self, *args, **kwargs)

    monkeypatch.setattr(train.Trainee, "forward", counting)
    if case.patch:
        case.patch(monkeypatch)
    recipe = world.root / case.recipe if case.recipe else world.recipe
    argv = [case.command, str(recipe), f"output_dir={run}", *(o.format(**fill) for o in case.overrides)]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    for text in case.expect:
        assert text.format(**fill) in err, err
    assert err.startswith("distill: ") and "Traceback" not in err
    assert forwards["n"] == 0, "a training step ran before the error"
    assert snapshot(run) == before, "files of the earlier run were changed, added or removed"


def test_the_table_has_enough_cases():
    assert len(CASES) >= 15


def test_teacher_with_another_label_order_is_reordered(tiny_bert_dir):
    """Same names, other order: the output rows are permuted so logits follow the data's order."""
    config = tiny_bert_config(id2label={0: "pos", 1: "neg", 2: "neu"})
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config).eval()
    ids = torch.tensor([[101, 2000, 2001, 102]])
    with torch.no_grad():
        before = model(input_ids=ids).logits[0]  # [3] in the order pos, neg, neu
    models.align_labels(model, LABELS, "teacher")
    with torch.no_grad():
        after = model(input_ids=ids).logits[0]  # [3] in the order neg, neu, pos
    assert torch.allclose(after, before[[1, 2, 0]])
    assert model.config.id2label == {0: "neg", 1: "neu", 2: "pos"}
    assert isinstance(models.output_layer(model, 3), nn.Linear)


PREFLIGHT_CASES = {
    "layer-map-out-of-range": (["distill.hidden_weight=1.0", "distill.layer_map=[7]"], "teacher layers [7] are out of range 1..2"),
    "tokenizers-cannot-be-aligned": (
        ["student.num_layers=null", "student.model={roberta}", "distill.hidden_weight=1.0"], "needs teacher and student with the same tokenizer"
    ),
    "student-not-loadable": (["student.num_layers=null", "student.model={root}/not-a-model"], "exists but is not a loadable model"),
    "student-layers-out-of-range": (["student.from_teacher_layers=[0,2]", "student.num_layers=null"], "must be increasing, unique and in 0..1"),
    "student-data-missing-column": (["data.columns.text=sentence"], "has no column 'sentence'"),
    # known before the teacher trains: the augmenting masked LM, the transfer files
    "augment-mlm-without-head": (["augment.copies=1", "augment.method=mlm", "augment.model={bert}"], "has no trained masked-LM head"),
    "transfer-file-not-utf8": (["data.transfer=[{{files: [{root}/latin1.txt]}}]"], "latin1.txt:2: not valid UTF-8"),
    "transfer-column-of-numbers": (["data.transfer=[{{files: [{root}/numbers.jsonl]}}]"], "column 'text' (text) holds int values"),
}


@pytest.mark.parametrize("name", list(PREFLIGHT_CASES))
def test_preflight_fails_before_the_teacher_trains(name, world, tmp_path):
    """`distill run` can check the student's setup before fine-tuning the teacher: against the
    pretrained teacher, from configs and tokenizers only, writing nothing."""
    from distill.config import load_config
    from distill.errors import DataError
    from distill.models import ModelLoadError

    overrides, message = PREFLIGHT_CASES[name]
    fill = {"root": str(world.root), **{k: str(v) for k, v in world.paths.items()}}
    run = tmp_path / "fresh"
    cfg = load_config(world.recipe, [f"output_dir={run}", *(o.format(**fill) for o in overrides)])
    with pytest.raises((train.StageError, DataError, ModelLoadError)) as info:
        preflight(cfg, ["teacher", "student"])
    assert message in str(info.value)
    written = [p for p in run.rglob("*") if p.is_file()]
    assert written == []


def test_preflight_passes_a_good_recipe_and_refuses_a_different_student_config(world, tmp_path):
    from distill.config import load_config

    run = tmp_path / "run"
    shutil.copytree(world.base_run, run)
    (run / "student").mkdir()
    (run / "student" / "config.yaml").write_text((run / "teacher" / "config.yaml").read_text())
    good = load_config(world.recipe, [f"output_dir={tmp_path / 'fresh'}"])
    preflight(good, ["teacher", "student", "baseline"])  # no error, no file written
    assert not [p for p in (tmp_path / "fresh").rglob("*") if p.is_file()]
    other = load_config(world.recipe, [f"output_dir={run}", "distill.temperature=4.0"])
    with pytest.raises(train.StageError, match="holds a run with a different config"):
        preflight(other, ["teacher", "student"])


# --- QA: what the tokenizers make of the rows, known before the teacher trains -----------------


def qa_recipe(root: Path, teacher: str, student: str, extra: str = "") -> Path:
    data = Path(__file__).resolve().parents[1] / "distill" / "sample_data" / "qa_es"
    recipe = root / "qa.yaml"
    recipe.write_text(
        f"""# QA preflight: distill run qa.yaml output_dir=...
task: {{family: qa, name: tiny-qa}}
data:
  files: {{train: {data}/train.json, validation: {data}/validation.json}}
  max_length: 128
  doc_stride: 32
teacher: {{model: {teacher}{extra}}}
student: {{model: {student}}}
distill: {{ce_weight: 0.0, kd_weight: 1.0}}
train: {{batch_size: 4, epochs: 1}}
tracking: {{report_to: []}}
"""
    )
    return recipe


def test_qa_teacher_windows_too_short_for_the_questions_name_the_teachers_key(world, tmp_path):
    """Across tokenizers the teacher reads the questions in windows of its own `max_length`; a
    question that leaves no room there is named with that key (not data.max_length), before the
    teacher is fine-tuned."""
    from distill.config import load_config
    from distill.errors import DataError

    recipe = qa_recipe(tmp_path, world.paths["roberta"], world.paths["bert"], ", max_length: 12, doc_stride: 4")
    cfg = load_config(recipe, [f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(DataError) as info:
        preflight(cfg, ["teacher", "student"])
    message = str(info.value)
    assert "of split 'train': the question has" in message and "teacher.max_length=12 leaves no room" in message
    assert "raise teacher.max_length" in message and "data.max_length" not in message
    assert not (tmp_path / "run").exists()
    good = load_config(recipe, [f"output_dir={tmp_path / 'run'}", "teacher.max_length=128", "teacher.doc_stride=32"])
    preflight(good, ["teacher", "student"])


def test_qa_with_a_left_padding_tokenizer_is_refused_before_any_step(world, tmp_path):
    """The QA features place the context mask, answer positions and CLS index for right padding;
    a tokenizer that pads on the left would misalign every batch."""
    from distill.config import load_config

    left = tmp_path / "left-padding-bert"
    shutil.copytree(world.paths["bert"], left)
    config = json.loads((left / "tokenizer_config.json").read_text())
    (left / "tokenizer_config.json").write_text(json.dumps({**config, "padding_side": "left"}))
    recipe = qa_recipe(tmp_path, world.paths["bert"], str(left))
    cfg = load_config(recipe, [f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(train.StageError, match=rf"the tokenizer {left} \(\w+\) pads on the left.*\"padding_side\": \"right\""):
        preflight(cfg, ["teacher", "student"])
    assert not (tmp_path / "run").exists()
