"""Raw data loading: local formats, splits, subsets, and errors that name the problem."""

import json

import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

from distill.config import load_config
from distill.data import DataError, load_raw, subsample
from distill.tasks.classification import ClassificationTask, label_names


def cfg_for(tmp_path, **files):
    args = [f"data.files.{split}={path}" for split, path in files.items()]
    recipe = tmp_path / "r.yaml"
    recipe.write_text("task: {family: classification, name: t}\nstudent: {model: x}\n")
    return load_config(recipe, args)


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


ROWS = [{"text": f"frase {i}", "label": ["a", "b"][i % 2]} for i in range(10)]


def test_local_jsonl_splits_and_subsets(tmp_path):
    train = jsonl(tmp_path / "train.jsonl", ROWS)
    val = jsonl(tmp_path / "val.jsonl", ROWS[:4])
    cfg = cfg_for(tmp_path, train=train, validation=val)
    raw = load_raw(cfg)
    assert set(raw) == {"train", "validation"} and len(raw["train"]) == 10
    cfg.data.max_train_samples, cfg.data.max_eval_samples = 3, 2
    small = subsample(raw, cfg)
    assert (len(small["train"]), len(small["validation"])) == (3, 2)
    assert small["train"]["text"] == ["frase 0", "frase 1", "frase 2"]


def test_headerless_tsv_like_mldoc(tmp_path):
    path = tmp_path / "spanish.train"
    path.write_text('CCAT\tEl "mercado" sube.\nGCAT\tElecciones en mayo.\n')
    cfg = cfg_for(tmp_path, train=path)
    cfg.data.format, cfg.data.column_names = "tsv", ["label", "text"]
    raw = load_raw(cfg)
    assert raw["train"]["label"] == ["CCAT", "GCAT"]
    assert raw["train"]["text"][0] == 'El "mercado" sube.'


def test_folder_with_split_files(tmp_path):
    jsonl(tmp_path / "train.jsonl", ROWS)
    jsonl(tmp_path / "test.jsonl", ROWS[:2])
    cfg = cfg_for(tmp_path)
    cfg.data.source = str(tmp_path)
    raw = load_raw(cfg)
    assert set(raw) == {"train", "test"}


def test_validation_from_train(tmp_path):
    cfg = cfg_for(tmp_path, train=jsonl(tmp_path / "t.jsonl", ROWS))
    cfg.data.validation_from_train = 0.2
    raw = load_raw(cfg)
    assert (len(raw["train"]), len(raw["validation"])) == (8, 2)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="data file not found: .*nope.jsonl"):
        load_raw(cfg_for(tmp_path, train=tmp_path / "nope.jsonl"))


def test_empty_split(tmp_path):
    empty = tmp_path / "val.csv"
    empty.write_text("text,label\n")
    cfg = cfg_for(tmp_path, train=jsonl(tmp_path / "t.jsonl", ROWS), validation=empty)
    with pytest.raises(DataError, match="split 'validation' is empty"):
        load_raw(cfg)


def test_hub_offline_is_explained(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = cfg_for(tmp_path)
    cfg.data.source, cfg.data.name = "no-org/no-dataset", "es"
    with pytest.raises(DataError, match="cannot load dataset 'no-org/no-dataset' \\(config 'es'\\)"):
        load_raw(cfg)


def test_missing_column_names_split_and_fix(tmp_path):
    cfg = cfg_for(tmp_path, train=jsonl(tmp_path / "t.jsonl", ROWS))
    cfg.data.columns = {"text": "premise", "text_pair": "hypothesis"}
    with pytest.raises(DataError, match=r"split 'train' has no column 'premise' \(needed as text\).*data.columns.text="):
        ClassificationTask(cfg).setup(load_raw(cfg))


def test_unseen_eval_label(tmp_path):
    test_rows = ROWS[:2] + [{"text": "otra", "label": "c"}]
    cfg = cfg_for(tmp_path, train=jsonl(tmp_path / "t.jsonl", ROWS), test=jsonl(tmp_path / "x.jsonl", test_rows))
    with pytest.raises(DataError, match=r"split 'test' has labels never seen in training: \['c'\]"):
        ClassificationTask(cfg).setup(load_raw(cfg))


def test_label_names_from_classlabel_keep_dataset_order():
    features = Features({"text": Value("string"), "label": ClassLabel(names=["entailment", "neutral", "contradiction"])})
    ds = Dataset.from_dict({"text": ["a"], "label": [2]}, features=features)
    assert label_names(DatasetDict({"train": ds}), "label", "train") == ["entailment", "neutral", "contradiction"]


def test_split_sources_take_one_split_from_elsewhere(tmp_path):
    train = jsonl(tmp_path / "train.jsonl", ROWS)
    other = jsonl(tmp_path / "other.jsonl", ROWS[:3])
    cfg = cfg_for(tmp_path, train=train)
    recipe = tmp_path / "r2.yaml"
    recipe.write_text(
        f"task: {{family: classification, name: t}}\nstudent: {{model: x}}\n"
        f"data:\n  files: {{train: {train}}}\n  split_sources:\n    test: {{source: {other}}}\n"
    )
    raw = load_raw(load_config(recipe))
    assert set(raw) == {"train", "test"} and len(raw["test"]) == 3
