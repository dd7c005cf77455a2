"""Cutting layers out of any encoder layout (distill/models/layers.py), and students cut out of
`student.model` as well as out of the teacher."""

from pathlib import Path

import pytest
import torch
import transformers as T
from torch import nn

from distill.config import ConfigError, load_config
from distill.errors import ModelLoadError
from distill.models import layers as L
from distill.models.load import build_trained_model, load_model, student_config

SIZE = dict(vocab_size=100, hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64)
SPECIAL = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)

# model type -> (config, dotted name of its layer list in a sequence classifier)
LAYOUTS = {
    "bert": (lambda: T.BertConfig(**SIZE), "bert.encoder.layer"),
    "roberta": (lambda: T.RobertaConfig(**SIZE, **SPECIAL), "roberta.encoder.layer"),
    "xlm-roberta": (lambda: T.XLMRobertaConfig(**SIZE, **SPECIAL), "roberta.encoder.layer"),
    "electra": (lambda: T.ElectraConfig(embedding_size=16, **SIZE), "electra.encoder.layer"),
    "distilbert": (
        lambda: T.DistilBertConfig(vocab_size=100, dim=32, n_layers=4, n_heads=2, hidden_dim=64),
        "distilbert.transformer.layer",
    ),
    "deberta-v2": (
        lambda: T.DebertaV2Config(relative_attention=True, position_buckets=8, pos_att_type=["p2c", "c2p"], **SIZE),
        "deberta.encoder.layer",
    ),
    "modernbert": (
        lambda: T.ModernBertConfig(
            cls_token_id=1, sep_token_id=2, global_attn_every_n_layers=2, local_attention=4, **SIZE, **SPECIAL
        ),
        "model.layers",
    ),
}
IDS = torch.tensor([[1, 5, 7, 9, 11, 13, 15, 17, 19, 2]])


def tiny(config) -> nn.Module:
    torch.manual_seed(0)
    return T.AutoModelForSequenceClassification.from_config(config).eval()


@pytest.mark.parametrize("kind", sorted(LAYOUTS))
def test_cut_keeps_the_chosen_layers_of_any_layout(kind, tmp_path):
    make, where = LAYOUTS[kind]
    model = tiny(make())
    _, _, name = L.find_layers(model)
    assert name == where
    before = {k: v.clone() for k, v in model.state_dict().items()}
    full = model(input_ids=IDS, output_hidden_states=True).hidden_states

    cut = L.cut_layers(model, [0, 2])
    assert cut.config.num_hidden_layers == 2 and len(dict(cut.named_modules())[where]) == 2
    if kind == "distilbert":
        assert cut.config.n_layers == 2 and cut.config.to_dict()["n_layers"] == 2
    after = cut.state_dict()
    for new, old in ((0, 0), (1, 2)):  # layer 1 of the cut is layer 2 of the original
        keys = [k for k in after if k.startswith(f"{where}.{new}.")]
        assert keys
        for k in keys:
            assert torch.equal(after[k], before[k.replace(f"{where}.{new}.", f"{where}.{old}.")])
    out = cut(input_ids=IDS, output_hidden_states=True)
    assert len(out.hidden_states) == 3
    assert torch.allclose(out.hidden_states[1], full[1])  # the first layer is the same layer

    cut.save_pretrained(tmp_path)
    again = T.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert again.config.num_hidden_layers == 2
    assert torch.allclose(again(input_ids=IDS).logits, cut(input_ids=IDS).logits, atol=1e-6)  # what was cut is what loads


def test_modernbert_keeps_its_attention_pattern(tmp_path):
    model = tiny(LAYOUTS["modernbert"][0]())
    assert model.config.layer_types == ["full_attention", "sliding_attention"] * 2
    cut = L.cut_layers(model, [0, 1, 3])
    assert cut.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    assert [layer.attention_type for layer in cut.model.layers] == cut.config.layer_types
    assert [layer.layer_idx for layer in cut.model.layers] == [0, 1, 2]
    assert [layer.attn.layer_idx for layer in cut.model.layers] == [0, 1, 2]
    logits = cut(input_ids=IDS).logits
    cut.save_pretrained(tmp_path)
    again = T.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert again.config.layer_types == cut.config.layer_types
    assert torch.equal(again(input_ids=IDS).logits, logits)
    # its first layer has no attention norm: a cut that drops layer 0 could not be loaded back
    with pytest.raises(ModelLoadError, match="keep layer 0"):
        L.cut_layers(tiny(LAYOUTS["modernbert"][0]()), [1, 3])


def test_cut_config_follows_per_layer_lists():
    config = LAYOUTS["modernbert"][0]()
    cut = L.cut_config(config, [1, 2])
    assert cut.layer_types == ["sliding_attention", "full_attention"] and cut.num_hidden_layers == 2
    assert config.num_hidden_layers == 4  # a copy
    distil = L.cut_config(LAYOUTS["distilbert"][0](), [3])
    assert distil.n_layers == 1


def test_albert_runs_its_shared_layer_fewer_times(tmp_path):
    model = tiny(T.AlbertConfig(embedding_size=16, **SIZE))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cut = L.cut_layers(model, [0, 3])
    assert cut.config.num_hidden_layers == 2
    assert all(torch.equal(v, before[k]) for k, v in cut.state_dict().items())  # every weight stays
    out = cut(input_ids=IDS, output_hidden_states=True)
    assert len(out.hidden_states) == 3
    cut.save_pretrained(tmp_path)
    again = T.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert torch.equal(again(input_ids=IDS).logits, out.logits)
    grouped = tiny(T.AlbertConfig(embedding_size=16, num_hidden_groups=2, **SIZE))
    with pytest.raises(ModelLoadError, match="2 layer groups"):
        L.cut_layers(grouped, [0, 1])


def test_a_layout_without_one_layer_list_is_refused_naming_what_was_seen():
    model = tiny(T.BertConfig(**SIZE))
    model.bert.encoder.layer = nn.Sequential(*model.bert.encoder.layer)  # no ModuleList any more
    model.bert.extra = nn.ModuleList([nn.Linear(2, 2)])
    with pytest.raises(ModelLoadError) as err:
        L.cut_layers(model, [0, 1])
    message = str(err.value)
    assert "model_type 'bert'" in message and "4 layers" in message and "bert.extra (1)" in message

    twice = tiny(T.BertConfig(**SIZE))
    twice.bert.copy = nn.ModuleList(nn.Linear(2, 2) for _ in range(4))  # a second list of 4
    with pytest.raises(ModelLoadError, match="several of its module lists .* bert.copy"):
        L.find_layers(twice)


def test_bad_layer_indices():
    model = tiny(T.BertConfig(**SIZE))
    with pytest.raises(ValueError, match=r"0\.\.3"):
        L.cut_layers(model, [0, 4])
    with pytest.raises(ValueError, match="increasing"):
        L.cut_layers(model, [2, 1])


# --- students: a cut of the teacher or of student.model -----------------------------------------


def recipe(tmp_path: Path, student: str, teacher: str = "") -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(
        "task: {family: classification, name: t}\n"
        "data: {files: {train: a.jsonl}}\n"
        + (f"teacher: {{model: {teacher}}}\n" if teacher else "")
        + f"student: {student}\n"
    )
    return path


def test_student_model_can_be_cut(tmp_path, tiny_bert12_dir):
    cfg = load_config(recipe(tmp_path, f"{{model: {tiny_bert12_dir}, num_layers: 4}}"))  # no teacher needed
    kwargs = {"num_labels": 2}
    model, tok = build_trained_model("baseline", cfg.teacher, cfg.student, T.AutoModelForSequenceClassification, kwargs)
    full = load_model(str(tiny_bert12_dir), T.AutoModelForSequenceClassification, **kwargs)
    assert model.config.num_hidden_layers == 4 and model.config.distill_model_layers == [0, 4, 7, 11]
    sd, fsd = model.state_dict(), full.state_dict()
    for new, old in enumerate([0, 4, 7, 11]):
        k = f"bert.encoder.layer.{new}.output.dense.weight"
        assert torch.equal(sd[k], fsd[k.replace(f".{new}.", f".{old}.")])
    assert tok is not None and len(tok) == 30522
    assert student_config(cfg.teacher, cfg.student).num_hidden_layers == 4  # the checks before a run agree


def test_student_albert_model_cut_runs_its_layer_fewer_times(tmp_path, tiny_albert_dir):
    cfg = load_config(recipe(tmp_path, f"{{model: {tiny_albert_dir}, num_layers: 3}}"))
    model, _ = build_trained_model("baseline", cfg.teacher, cfg.student, T.AutoModelForSequenceClassification, {"num_labels": 2})
    assert model.config.num_hidden_layers == 3
    assert len(model(input_ids=IDS, output_hidden_states=True).hidden_states) == 4


def test_a_cut_of_the_teacher_still_needs_a_teacher_and_from_teacher_layers_needs_no_student_model(tmp_path):
    with pytest.raises(ConfigError, match="cut the teacher: set teacher.model, or student.model"):
        load_config(recipe(tmp_path, "{num_layers: 2}"))
    with pytest.raises(ConfigError, match="student.from_teacher_layers picks layers of the teacher.*student.num_layers=N"):
        load_config(recipe(tmp_path, "{model: some/model, from_teacher_layers: [0, 2]}", teacher="some/teacher"))
    cfg = load_config(recipe(tmp_path, "{from_teacher_layers: [0, 2]}", teacher="some/teacher"))
    assert cfg.student.from_teacher_layers == [0, 2]


def test_student_model_cut_deeper_than_the_model_is_refused(tmp_path, tiny_bert_dir):
    cfg = load_config(recipe(tmp_path, f"{{model: {tiny_bert_dir}, num_layers: 3}}"))
    with pytest.raises(Exception, match=r"cannot cut the student out of student.model .*\(2 layers\)"):
        student_config(cfg.teacher, cfg.student)
