"""The evidence harness (scripts/evidence.py) and its data (scripts/make_evidence_data.py),
without training: spec parsing, command building, resumability, aggregation and the documents
on fake metrics files, and the treebank conversion."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

import evidence  # noqa: E402
import make_evidence_data as med  # noqa: E402
import make_word_list  # noqa: E402

TREEBANK = REPO.parent / "shared/data/ud_es_coser/es_coser-ud-test.conllu"


def write_task(tmp: Path) -> Path:
    """A tiny classification recipe whose data files exist (no training happens in these tests)."""
    data = tmp / "data"
    data.mkdir()
    for split in ("train", "validation", "test"):
        rows = [{"text": "hacía frío", "label": "pasado"}, {"text": "hace frío", "label": "no_pasado"}]
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = tmp / "task.yaml"
    recipe.write_text(
        "task: {family: classification, name: tiny}\n"
        f"data:\n  files: {{train: {data}/train.jsonl, validation: {data}/validation.jsonl, test: {data}/test.jsonl}}\n"
        "  columns: {text: text, label: label}\n"
        "teacher: {model: all-minilm-l6-v2}\n"
        "student: {num_layers: 2}\n"
        "tracking: {report_to: []}\n"
    )
    return recipe


def spec_dict(recipe: Path, **extra) -> dict:
    spec = {
        "title": "Test table",
        "seeds": [1, 2, 3],
        "tasks": {"tiny": {"recipe": str(recipe), "overrides": ["train.epochs=2"]}},
        "axes": {"depth": {"1": ["student.num_layers=1"], "2": {"student": {"num_layers": 2}}}},
        "modes": {
            "finetune": {"stage": "baseline"},
            "logits": ["distill.kd_weight=1", "distill.ce_weight=0"],
        },
        "speed_reference": "logits",
    }
    spec.update(extra)
    return spec


def write_spec(tmp: Path, spec: dict, name: str = "table") -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(json.dumps(spec))  # JSON is YAML
    return path


# --- spec parsing --------------------------------------------------------------------------


def test_spec_parsing_flattens_mappings_and_picks_the_baseline_as_reference(tmp_path):
    spec = evidence.parse_spec(spec_dict(tmp_path / "r.yaml", overrides={"data": {"transfer": [{"files": ["a b.jsonl"]}]}}))
    assert [m.name for m in spec.modes] == ["finetune", "logits"]
    assert spec.modes[0].stage == "baseline" and spec.modes[1].stage == "student"
    assert spec.modes[1].overrides == ["distill.kd_weight=1", "distill.ce_weight=0"]
    assert spec.axes["depth"]["2"] == ["student.num_layers=2"]
    assert spec.overrides == ['data.transfer=[{"files": ["a b.jsonl"]}]']
    assert spec.reference == "finetune"  # the first baseline-stage mode
    assert spec.teacher_seed == 1 and not spec.per_seed_teacher


@pytest.mark.parametrize(
    "change, message",
    [
        ({"colour": 1}, "spec: unknown key(s) ['colour']"),
        ({"seeds": []}, "spec.seeds"),
        ({"seeds": [1, 1]}, "repeats a seed"),
        ({"modes": {"x": {"stage": "teacher"}}}, "spec.modes.x.stage: 'teacher' is not one of student, baseline"),
        ({"modes": {"x": ["seed=3"]}}, "spec.modes.x.overrides: 'seed' is set by the harness"),
        ({"modes": {"x": ["distill.kd_weight"]}}, "spec.modes.x.overrides[0]: expected 'key=value'"),
        ({"modes": {"a/b": []}}, "spec.modes.a/b: name 'a/b'"),
        ({"reference": "nope"}, "spec.reference: 'nope' is not a mode"),
        ({"tasks": {"t": {"overrides": []}}}, "spec.tasks.t: needs 'recipe'"),
        ({"axes": {"depth": {"1": "student.num_layers=1"}}}, "spec.axes.depth.1: expected a list"),
        ({"exclude": {"mode": "logits"}}, "spec.exclude: expected a list of mappings"),
        ({"exclude": [{}]}, "spec.exclude[0]: expected a non-empty mapping"),
        ({"exclude": [{"width": "1"}]}, "spec.exclude[0]: unknown key(s) ['width']"),
        ({"exclude": [{"depth": 3, "mode": "logits"}]}, "spec.exclude[0].depth: 3 is not one of 1, 2"),
        ({"exclude": [{"mode": "hidden"}]}, "spec.exclude[0].mode: 'hidden' is not one of finetune, logits"),
    ],
)
def test_bad_specs_name_the_place(tmp_path, change, message):
    with pytest.raises(evidence.SpecError) as err:
        evidence.parse_spec(spec_dict(tmp_path / "r.yaml", **change))
    assert message in str(err.value)


def test_overrides_file_takes_the_named_keys_per_task(tmp_path, capsys):
    (tmp_path / "search" / "tiny").mkdir(parents=True)
    (tmp_path / "search" / "tiny" / "best.yaml").write_text(
        "train: {lr: 0.0002, epochs: 3}\ndistill: {ce_weight: 0.3, kd_loss: ce}\noutput_dir: x\nseed: 4\n")
    raw = spec_dict(write_task(tmp_path), speed_reference=None, modes={
        "finetune": {"stage": "baseline"},
        "best": {"overrides_file": str(tmp_path / "search" / "{task}" / "best.yaml"), "keys": ["train.lr", "distill"]}})
    spec = evidence.parse_spec(raw)
    assert evidence.mode_overrides(spec.modes[1], "tiny") == ["train.lr=0.0002", "distill.ce_weight=0.3", "distill.kd_loss=ce"]
    whole = evidence.Mode("all", "student", ["train.epochs=5"], str(tmp_path / "search/tiny/best.yaml"))
    assert evidence.mode_overrides(whole, "tiny")[-1] == "train.epochs=5"  # the mode's own come last
    assert not any(o.startswith(("output_dir=", "seed=")) for o in evidence.mode_overrides(whole, "tiny"))
    # a task without a search yet: the dry run names the file
    raw["tasks"]["other"] = raw["tasks"]["tiny"]
    assert evidence.main([str(write_spec(tmp_path, raw)), "--dry-run", "--root", str(tmp_path / "runs")]) == 2
    assert "search/other/best.yaml not found" in capsys.readouterr().err


# --- plan and dry run -----------------------------------------------------------------------


def test_plan_builds_cli_commands_with_a_shared_teacher(tmp_path):
    spec = evidence.parse_spec(spec_dict(tmp_path / "r.yaml"))
    root = tmp_path / "runs"
    teachers, cells = evidence.plan(spec, root)
    assert len(teachers) == 1 and len(cells) == 3 * 2 * 2
    t = teachers[0]
    assert t.command[:5] == ["python", "-m", "distill", "teacher", str(tmp_path / "r.yaml")]
    assert f"teacher.dir={root}/tiny/teacher" in t.command and "seed=1" in t.command
    first = cells[0]
    assert first.command == [
        "python", "-m", "distill", "baseline", str(tmp_path / "r.yaml"), "train.epochs=2", "student.num_layers=1",
        f"teacher.dir={root}/tiny/teacher", f"distill.cache_dir={root}/tiny/teacher_cache",
        f"output_dir={root}/tiny/depth-1/finetune/seed-1", "seed=1",
    ]
    assert [c.seed for c in cells] == [1] * 4 + [2] * 4 + [3] * 4  # seed-major: early seeds complete first
    assert {c.dir.parent.parent.name for c in cells} == {"depth-1", "depth-2"}
    per_seed = evidence.parse_spec(spec_dict(tmp_path / "r.yaml", teacher={"per_seed": True}))
    teachers, cells = evidence.plan(per_seed, root)
    assert [t.dir.name for t in teachers] == ["teacher-seed-1", "teacher-seed-2", "teacher-seed-3"]
    assert f"teacher.dir={root}/tiny/teacher-seed-3" in cells[-1].command


def test_excluded_cells_are_neither_run_nor_reported(tmp_path):
    # depth 1 gets no logits run: the product loses those 3 cells and the table that row
    raw = spec_dict(write_task(tmp_path), exclude=[{"depth": 1, "mode": "logits"}])
    spec_path = write_spec(tmp_path, raw)
    spec, root = evidence.load_spec(spec_path), tmp_path / "runs"
    assert spec.exclude == [{"depth": "1", "mode": "logits"}]
    _, cells = evidence.plan(spec, root)
    assert len(cells) == 3 * 3
    assert not any(c.axes["depth"] == "1" and c.mode == "logits" for c in cells)
    assert sum(c.axes["depth"] == "2" and c.mode == "logits" for c in cells) == 3
    fake_results(spec, root)
    out = tmp_path / "t.md"
    assert evidence.main([str(spec_path), "--report-only", "--root", str(root), "--out", str(out)]) == 0
    data = json.loads(out.with_suffix(".json").read_text())
    assert sorted((r["axes"]["depth"], r["mode"]) for r in data["summary"]) == [
        ("1", "finetune"), ("2", "finetune"), ("2", "logits")]
    assert data["spec"]["exclude"] == [{"depth": "1", "mode": "logits"}]
    md = out.read_text()
    assert "Not run (left out of the product by the spec): depth 1 × mode logits." in md
    assert "| 1 | logits |" not in md and "| 2 | logits | 3 |" in md
    assert "Not in the tables" not in md  # a left-out cell is not a missing run


def test_dry_run_prints_every_command(tmp_path, capsys):
    spec = write_spec(tmp_path, spec_dict(write_task(tmp_path)))
    code = evidence.main([str(spec), "--dry-run", "--root", str(tmp_path / "runs")])
    out = capsys.readouterr().out
    assert code == 0
    assert out.count("-m distill baseline") == 6 and out.count("-m distill student") == 6
    assert out.count("-m distill teacher") == 1
    assert "1 teacher run(s), 12 cell(s); 0 done" in out
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing


def test_dry_run_names_the_mode_with_an_unknown_recipe_key(tmp_path, capsys):
    spec = spec_dict(write_task(tmp_path))
    spec["modes"]["typo"] = ["distill.kd_wieght=1"]
    code = evidence.main([str(write_spec(tmp_path, spec)), "--dry-run", "--root", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 2
    assert "typo" in err and "distill.kd_wieght" in err and "distill.kd_weight" in err


def test_missing_data_stops_before_any_run(tmp_path, capsys):
    recipe = write_task(tmp_path)
    (tmp_path / "data" / "test.jsonl").unlink()
    code = evidence.main([str(write_spec(tmp_path, spec_dict(recipe))), "--root", str(tmp_path / "runs")])
    assert code == 2
    assert "data file(s) not found" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


# --- aggregation on fake metrics files --------------------------------------------------------

TEST = {"finetune": {1: 0.80, 2: 0.82, 3: 0.78}, "logits": {1: 0.85, 2: 0.83, 3: 0.84}}
SPS = {"finetune": 100.0, "logits": 80.0}


def fake_results(spec: evidence.Spec, root: Path) -> None:
    """metrics.json, harness.json and log.jsonl as the CLI and the runner write them."""
    teachers, cells = evidence.plan(spec, root)
    for run in teachers + cells:
        if run.stage == "teacher":
            test, val = 0.90, 0.91
        else:
            bump = 0.0 if run.axes["depth"] == "1" else 0.05
            test, val = TEST[run.mode][run.seed] + bump, 0.5
        run.stage_dir.mkdir(parents=True)
        metrics = {"validation": {"accuracy": val}, "test": {"accuracy": test}, "info": {"metric": "accuracy"}}
        (run.stage_dir / "metrics.json").write_text(json.dumps(metrics))
        sps = 50.0 if run.stage == "teacher" else SPS[run.mode]
        # the median ignores the slow window that held an evaluation
        (run.stage_dir / "log.jsonl").write_text(
            "".join(json.dumps({"step": i, "train/samples_per_s": v}) + "\n" for i, v in enumerate([sps, 1.0, sps]))
        )
        record = {"command": evidence.portable(run.command), "recipe_settings_sha256": evidence.recipe_hash(run),
                  "returncode": 0, "wall_s": 10.0 * run.seed, "resumed": False}
        evidence._record_path(run).write_text(json.dumps(record))


def test_report_computes_mean_std_and_paired_delta(tmp_path):
    raw = spec_dict(write_task(tmp_path))
    spec_path = write_spec(tmp_path, raw)
    root, out = tmp_path / "runs", tmp_path / "docs" / "table.md"
    fake_results(evidence.load_spec(spec_path), root)
    out.parent.mkdir()
    out.write_text("old table\n<!-- notes -->\nLogits help at depth 1.\n")
    assert evidence.main([str(spec_path), "--report-only", "--root", str(root), "--out", str(out)]) == 0

    data = json.loads(out.with_suffix(".json").read_text())
    rows = {(r["axes"]["depth"], r["mode"]): r for r in data["summary"]}
    logits = rows[("1", "logits")]
    assert logits["test"]["n"] == 3
    assert logits["test"]["mean"] == pytest.approx(0.84)
    assert logits["test"]["std"] == pytest.approx(0.01)  # sample std of 0.85, 0.83, 0.84
    assert (logits["test"]["min"], logits["test"]["max"]) == pytest.approx((0.83, 0.85))
    # paired by seed: 0.05, 0.01, 0.06 -> mean 0.04, std sqrt((0.01² + 0.03² + 0.02²) / 2)
    assert logits["delta"]["mean"] == pytest.approx(0.04)
    assert logits["delta"]["std"] == pytest.approx(math.sqrt(0.0014 / 2))
    assert logits["wins"] == 3
    assert rows[("1", "finetune")]["delta"] is None
    assert rows[("2", "finetune")]["test"]["mean"] == pytest.approx(0.85)
    assert logits["wall_s_median"] == 20.0 and logits["samples_per_s"] == 80.0
    assert rows[("1", "finetune")]["step_time_ratio"] == pytest.approx(0.8)  # 80 / 100 samples/s
    assert len(data["runs"]) == 12 and all(r["status"] == "done" for r in data["runs"])

    md = out.read_text()
    assert "| 1 | logits | 3 | 84.00 ± 1.00 | 83.00 – 85.00 | 50.00 ± 0.00 | +4.00 ± 2.65 | 3/3 | 20 | 80.0 | 1.00 |" in md
    assert "| 1 | finetune | 3 | 80.00 ± 2.00 | 78.00 – 82.00 | 50.00 ± 0.00 | (reference) | – | 20 | 100.0 | 0.80 |" in md
    assert "Teacher (fine-tuned, 1 run(s)): test 90.00, validation 91.00, 10 s." in md
    assert "load average" in md.lower() and "CPUs" in md
    assert md.endswith("<!-- notes -->\nLogits help at depth 1.\n")  # hand-written notes survive
    assert "old table" not in md


def test_report_lists_missing_runs_and_uses_what_exists(tmp_path):
    spec_path = write_spec(tmp_path, spec_dict(write_task(tmp_path)))
    spec, root = evidence.load_spec(spec_path), tmp_path / "runs"
    fake_results(spec, root)
    _, cells = evidence.plan(spec, root)
    gone = next(c for c in cells if c.mode == "logits" and c.seed == 3 and c.axes["depth"] == "1")
    (gone.stage_dir / "metrics.json").unlink()
    out = tmp_path / "t.md"
    evidence.main([str(spec_path), "--report-only", "--root", str(root), "--out", str(out)])
    data = json.loads(out.with_suffix(".json").read_text())
    row = next(r for r in data["summary"] if r["mode"] == "logits" and r["axes"]["depth"] == "1")
    assert row["test"]["n"] == 2 and row["delta"]["n"] == 2  # only seeds with both modes pair
    assert "Not in the tables (1 run(s))" in out.read_text()
    assert f"- tiny depth=1 logits seed 3: missing ({gone.dir}/harness.log)" in out.read_text()


# --- running: resumable, timed ------------------------------------------------------------------


def test_runner_records_wall_time_and_never_redoes_a_finished_cell(tmp_path):
    out = tmp_path / "cell"
    counter = tmp_path / "count"
    script = (
        "import json, pathlib; d = pathlib.Path(%r) / 'student'; d.mkdir(parents=True, exist_ok=True); "
        "(d / 'metrics.json').write_text(json.dumps({'test': {'accuracy': 0.5}, 'info': {'metric': 'accuracy'}})); "
        "open(%r, 'a').write('x')" % (str(out), str(counter))
    )
    run = evidence.Run("tiny", "student", 1, out, [sys.executable, "-c", script], "logits", {})
    runner = evidence.Runner(jobs=1, overwrite=False, fail_fast=False)
    runner.run_all([run])
    assert evidence.is_done(run)
    record = json.loads((out / "harness.json").read_text())
    assert record["returncode"] == 0 and record["wall_s"] >= 0 and record["command"][0] == "python"
    runner.run_all([run])  # finished: not run again
    assert counter.read_text() == "x"
    changed = evidence.Run("tiny", "student", 1, out, [sys.executable, "-c", script + "  # v2"], "logits", {})
    assert not evidence.is_done(changed)
    assert "was run with another command" in evidence.conflicts([changed])[0]


def test_an_edited_recipe_is_another_run(tmp_path):
    spec_path = write_spec(tmp_path, spec_dict(write_task(tmp_path)))
    spec, root = evidence.load_spec(spec_path), tmp_path / "runs"
    fake_results(spec, root)
    teachers, cells = evidence.plan(spec, root)
    assert all(evidence.is_done(r) for r in teachers + cells)
    recipe = tmp_path / "task.yaml"
    recipe.write_text(recipe.read_text() + "seed: 5\n")
    assert not any(evidence.is_done(r) for r in teachers + cells)
    problems = evidence.conflicts(teachers + cells)
    assert len(problems) == 13 and "another version of" in problems[0] and "--overwrite" in problems[0]


def test_a_recipe_edited_only_in_its_comments_is_the_same_run(tmp_path):
    """Only the recipe's settings make a cell's identity; a record written when the file's bytes
    were hashed still counts while the file is unchanged."""
    spec_path = write_spec(tmp_path, spec_dict(write_task(tmp_path)))
    spec, root = evidence.load_spec(spec_path), tmp_path / "runs"
    fake_results(spec, root)
    teachers, cells = evidence.plan(spec, root)
    recipe = tmp_path / "task.yaml"
    recipe.write_text("# a new first line\n" + recipe.read_text().replace("\n", "  # a comment\n", 1))
    assert all(evidence.is_done(r) for r in teachers + cells) and not evidence.conflicts(teachers + cells)
    run = cells[0]
    record_path = evidence._record_path(run)
    record = json.loads(record_path.read_text())
    record.pop("recipe_settings_sha256")
    record_path.write_text(json.dumps({**record, "recipe_sha256": evidence.recipe_hash(run, raw=True)}))
    assert evidence.is_done(run)
    recipe.write_text(recipe.read_text() + "# one more comment\n")
    assert not evidence.is_done(run)  # an old record knows the bytes only
    assert evidence.is_done(cells[1])


def test_failed_run_is_recorded_and_reported(tmp_path, capsys):
    run = evidence.Run("tiny", "student", 1, tmp_path / "cell", [sys.executable, "-c", "raise SystemExit(3)"], "logits", {})
    runner = evidence.Runner(jobs=1, overwrite=False, fail_fast=False)
    runner.run_all([run])
    assert runner.failed == [run] and not evidence.is_done(run)
    assert "FAILED (exit 3" in capsys.readouterr().out
    assert evidence.collect(run)["status"] == "failed"


def test_estimate_extrapolates_from_finished_runs(tmp_path):
    spec_path = write_spec(tmp_path, spec_dict(write_task(tmp_path)))
    spec, root = evidence.load_spec(spec_path), tmp_path / "runs"
    fake_results(spec, root)
    teachers, cells = evidence.plan(spec, root)
    for c in cells:
        if c.seed == 3:  # seed 3 not run yet; seeds 1 and 2 took 10 s and 20 s
            (c.stage_dir / "metrics.json").unlink()
    total, notes = evidence.estimate(spec, teachers, cells, jobs=1)
    assert total == pytest.approx(4 * 15.0)  # 4 cells left, median 15 s each
    assert "4 run(s) left" in notes[-1]


# --- the evidence data ----------------------------------------------------------------------

CONLLU = """# sent_id = a-1
# text = Del pueblo llegó, y hacía frío
1-2\tDel\t_\t_\t_\t_\t_\t_\t_\t_
1\tDe\tde\tADP\t_\t_\t3\tcase\t_\t_
2\tel\tel\tDET\t_\t_\t3\tdet\t_\t_
3\tpueblo\tpueblo\tNOUN\t_\t_\t4\tobl\t_\t_
4\tllegó\tllegar\tVERB\t_\tMood=Ind|Tense=Past|VerbForm=Fin\t0\troot\t_\tSpaceAfter=No
5\t,\t,\tPUNCT\t_\t_\t7\tpunct\t_\t_
6\ty\ty\tCCONJ\t_\t_\t7\tcc\t_\t_
7\thacía\thacer\tVERB\t_\tTense=Imp|VerbForm=Fin\t4\tconj\t_\t_
8\tfrío\tfrío\tNOUN\t_\t_\t7\tobj\t_\t_

# sent_id = a-2
# text = Comer bien
1\tComer\tcomer\tVERB\t_\tVerbForm=Inf\t0\troot\t_\t_
2\tbien\tbien\tADV\t_\t_\t1\tadvmod\t_\t_

"""


def test_conllu_reading_words_text_and_labels(tmp_path):
    path = tmp_path / "t.conllu"
    path.write_text(CONLLU)
    first, second = med.read_conllu(path)
    assert [w.form for w in first.words] == ["De", "el", "pueblo", "llegó", ",", "y", "hacía", "frío"]
    assert [w.upos for w in first.words][:2] == ["ADP", "DET"]
    assert med.surface_text(first.tokens) == "Del pueblo llegó, y hacía frío"
    assert med.tense_label(first.tokens) == "pasado"
    assert med.tense_label(first.tokens[4:]) == "pasado"  # "y hacía frío": Imp counts as past
    assert med.tense_label(second.tokens) == "sin_verbo"  # an infinitive is not finite


def test_word_in_context_rows_mark_the_word_and_keep_its_tag(tmp_path):
    path = tmp_path / "t.conllu"
    path.write_text(CONLLU)
    first, _ = med.read_conllu(path)
    assert med.ambiguous_forms([first, first], min_count=2) == set()  # one tag per form here
    rows = med.marked_examples(first, 0, {"hacia"}, seed=13, window=2)
    marked = [r for r in rows if r["word"] == "hacía"]
    assert marked == [{"text": ", y « hacía » frío", "label": "VERB", "word": "hacía"}]  # accents ignored, 2 tokens each side
    assert len(rows) == 2  # and one other word, never punctuation nor a multiword token
    other = next(r for r in rows if r["word"] != "hacía")
    assert other["word"] not in (",", "Del") and f"« {other['word']} »" in other["text"]
    assert rows == med.marked_examples(first, 0, {"hacia"}, seed=13, window=2)  # seeded


@pytest.mark.skipif(not TREEBANK.exists(), reason="the shared UD COSER treebank is not in this checkout")
def test_evidence_data_is_deterministic_and_splits_never_share_text(tmp_path):
    manifest = med.build(TREEBANK, tmp_path / "a")
    med.build(TREEBANK, tmp_path / "b")
    for f in sorted((tmp_path / "a").rglob("*.*")):
        assert f.read_bytes() == (tmp_path / "b" / f.relative_to(tmp_path / "a")).read_bytes(), f
    pos = manifest["pos_coser"]
    assert pos["train"]["sentences"] + pos["validation"]["sentences"] + pos["test"]["sentences"] == 539
    assert pos["train_labelled"]["sentences"] + pos["transfer"]["sentences"] == pos["train"]["sentences"]
    cls = tmp_path / "a" / "cls_proxy"
    rows = {s: [json.loads(l) for l in (cls / f"{s}.jsonl").read_text().splitlines()] for s in ("train", "validation", "test")}
    assert not {r["text"] for r in rows["train"]} & {r["text"] for r in rows["test"]}
    assert {r["label"] for r in rows["test"]} == set(med.LABELS)
    transfer = [json.loads(l) for l in (cls / "transfer.jsonl").read_text().splitlines()]
    assert transfer and all(set(r) == {"text"} for r in transfer)
    # hard enough: neither the majority class nor a suffix rule comes near a solved task
    assert manifest["cls_proxy"]["test"]["majority"] < 0.6 and manifest["cls_proxy"]["test"]["suffix_rule"] < 0.75
    wic = manifest["wic_pos"]
    assert {"que", "la", "si"} <= set(wic["ambiguous_forms"])
    assert wic["test"]["word_majority"] < 0.8 and wic["test"]["ambiguous"] > wic["test"]["rows"] / 2
    wic_rows = {s: [json.loads(l) for l in (tmp_path / "a" / "wic_pos" / f"{s}.jsonl").read_text().splitlines()]
                for s in ("train", "test")}
    assert all(r["text"].count("«") == 1 for r in wic_rows["test"])
    assert {r["label"] for r in wic_rows["test"]} <= {r["label"] for r in wic_rows["train"]}


def test_evidence_recipes_validate_and_name_their_command():
    from distill.config import load_config

    recipes = sorted((REPO / "recipes" / "evidence").glob("*.yaml"))
    assert {r.stem for r in recipes} >= {"pos_coser", "cls_proxy", "wic_pos"}
    for recipe in recipes:
        cfg = load_config(recipe)
        # the MiniLM teacher, or multilingual-e5-small (built offline, docs/small-students.md)
        assert cfg.teacher.model in ("all-minilm-l6-v2", "/work/models/me5-small") and cfg.student.num_layers
        assert all(f.startswith("runs/evidence-data/") for f in cfg.data.files.values())
        assert f"recipes/evidence/{recipe.name}" in recipe.read_text().splitlines()[1]


def test_shipped_specs_parse():
    for path in sorted((REPO / "docs" / "evidence" / "specs").glob("*.yaml")):
        spec = evidence.load_spec(path)
        assert spec.reference and len(spec.seeds) >= 1, path


def test_word_list_writes_each_word_and_its_capitalized_form_once(tmp_path, monkeypatch):
    """scripts/make_word_list.py over a stand-in for wordfreq: the most frequent words in order,
    each followed by its capitalized form unless that is the same word; a clear exit without it."""
    import types

    fake = types.ModuleType("wordfreq")
    fake.available_languages = lambda wordlist: {"es": "large_es"} if wordlist == "large" else {}
    fake.top_n_list = lambda lang, n, wordlist: ["de", "la", "Madrid", "más"][:n] if lang == "es" else []
    monkeypatch.setitem(sys.modules, "wordfreq", fake)
    monkeypatch.setattr(make_word_list, "version", lambda name: "0.test")
    out = tmp_path / "words" / "es.txt"
    assert make_word_list.main(["--lang", "es", "--words", "4", "--out", str(out)]) == 0
    assert out.read_text(encoding="utf-8").splitlines() == ["de", "De", "la", "La", "Madrid", "más", "Más"]
    with pytest.raises(SystemExit, match="no word list for language 'xx'"):
        make_word_list.main(["--lang", "xx", "--out", str(tmp_path / "xx.txt")])
    assert not (tmp_path / "xx.txt").exists()
    monkeypatch.setitem(sys.modules, "wordfreq", None)  # not installed
    with pytest.raises(SystemExit, match="needs wordfreq"):
        make_word_list.main(["--out", str(tmp_path / "none.txt")])
