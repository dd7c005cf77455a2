"""Student catalog, truncated ALBERTs, layer-subset students, label alignment."""

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from distill import models
from distill.objective.losses import HiddenStateLoss
from distill.errors import StageError
from distill.models import align_labels


@pytest.mark.parametrize(
    "name, expected",
    [
        ("albeto-tiny", ("dccuchile/albert-tiny-spanish", {})),
        ("albeto-base-2", ("dccuchile/albert-base-spanish", {"num_hidden_layers": 2})),
        ("albeto-base-10", ("dccuchile/albert-base-spanish", {"num_hidden_layers": 10})),
    ],
)
def test_catalog(name, expected):
    assert models.resolve_student(name) == expected
    assert models.resolve(name) == expected


def test_non_catalog_names_pass_through():
    assert models.resolve("PlanTL-GOB-ES/roberta-base-bne") == ("PlanTL-GOB-ES/roberta-base-bne", {})
    with pytest.raises(KeyError):
        models.resolve_student("albeto-base-13")


def test_study_names():
    assert models.short_name("albeto-base-6") == "albert-base-6-spanish"
    assert models.short_name("albeto-tiny") == "albert-tiny-spanish"
    assert models.short_name("org/my-model") == "my-model"


@pytest.mark.parametrize("n", [2, 4, 6, 8, 10])
def test_truncated_albert_keeps_every_weight_and_runs_the_layer_n_times(tiny_albert_dir, n):
    full = models.load_model(str(tiny_albert_dir), AutoModelForSequenceClassification, num_labels=2)
    cut = models.load_model(
        str(tiny_albert_dir), AutoModelForSequenceClassification, config_overrides={"num_hidden_layers": n}, num_labels=2
    )
    assert cut.config.num_hidden_layers == n
    a, b = full.state_dict(), cut.state_dict()
    assert a.keys() == b.keys()
    backbone = [k for k in a if not k.startswith("classifier")]
    assert all(torch.equal(a[k], b[k]) for k in backbone)  # every pretrained weight loaded
    assert models.count_parameters(cut) == models.count_parameters(full)

    calls = []
    group = cut.albert.encoder.albert_layer_groups[0]
    group.register_forward_hook(lambda *args: calls.append(1))
    ids = torch.tensor([[101, 2000, 2001, 102]])
    out = cut(input_ids=ids, output_hidden_states=True)
    assert len(calls) == n
    assert len(out.hidden_states) == n + 1


def test_layer_subset_copies_exactly_the_chosen_layers(tiny_bert12_dir):
    teacher = models.load_model(str(tiny_bert12_dir), AutoModelForSequenceClassification, num_labels=2)
    layers = [0, 4, 8, 11]
    student = models.student_from_teacher(teacher, layers)
    assert student.config.num_hidden_layers == 4
    assert len(student.bert.encoder.layer) == 4
    t_sd, s_sd = teacher.state_dict(), student.state_dict()
    for new, old in enumerate(layers):
        prefix_s, prefix_t = f"bert.encoder.layer.{new}.", f"bert.encoder.layer.{old}."
        keys = [k for k in s_sd if k.startswith(prefix_s)]
        assert keys
        for k in keys:
            assert torch.equal(s_sd[k], t_sd[prefix_t + k[len(prefix_s):]])
    for k in ("bert.embeddings.word_embeddings.weight", "classifier.weight"):
        assert torch.equal(s_sd[k], t_sd[k])
    # a copy, not a view: training the student leaves the teacher alone
    with torch.no_grad():
        student.bert.encoder.layer[0].output.dense.weight.add_(1.0)
    assert not torch.equal(student.bert.encoder.layer[0].output.dense.weight, teacher.bert.encoder.layer[0].output.dense.weight)
    ids = torch.tensor([[101, 2000, 2001, 102]])
    assert student(input_ids=ids).logits.shape == (1, 2)


def test_uniform_layer_subset():
    assert models.uniform_layers(12, 4) == [0, 4, 7, 11]
    assert models.uniform_layers(12, 2) == [0, 11]
    assert models.uniform_layers(6, 6) == [0, 1, 2, 3, 4, 5]
    with pytest.raises(ValueError):
        models.uniform_layers(6, 7)


def test_layer_subset_rejects_bad_indices(tiny_bert12_dir):
    teacher = models.load_model(str(tiny_bert12_dir), AutoModelForSequenceClassification, num_labels=2)
    with pytest.raises(ValueError, match="0..11"):
        models.student_from_teacher(teacher, [0, 12])
    with pytest.raises(ValueError, match="increasing"):
        models.student_from_teacher(teacher, [4, 0])


@pytest.mark.parametrize("n", [2, 4, 6, 8, 10])
def test_hidden_mapping_for_truncated_students_under_a_12_layer_teacher(tiny_albert_dir, tiny_bert12_dir, n):
    student = models.load_model(
        str(tiny_albert_dir), AutoModelForSequenceClassification, config_overrides={"num_hidden_layers": n}, num_labels=2
    )
    teacher = models.load_model(str(tiny_bert12_dir), AutoModelForSequenceClassification, num_labels=2)
    loss = HiddenStateLoss(n, 12, student.config.hidden_size, teacher.config.hidden_size)
    assert len(loss.pairs) == n and loss.pairs[-1] == (n, 12)
    ids = torch.tensor([[101, 2000, 2001, 2002, 102, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    hs = student(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    ht = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    value = loss(hs, ht, mask)
    assert value.ndim == 0 and torch.isfinite(value) and value > 0


def test_load_errors_say_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(models.ModelLoadError, match="HF_HUB_OFFLINE is set"):
        models.load_config("no-such-org/no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(models.ModelLoadError, match="exists but is not a loadable model"):
        models.load_config(str(tmp_path / "empty"))


def test_align_labels_reorders_the_output_layer(tiny_bert_dir):
    model = models.load_model(
        str(tiny_bert_dir),
        AutoModelForSequenceClassification,
        new_head=True,
        num_labels=3,
        id2label={0: "neutral", 1: "entailment", 2: "contradiction"},
        label2id={"neutral": 0, "entailment": 1, "contradiction": 2},
    ).eval()
    ids = torch.tensor([[101, 2000, 2001, 102]])
    before = model(input_ids=ids).logits[0]
    dataset_order = ["entailment", "neutral", "contradiction"]
    align_labels(model, dataset_order, "teacher")
    after = model(input_ids=ids).logits[0]
    assert torch.allclose(after, before[[1, 0, 2]])
    assert model.config.id2label == {0: "entailment", 1: "neutral", 2: "contradiction"}
    with pytest.raises(StageError, match="names differ"):
        align_labels(model, ["a", "b", "c"], "teacher")
    with pytest.raises(StageError, match="same label set"):
        align_labels(model, ["a", "b"], "teacher")
