"""Raw data loading: local formats, splits, subsets, and errors that name the problem."""

import json

import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

from distill.config import load_config
from distill.data.read import DataError, load_raw, origin, subsample
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
    raw = load_raw(cfg.data, cfg.seed)
    assert set(raw) == {"train", "validation"} and len(raw["train"]) == 10
    cfg.data.max_train_samples, cfg.data.max_eval_samples = 3, 2
    small = subsample(raw, cfg.data, cfg.seed)
    assert (len(small["train"]), len(small["validation"])) == (3, 2)
    assert small["train"]["text"] == ["frase 0", "frase 1", "frase 2"]


def test_headerless_tsv_like_mldoc(tmp_path):
    path = tmp_path / "spanish.train"
    path.write_text('CCAT\tEl "mercado" sube.\nGCAT\tElecciones en mayo.\n')
    cfg = cfg_for(tmp_path, train=path)
    cfg.data.format, cfg.data.column_names = "tsv", ["label", "text"]
    raw = load_raw(cfg.data, cfg.seed)
    assert raw["train"]["label"] == ["CCAT", "GCAT"]
    assert raw["train"]["text"][0] == 'El "mercado" sube.'


def test_folder_with_split_files(tmp_path):
    jsonl(tmp_path / "train.jsonl", ROWS)
    jsonl(tmp_path / "test.jsonl", ROWS[:2])
    cfg = cfg_for(tmp_path)
    cfg.data.source = str(tmp_path)
    raw = load_raw(cfg.data, cfg.seed)
    assert set(raw) == {"train", "test"}


def test_validation_from_train(tmp_path):
    cfg = cfg_for(tmp_path, train=jsonl(tmp_path / "t.jsonl", ROWS))
    cfg.data.validation_from_train = 0.2
    raw = load_raw(cfg.data, cfg.seed)
    assert (len(raw["train"]), len(raw["validation"])) == (8, 2)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="data file not found: .*nope.jsonl"):
        _raw_of(cfg_for(tmp_path, train=tmp_path / "nope.jsonl"))


def test_empty_split(tmp_path):
    empty = tmp_path / "val.csv"
    empty.write_text("text,label\n")
    cfg = cfg_for(tmp_path, train=jsonl(tmp_path / "t.jsonl", ROWS), validation=empty)
    with pytest.raises(DataError, match="split 'validation' is empty"):
        load_raw(cfg.data, cfg.seed)


def test_hub_offline_is_explained(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = cfg_for(tmp_path)
    cfg.data.source, cfg.data.name = "no-org/no-dataset", "es"
    with pytest.raises(DataError, match="cannot load dataset 'no-org/no-dataset' \\(config 'es'\\)"):
        load_raw(cfg.data, cfg.seed)


def test_missing_column_names_split_and_fix(tmp_path):
    cfg = cfg_for(tmp_path, train=jsonl(tmp_path / "t.jsonl", ROWS))
    cfg.data.columns = {"text": "premise", "text_pair": "hypothesis"}
    with pytest.raises(DataError, match=r"split 'train' has no column 'premise' \(needed as text\).*data.columns.text="):
        ClassificationTask(cfg.task, cfg.data).setup(load_raw(cfg.data, cfg.seed))


def test_unseen_eval_label(tmp_path):
    test_rows = ROWS[:2] + [{"text": "otra", "label": "c"}]
    cfg = cfg_for(tmp_path, train=jsonl(tmp_path / "t.jsonl", ROWS), test=jsonl(tmp_path / "x.jsonl", test_rows))
    with pytest.raises(DataError, match=r"split 'test' has labels never seen in training: \['c'\]"):
        ClassificationTask(cfg.task, cfg.data).setup(load_raw(cfg.data, cfg.seed))


def test_label_names_from_classlabel_keep_dataset_order():
    features = Features({"text": Value("string"), "label": ClassLabel(names=["entailment", "neutral", "contradiction"])})
    ds = Dataset.from_dict({"text": ["a"], "label": [2]}, features=features)
    assert label_names(DatasetDict({"train": ds}), "label") == ["entailment", "neutral", "contradiction"]


def test_split_sources_take_one_split_from_elsewhere(tmp_path):
    train = jsonl(tmp_path / "train.jsonl", ROWS)
    other = jsonl(tmp_path / "other.jsonl", ROWS[:3])
    cfg = cfg_for(tmp_path, train=train)
    recipe = tmp_path / "r2.yaml"
    recipe.write_text(
        f"task: {{family: classification, name: t}}\nstudent: {{model: x}}\n"
        f"data:\n  files: {{train: {train}}}\n  split_sources:\n    test: {{source: {other}}}\n"
    )
    raw = _raw_of(load_config(recipe))
    assert set(raw) == {"train", "test"} and len(raw["test"]) == 3


# --- formats chosen by extension or declared --------------------------------------------------

CONLLU = "# sent_id = a\n1\tHola\thola\tINTJ\ti\t_\t0\troot\t_\t_\n2\tmundo\tmundo\tNOUN\tnc\t_\t1\tobj\t_\t_\n"


def test_conllu_by_extension_and_wrong_declared_formats_refused(tmp_path):
    conllu = tmp_path / "train.conllu"
    conllu.write_text(CONLLU)
    cfg = cfg_for(tmp_path, train=conllu)
    raw = load_raw(cfg.data, cfg.seed)
    assert raw["train"][0]["tokens"] == ["Hola", "mundo"] and raw["train"][0]["tags"] == ["INTJ", "NOUN"]
    cfg.data.format = "conll"  # a .conllu declared as conll: would train on the ID column
    with pytest.raises(DataError, match=r"train.conllu:2: this is CoNLL-U .*Set data.format=conllu"):
        load_raw(cfg.data, cfg.seed)
    conll = tmp_path / "train.conll"
    conll.write_text("Hola O\nmundo O\n")
    cfg = cfg_for(tmp_path, train=conll)
    cfg.data.format = "conllu"
    with pytest.raises(DataError, match=r"train.conll:1: expected 10 tab-separated CoNLL-U columns.*data.format=conll"):
        load_raw(cfg.data, cfg.seed)


def test_jsonl_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "y"\n')
    with pytest.raises(DataError, match=r"t.jsonl:2: not valid JSON"):
        _raw_of(cfg_for(tmp_path, train=path))


def test_json_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "t.json"
    path.write_text('[\n  {"text": "a", "label": "x"},\n  {"text": "b" "label": "y"}\n]\n')
    with pytest.raises(DataError, match=r"t.json:3: not valid JSON"):
        _raw_of(cfg_for(tmp_path, train=path))


def test_splits_remember_their_files(tmp_path):
    train, val = jsonl(tmp_path / "train.jsonl", ROWS), jsonl(tmp_path / "val.jsonl", ROWS[:4])
    cfg = cfg_for(tmp_path, train=train, validation=val)
    cfg.data.max_train_samples = 5
    raw = subsample(load_raw(cfg.data, cfg.seed), cfg.data, cfg.seed)
    assert raw.origins == {"train": str(train), "validation": str(val)}
    assert origin(raw, "train") == f"split 'train' ({train})"


def test_validation_from_train_as_a_row_count(tmp_path):
    cfg = cfg_for(tmp_path, train=jsonl(tmp_path / "t.jsonl", ROWS))
    cfg.data.validation_from_train = 3.0  # a whole number: rows, not a fraction
    raw = load_raw(cfg.data, cfg.seed)
    assert (len(raw["train"]), len(raw["validation"])) == (7, 3)
    assert sorted(list(raw["train"]["text"]) + list(raw["validation"]["text"])) == sorted(r["text"] for r in ROWS)
    assert raw.origins["validation"] == f"held out from {tmp_path / 't.jsonl'}"
    cfg.data.validation_from_train = 10.0  # all of train
    with pytest.raises(DataError, match="would hold out 10 of the 10 training rows"):
        load_raw(cfg.data, cfg.seed)


# --- rows that cannot be used, and labels read one way ----------------------------------------


def setup_task(tmp_path, train_rows, test_rows=None, **overrides):
    files = {"train": jsonl(tmp_path / "train.jsonl", train_rows)}
    if test_rows is not None:
        files["test"] = jsonl(tmp_path / "test.jsonl", test_rows)
    cfg = cfg_for(tmp_path, **files)
    for key, value in overrides.items():
        setattr(cfg.data if key in ("drop_invalid", "columns") else cfg.task, key, value)
    raw = load_raw(cfg.data, cfg.seed)
    task = ClassificationTask(cfg.task, cfg.data)
    task.setup(raw)
    return task, raw


@pytest.mark.parametrize(
    "row, problem",
    [
        ({"text": "bien", "label": None}, "column 'label' is null"),
        ({"text": "bien", "label": " "}, "column 'label' is empty"),
        ({"text": None, "label": "a"}, "column 'text' is null"),
        ({"text": "", "label": "a"}, "column 'text' is empty"),
        ({"text": ["a", "b"], "label": "a"}, "column 'text' is a list, not a text"),
    ],
)
def test_null_or_empty_rows_are_refused_naming_split_file_and_row(tmp_path, row, problem):
    rows = ROWS[:6] + [row] + ROWS[6:]
    with pytest.raises(DataError) as err:
        setup_task(tmp_path, ROWS, test_rows=rows)
    assert f"split 'test' ({tmp_path / 'test.jsonl'}): row 6: {problem}" in str(err.value)
    assert "data.drop_invalid=true" in str(err.value)


def test_drop_invalid_drops_and_says_how_many(tmp_path, caplog):
    rows = ROWS + [{"text": "x", "label": None}, {"text": "  ", "label": "a"}, {"text": "y", "label": "b"}]
    with caplog.at_level("WARNING", logger="distill.data.read"):
        task, raw = setup_task(tmp_path, rows, drop_invalid=True)
    assert len(raw["train"]) == 11 and raw["train"]["text"][-1] == "y"
    assert task.labels == ["a", "b"]
    assert "dropped 2 of 13 rows" in caplog.text and "row 10 column 'label' is null" in caplog.text


def test_null_in_a_csv_label_column_is_caught(tmp_path):
    # pandas reads an integer column with a blank cell as floats with a NaN
    path = tmp_path / "t.csv"
    path.write_text("text,label\nuno,0\ndos,1\ntres,\ncuatro,1\n")
    cfg = cfg_for(tmp_path, train=path)
    with pytest.raises(DataError, match=r"t.csv\): row 2: column 'label' is null"):
        ClassificationTask(cfg.task, cfg.data).setup(load_raw(cfg.data, cfg.seed))
    cfg.data.drop_invalid = True
    task = ClassificationTask(cfg.task, cfg.data)
    raw = load_raw(cfg.data, cfg.seed)
    task.setup(raw)
    assert task.labels == ["0", "1"] and task.label_space.kind == "ids"
    assert [task.label_space.id_of(v) for v in raw["train"]["label"]] == [0, 1, 1]


def test_mixed_label_types_are_refused_with_the_values(tmp_path):
    rows = ROWS + [{"text": "z", "label": 1}]
    with pytest.raises(DataError) as err:
        setup_task(tmp_path, ROWS, test_rows=rows)
    message = str(err.value)
    assert "column 'label' mixes label kinds" in message
    assert "integer ids 1 (split 'test'" in message and "row 10)" in message
    assert "names 'a' (split 'train'" in message


def test_labels_differing_only_by_case_or_spaces_are_refused(tmp_path):
    rows = ROWS + [{"text": "z", "label": "A"}, {"text": "w", "label": "a "}]
    with pytest.raises(DataError) as err:
        setup_task(tmp_path, rows)
    message = str(err.value)
    assert "differ only by case or surrounding spaces" in message
    assert "'A' (split 'train'" in message and "'a' (split 'train'" in message and "'a ' (split 'train'" in message


def test_integer_labels_are_ordered_numerically(tmp_path):
    rows = [{"text": f"t{i}", "label": i} for i in (10, 2, 0, 11, 1, 3, 4, 5, 6, 7, 8, 9)]
    task, raw = setup_task(tmp_path, rows)
    assert task.labels == [str(i) for i in range(12)]
    assert [task.label_space.id_of(v) for v in raw["train"]["label"]] == [10, 2, 0, 11, 1, 3, 4, 5, 6, 7, 8, 9]
    # digit strings too: "10" after "9", not after "1"
    names = [{"text": f"t{i}", "label": str(i)} for i in (10, 2, 0, 9, 1)]
    task, _ = setup_task(tmp_path, names)
    assert task.labels == ["0", "1", "2", "9", "10"]


def test_fractional_labels_are_refused(tmp_path):
    with pytest.raises(DataError, match=r"row 1: label 0.5 of column 'label' is not a class"):
        setup_task(tmp_path, [{"text": "a", "label": 1.0}, {"text": "b", "label": 0.5}])


def test_task_labels_set_names_and_order(tmp_path):
    task, raw = setup_task(tmp_path, ROWS, labels=["b", "a", "c"])
    assert task.labels == ["b", "a", "c"]  # c: a class the data lacks, still an output
    assert [task.label_space.id_of(v) for v in raw["train"]["label"][:2]] == [1, 0]
    with pytest.raises(DataError, match=r"not in task.labels \['B', 'c'\]: 'a' \(split 'train'.*'b' \(split 'train' .*row 1\) \(did you mean 'B'\?\)"):
        setup_task(tmp_path, ROWS, labels=["B", "c"])
    ids = [{"text": f"t{i}", "label": i % 3} for i in range(6)]
    task, _ = setup_task(tmp_path, ids, labels=["neg", "neu", "pos"])
    assert task.labels == ["neg", "neu", "pos"] and task.label_space.id_of(2) == 2
    with pytest.raises(DataError, match=r"task.labels names 2 labels \(ids 0..1\) but column 'label' has id 2"):
        setup_task(tmp_path, ids, labels=["neg", "pos"])


def test_task_labels_reorder_a_classlabel():
    features = Features({"text": Value("string"), "label": ClassLabel(names=["neg", "pos"])})
    raw = DatasetDict(train=Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]}, features=features))
    cfg = cfg_for_family()
    cfg.task.labels = ["pos", "neg"]
    task = ClassificationTask(cfg.task, cfg.data)
    task.setup(raw)
    assert task.labels == ["pos", "neg"] and [task.label_space.id_of(v) for v in (0, 1)] == [1, 0]
    cfg.task.labels = ["pos", "other"]
    with pytest.raises(DataError, match=r"task.labels \['pos', 'other'\] lacks labels of column 'label': \['neg'\]"):
        ClassificationTask(cfg.task, cfg.data).setup(raw)
    # a ClassLabel id out of its range (-1: no gold label) is a row problem
    raw["test"] = Dataset.from_dict({"text": ["c"], "label": [-1]}, features=features)
    with pytest.raises(DataError, match=r"split 'test': row 0: column 'label' is -1, not one of the 2 classes"):
        ClassificationTask(*_sections(cfg_for_family())).setup(raw)


def test_every_mapped_column_must_exist(tmp_path):
    cfg = cfg_for(tmp_path, train=jsonl(tmp_path / "t.jsonl", ROWS))
    cfg.data.columns = {"label": "label", "text_pair": "hypothesis"}
    with pytest.raises(DataError, match=r"has no column 'hypothesis' \(needed as text_pair\)"):
        ClassificationTask(cfg.task, cfg.data).setup(load_raw(cfg.data, cfg.seed))


def cfg_for_family(family="classification"):
    from distill.config import Config

    cfg = Config()
    cfg.task.family = family
    return cfg


def _raw_of(cfg):
    return load_raw(cfg.data, cfg.seed)


def _sections(cfg):
    """The task and data sections a task is built from."""
    return cfg.task, cfg.data
