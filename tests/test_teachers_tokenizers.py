"""Several teachers whose tokenizers differ from each other (`teachers:`).

The training batches carry the main teacher's inputs (distill.intermediate_teacher); every
teacher of another tokenizer runs once on its own tokenization of the same training rows into
the teacher cache and is read back by the student's feature ids. Checked here against each
teacher run alone on its own tokenization, for classification (one row per example) and
tagging (word windows planned over every tokenizer, so a feature id names the same words for
every teacher), with the refusals: `teacher_outputs=online` with teachers apart, and QA with
several teachers that do not share the student's tokenizer.

Teachers are tiny fine-tuned-shaped models built from configs (random weights, `finetuned:
true`): a WordPiece BERT (the student's tokenizer) and a byte-level BPE RoBERTa.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
)

from distill.loop.preflight import preflight
from distill.loop.plan import plan_stage
from distill.loop import setup
from distill.cli import main
from distill.config import load_config
from distill.errors import StageError
from distill.tasks import get_task
from distill.teachers.teacher import CachedTeacher, EnsembleTeacher
from tests.conftest import minilm_path, tiny_bert_config, write_keyword_data

WORDS = {"pos": ["bueno", "genial", "rápido", "barato"], "neg": ["malo", "lento", "roto", "caro"],
         "neu": ["normal", "regular", "común", "medio"]}
CLASSES = sorted(WORDS)
TAGS = ["B-LOC", "B-PER", "O"]
TEMPERATURE = 2.0
# float16 in the teacher cache: about 3 significant digits of each logit
ATOL = 3e-3


def save_teacher(dst: Path, tokenizer_src: Path, head, labels: list[str], roberta_src: Path | None = None) -> Path:
    """A fine-tuned-shaped teacher: random weights (large enough that teachers disagree), the
    head for `labels`, and the tokenizer of `tokenizer_src`."""
    names = {"id2label": dict(enumerate(labels)), "label2id": {n: i for i, n in enumerate(labels)}}
    if roberta_src is None:
        config = tiny_bert_config(layers=1, initializer_range=0.4, **names)
    else:
        config = AutoConfig.from_pretrained(roberta_src, num_hidden_layers=1, initializer_range=0.4, **names)
    torch.manual_seed(len(str(dst)))
    head.from_config(config).save_pretrained(dst)
    AutoTokenizer.from_pretrained(tokenizer_src).save_pretrained(dst)
    return dst


@pytest.fixture(scope="module")
def teachers(tmp_path_factory, tiny_roberta_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("teachers-apart")
    cls, tag = AutoModelForSequenceClassification, AutoModelForTokenClassification
    return {
        "cls_bert": save_teacher(root / "cls-bert", minilm_path(), cls, CLASSES),
        "cls_bpe": save_teacher(root / "cls-bpe", tiny_roberta_dir, cls, CLASSES, tiny_roberta_dir),
        "tag_bert": save_teacher(root / "tag-bert", minilm_path(), tag, TAGS),
        "tag_bpe": save_teacher(root / "tag-bpe", tiny_roberta_dir, tag, TAGS, tiny_roberta_dir),
    }


def write_recipe(root: Path, family: str, data: str, teachers: list[Path], student: Path, body: str = "") -> Path:
    listed = "\n".join(f"  - {{model: {t}, finetuned: true}}" for t in teachers)
    path = root / "recipe.yaml"
    path.write_text(
        f"""task: {{family: {family}, name: tiny}}
data:
  {data}
  max_length: 32
  doc_stride: 8
teachers:
{listed}
student: {{model: {student}}}
train: {{lr: 1e-3, batch_size: 8, epochs: 1, logging_steps: 1}}
tracking: {{report_to: []}}
output_dir: {root}/run
seed: 5
{body}
"""
    )
    return path


def own_model(path: Path, head):
    return head.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def mean_probs(logits: list[torch.Tensor]) -> torch.Tensor:
    """The mean of the teachers' softmax at the distillation temperature (by hand)."""
    return torch.stack([torch.softmax(z.float() / TEMPERATURE, -1) for z in logits]).mean(0)


# ---------------------------------------------------------------------------------------------
# Classification
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cls_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cls-data")
    write_keyword_data(root, WORDS, {"train": 24, "validation": 8, "test": 8})
    return root


def cls_recipe(root: Path, data: Path, teachers: dict, student: Path, main_teacher: int, body: str = "") -> Path:
    files = f"files: {{train: {data}/train.jsonl, validation: {data}/validation.jsonl, test: {data}/test.jsonl}}"
    return write_recipe(
        root, "classification", files, [teachers["cls_bert"], teachers["cls_bpe"]], student,
        f"distill: {{kd_weight: 1.0, ce_weight: 0.5, temperature: {TEMPERATURE}, teacher_combine: mean, "
        f"intermediate_teacher: {main_teacher}}}\n{body}",
    )


@pytest.mark.parametrize("main_teacher", [0, 1])
def test_classification_targets_are_each_teacher_on_its_own_tokenization(
    tmp_path, cls_data, teachers, tiny_bert_dir, main_teacher
):
    """Main teacher 0 (the student's WordPiece): the batch carries no teacher inputs and the BPE
    teacher reads its own copy. Main teacher 1 (BPE): the batch carries the BPE inputs, and the
    WordPiece teacher's copy holds the student's inputs only."""
    cfg = load_config(cls_recipe(tmp_path, cls_data, teachers, tiny_bert_dir, main_teacher))
    stage = setup.setup_stage(plan_stage(cfg, "student"), Accelerator(cpu=True))
    ensemble = stage.teacher
    assert isinstance(ensemble, EnsembleTeacher) and ensemble.main == main_teacher
    apart = 1 - main_teacher
    assert isinstance(ensemble.teachers[apart], CachedTeacher)
    # the batch carries the main teacher's inputs: BPE ones only when the main teacher is BPE
    bpe = AutoTokenizer.from_pretrained(teachers["cls_bpe"])
    features = stage.features["train"]
    assert ("teacher_input_ids" in features.column_names) == (main_teacher == 1)
    if main_teacher == 1:
        assert features[0]["teacher_input_ids"] == bpe(stage.raw["train"][0]["text"], truncation=True, max_length=32)["input_ids"]
    assert len(list((tmp_path / "run" / "teacher_cache").iterdir())) == 2  # one cache per teacher

    batch = stage.task.collate(list(features))
    combined = ensemble(batch).targets["logits"]  # [rows, classes]
    texts = [stage.raw["train"][int(i)]["text"] for i in batch["example_id"]]
    alone = []
    for name in ("cls_bert", "cls_bpe"):  # each teacher alone, on its own tokenization of the text
        model, tok = own_model(teachers[name], AutoModelForSequenceClassification)
        with torch.no_grad():
            alone.append(model(**tok(texts, truncation=True, max_length=32, padding=True, return_tensors="pt")).logits)
    p0, p1 = (torch.softmax(z / TEMPERATURE, -1) for z in alone)
    assert (p0 - p1).abs().max() > 0.05  # the two teachers disagree: the mean is not either one
    got = torch.softmax(combined / TEMPERATURE, -1)
    assert torch.allclose(got, mean_probs(alone), atol=ATOL)
    # the combined logits are T * log(mean p) exactly, as for teachers of one tokenizer
    assert torch.allclose(combined, TEMPERATURE * mean_probs(alone).log(), atol=5 * ATOL)


def test_a_student_stage_runs_from_teachers_apart(tmp_path, cls_data, teachers, tiny_bert_dir):
    """`distill student` with the BPE teacher as the main one (its inputs in the batch) and the
    student's own tokenizer read from the cache: every step has a soft-label loss."""
    path = cls_recipe(tmp_path, cls_data, teachers, tiny_bert_dir, 1)
    assert main(["student", str(path)]) == 0
    run = tmp_path / "run"
    metrics = json.loads((run / "student" / "metrics.json").read_text())
    assert metrics["info"]["teacher"] == [str(teachers["cls_bert"]), str(teachers["cls_bpe"])]
    assert metrics["info"]["intermediate_teacher"] == 1 and metrics["info"]["teacher_combine"] == "mean"
    assert 0.0 <= metrics["test"]["accuracy"] <= 1.0
    steps = [json.loads(x) for x in (run / "student" / "log.jsonl").read_text().splitlines()]
    kd = [r["train/loss_kd"] for r in steps if "train/loss" in r]
    assert len(kd) == 3 and all(v > 0 for v in kd)  # 24 rows, batch 8, one epoch
    assert len(list((run / "teacher_cache").iterdir())) == 2  # no hidden states: both teachers cached


# ---------------------------------------------------------------------------------------------
# Tagging: word windows planned over every teacher's tokenizer
# ---------------------------------------------------------------------------------------------

# WordPiece gives these 13 words 27 sub-tokens (one window of 30), the byte-level BPE 55: the
# BPE teacher's budget alone cuts the sentence into several windows
LONG = "Ana vive en Madrid con Kwyjibo Zorblax y Pérez Xanthippe Quetzalcóatl en Sevilla".split()
LONG_TAGS = ["B-PER", "O", "O", "B-LOC", "O", "B-PER", "O", "O", "B-PER", "O", "O", "O", "B-LOC"]
SHORT = [
    (["El", "gato", "duerme", "en", "Madrid"], ["O", "O", "O", "O", "B-LOC"]),
    (["Ana", "lee", "un", "libro"], ["B-PER", "O", "O", "O"]),
    (["Hace", "calor", "en", "Sevilla", "."], ["O", "O", "O", "B-LOC", "O"]),
]


@pytest.fixture(scope="module")
def tag_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tag-data")
    splits = {"train": [(LONG, LONG_TAGS)] + SHORT, "validation": SHORT}
    for split, rows in splits.items():
        (root / f"{split}.jsonl").write_text(
            "".join(json.dumps({"tokens": w, "tags": t}, ensure_ascii=False) + "\n" for w, t in rows)
        )
    return root


def tag_recipe(root: Path, data: Path, teachers: dict, student: Path, body: str = "") -> Path:
    files = f"files: {{train: {data}/train.jsonl, validation: {data}/validation.jsonl}}"
    return write_recipe(
        root, "tagging", files, [teachers["tag_bert"], teachers["tag_bpe"]], student,
        f"distill: {{kd_weight: 1.0, temperature: {TEMPERATURE}, teacher_combine: mean}}\n{body}",
    )


def word_logits(path: Path, windows: list[list[str]]) -> list[tuple[torch.Tensor, list[bool]]]:
    """Teacher `path` alone on its own tokenization of each window: the logits at each word's
    first sub-token [words, tags], and which words kept a sub-token."""
    model, tok = own_model(path, AutoModelForTokenClassification)
    out = []
    for words in windows:
        enc = tok(words, is_split_into_words=True, truncation=True, max_length=32, return_tensors="pt")
        assert enc["input_ids"].size(1) <= 32
        with torch.no_grad():
            logits = model(**enc).logits[0]  # [seq, tags]
        starts = {}
        for pos, w in enumerate(enc.word_ids(0)):
            if w is not None and w not in starts:
                starts[w] = pos
        rows = torch.stack([logits[starts[w]] if w in starts else torch.zeros(len(TAGS)) for w in range(len(words))])
        out.append((rows, [w in starts for w in range(len(words))]))
    return out


def test_tagging_windows_fit_every_teacher_and_word_targets_combine_by_hand(tmp_path, tag_data, teachers, tiny_bert_dir):
    cfg = load_config(tag_recipe(tmp_path, tag_data, teachers, tiny_bert_dir))
    accelerator = Accelerator(cpu=True)
    stage = setup.setup_stage(plan_stage(cfg, "student"), accelerator)
    features, raw = stage.features["train"], stage.raw["train"]
    bert, bpe = (AutoTokenizer.from_pretrained(teachers[k]) for k in ("tag_bert", "tag_bpe"))

    # the long sentence: one window for WordPiece alone, several once the BPE budget binds
    alone = get_task(cfg.task, cfg.data)
    alone.setup(stage.raw)
    alone.bind(bert)
    assert alone.preprocess(raw, "train")["example_id"].count(0) == 1
    assert features["example_id"].count(0) >= 2
    windows = [raw[e]["tokens"][o : o + n] for e, o, n in zip(features["example_id"], features["word_offset"], features["num_words"])]
    for words in windows:  # every window fits the BPE teacher without truncation
        assert len(bpe(words, is_split_into_words=True)["input_ids"]) <= 32
    with pytest.raises(StageError, match="cannot be read by the student's feature ids"):
        setup.check_aligned(features, alone.preprocess(raw, "train"), "a plan without the BPE teacher")

    # the BPE teacher's own copy: its inputs, the student's feature ids and windows
    inputs = setup.teacher_inputs(plan_stage(cfg, "student"), stage.task, stage.tokenizer, [bert, bpe], [1], raw, features, accelerator)
    assert inputs[0] == (stage.task, features)
    own_task, own = inputs[1]
    assert own_task is not stage.task and own_task.teacher_tokenizer is not None and stage.task.teacher_tokenizer is None
    for col in ("feature_id", "example_id", "word_offset", "num_words", "input_ids", "word_starts"):
        assert own[col] == features[col]
    assert "teacher_input_ids" in own.column_names and "teacher_input_ids" not in features.column_names
    assert own[0]["teacher_input_ids"] == bpe(windows[0], is_split_into_words=True, truncation=True, max_length=32)["input_ids"]

    # the combined word targets against each teacher alone on its own tokenization of the window
    ensemble = stage.teacher
    assert isinstance(ensemble.teachers[1], CachedTeacher)
    batch = stage.task.collate(list(features))
    out = ensemble(batch).targets
    per_teacher = [word_logits(teachers[k], windows) for k in ("tag_bert", "tag_bpe")]
    compared = 0
    for f, words in enumerate(windows):
        (z0, kept0), (z1, kept1) = per_teacher[0][f], per_teacher[1][f]
        n = len(words)
        assert out["word_mask"][f, :n].tolist() == [a and b for a, b in zip(kept0, kept1)]
        got = torch.softmax(out["word_logits"][f, :n] / TEMPERATURE, -1)
        expected = mean_probs([z0, z1])
        keep = out["word_mask"][f, :n]
        assert torch.allclose(got[keep], expected[keep], atol=ATOL)
        compared += int(keep.sum())
    assert compared == sum(len(w) for w in windows)  # both tokenizers keep every word here
    p0 = torch.softmax(per_teacher[0][0][0] / TEMPERATURE, -1)
    p1 = torch.softmax(per_teacher[1][0][0] / TEMPERATURE, -1)
    assert (p0 - p1).abs().max() > 0.05  # the teachers disagree: the mean is neither


def test_misaligned_copies_are_refused_by_column(tmp_path, tag_data, teachers, tiny_bert_dir):
    cfg = load_config(tag_recipe(tmp_path, tag_data, teachers, tiny_bert_dir))
    task = get_task(cfg.task, cfg.data)
    raw = setup.load_data(cfg.data, cfg.seed, task)["train"]
    task.bind(AutoTokenizer.from_pretrained(teachers["tag_bert"]))
    features = task.preprocess(raw, "train")
    shifted = features.map(lambda f: {"word_offset": f["word_offset"] + 1})
    with pytest.raises(StageError, match=r"teachers\[1\] \(x\)'s copy .* \(column 'word_offset' differs\)"):
        setup.check_aligned(features, shifted, "teachers[1] (x)")
    setup.check_aligned(features, features, "itself")  # equal copies pass


def test_the_planning_tokenizers_name_the_features(teachers, tag_data, tmp_path, tiny_bert_dir):
    """datasets reuses cached features by their fingerprint: it covers the tokenizers planned
    over, as a set."""
    cfg = load_config(tag_recipe(tmp_path, tag_data, teachers, tiny_bert_dir))
    task = get_task(cfg.task, cfg.data)
    raw = setup.load_data(cfg.data, cfg.seed, task)["train"]
    bert, bpe = (AutoTokenizer.from_pretrained(teachers[k]) for k in ("tag_bert", "tag_bpe"))
    prints = []
    for plan in ([], [bpe], [bert, bpe], [bpe, bert]):
        task.bind(bert, plan_tokenizers=plan)
        prints.append(task.features_fingerprint(raw, "train"))
    assert prints[0] != prints[1] != prints[2] and prints[2] == prints[3]


# ---------------------------------------------------------------------------------------------
# Refused
# ---------------------------------------------------------------------------------------------


def test_online_teacher_outputs_with_teachers_apart_are_refused(tmp_path, cls_data, teachers, tiny_bert_dir, capsys):
    path = cls_recipe(tmp_path, cls_data, teachers, tiny_bert_dir, 0)
    cfg = load_config(path, ["distill.teacher_outputs=online"])
    with pytest.raises(StageError) as err:
        preflight(cfg, ["student"])
    message = str(err.value)
    assert f"teachers[1] ({teachers['cls_bpe']}) tokenizes unlike teachers[0] ({teachers['cls_bert']})" in message
    assert "distill.teacher_outputs=online cannot serve it" in message
    assert "distill.intermediate_teacher=0" in message and "Set distill.teacher_outputs=auto (or cached)" in message
    with pytest.raises(StageError, match="distill.teacher_outputs=online cannot serve it"):
        setup.setup_stage(plan_stage(cfg, "student"), Accelerator(cpu=True))
    assert main(["student", str(path), "distill.teacher_outputs=online"]) == 2
    assert "teacher_outputs=online cannot serve it" in capsys.readouterr().err
    assert not any((tmp_path / "run").rglob("config.yaml")) and not (tmp_path / "run" / "teacher_cache").exists()
    # teachers of one tokenizer may still run online
    same = load_config(path, ["distill.teacher_outputs=online", f"teachers=[{{model: {teachers['cls_bert']}, finetuned: true}}, "
                              f"{{model: {teachers['cls_bert']}, finetuned: true, seed: 2}}]"])
    preflight(same, ["student"])


@pytest.mark.parametrize("student_of", ["cls_bert", "cls_bpe"])
def test_qa_with_several_teachers_of_differing_tokenizers_is_refused(tmp_path, teachers, tiny_bert_dir, tiny_roberta_dir, student_of, capsys):
    """Whichever tokenizer the student has, one of the two teachers does not share it."""
    data = Path(__file__).parent.parent / "distill" / "sample_data" / "qa_es"
    files = f"files: {{train: {data / 'train.json'}, validation: {data / 'validation.json'}}}"
    student = tiny_bert_dir if student_of == "cls_bert" else tiny_roberta_dir
    path = write_recipe(tmp_path, "qa", files, [teachers["cls_bert"], teachers["cls_bpe"]], student, "distill: {kd_weight: 1.0}")
    other = 1 if student_of == "cls_bert" else 0
    message = (f"QA with several teachers needs teachers that share the student's tokenizer; "
               f"teachers[{other}] ({teachers['cls_bpe' if other else 'cls_bert']}) uses")
    with pytest.raises(StageError) as err:
        preflight(load_config(path), ["student"])
    assert message in str(err.value)
    assert main(["student", str(path)]) == 2
    assert message in capsys.readouterr().err
    with pytest.raises(ValueError, match="several teachers must share the student's tokenizer"):
        _task_of(load_config(path)).bind(AutoTokenizer.from_pretrained(student), plan_tokenizers=[AutoTokenizer.from_pretrained(student)])


def _task_of(cfg):
    return get_task(cfg.task, cfg.data)
