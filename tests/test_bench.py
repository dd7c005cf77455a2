"""distill.bench: MAC/FLOP counts by hand and against the study, latency bookkeeping, back-ends, CLI."""

from __future__ import annotations

import copy
import csv
import json

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    AlbertConfig,
    AutoModel,
    AutoModelForSequenceClassification,
    BertConfig,
    DistilBertConfig,
    ElectraConfig,
    RobertaConfig,
)

from distill import latency
from distill.bench import backends, cli, flops, shapes

# The study's speed table: GMACs at batch 1, seq 512, and the Speedup column (vs BETO, 43.53).
STUDY_GMACS = {
    "beto": 43.53,
    "albeto-tiny": 2.42,
    "albeto-base-2": 7.31,
    "albeto-base-4": 14.56,
    "albeto-base-6": 21.81,
    "albeto-base-8": 29.07,
    "albeto-base-10": 36.32,
}
STUDY_SPEEDUP = {
    "albeto-tiny": 18.05,
    "albeto-base-2": 5.96,
    "albeto-base-4": 2.99,
    "albeto-base-6": 1.99,
    "albeto-base-8": 1.49,
    "albeto-base-10": 1.19,
}
# Published parameter counts (millions), which include a 3-label classification head.
STUDY_PARAMS_M = {
    "beto": 109.85,
    "distilbeto": 67.32,
    "albeto-tiny": 5.35,
    "albeto-base": 11.81,
    "albeto-large": 17.82,
    "albeto-xxlarge": 222.74,
    "roberta-bne-base": 124.65,
    "roberta-bne-large": 355.36,
}

TINY_CONFIGS = {
    "bert": BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64),
    "albert": AlbertConfig(vocab_size=100, embedding_size=16, hidden_size=32, num_hidden_layers=3,
                           num_attention_heads=4, intermediate_size=48),
    "distilbert": DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=2, hidden_dim=64),
    "roberta": RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=64, pad_token_id=1, max_position_embeddings=40),
    "electra": ElectraConfig(vocab_size=100, embedding_size=16, hidden_size=32, num_hidden_layers=2,
                             num_attention_heads=2, intermediate_size=64),
}


# --- counts --------------------------------------------------------------------------------------
def test_counts_of_a_tiny_bert_by_hand():
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64)
    c = flops.count(cfg, batch=2, seq=8)
    tokens = 2 * 8
    per_layer = 4 * 32 * 32 + 2 * 32 * 64  # q, k, v, out (32x32 each) + ffn up/down (32x64) = 8192
    pooler = 2 * 32 * 32  # one 32x32 linear on the first token of each of the 2 sequences
    assert c.linear_macs == tokens * 2 * per_layer + pooler == 264_192
    # 5 LayerNorms of width 32 (embeddings + 2 per layer), 4 ops per element
    assert c.norm_ops == 4 * tokens * 32 * 5 == 10_240
    assert c.macs == 264_192 + 10_240
    # scores [2, 2 heads, 8, 8] from head dim 16, and context the same, in each of 2 layers
    assert c.attention_macs == 2 * 2 * (2 * 2 * 8 * 8 * 16) == 16_384
    assert c.flops == 2 * (264_192 + 16_384)


@pytest.mark.parametrize("kind", sorted(TINY_CONFIGS))
def test_counts_match_the_real_forward(kind):
    """Linear and LayerNorm counts from module hooks, FLOPs from torch's own FLOP counter."""
    cfg = TINY_CONFIGS[kind]
    torch.manual_seed(0)
    # eager attention: explicit matmuls that the FLOP counter sees (the fused kernel is not counted)
    model = AutoModel.from_config(cfg, attn_implementation="eager").eval()
    seen = {"linear": 0, "norm": 0}

    def hook(module, args, out):
        if isinstance(module, nn.Linear):
            seen["linear"] += module.in_features * out.numel()
        else:
            seen["norm"] += flops.NORM_OPS_PER_ELEMENT * out.numel()

    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.LayerNorm)):
            module.register_forward_hook(hook)
    inputs = latency.random_inputs(cfg, batch=3, seq=10)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(**inputs)
    c = flops.count(cfg, batch=3, seq=10)
    assert c.linear_macs == seen["linear"]
    assert c.norm_ops == seen["norm"]
    assert c.flops == counter.get_total_flops()


def test_study_gmacs_and_speedup_column_from_the_shapes():
    ref = flops.count(shapes.shape_config("beto"), batch=1, seq=512)
    for name, gmacs in STUDY_GMACS.items():
        got = flops.count(shapes.shape_config(name), batch=1, seq=512).macs / 1e9
        assert abs(got - gmacs) <= 0.0051, (name, got, gmacs)  # published to two decimals
    for name, published in STUDY_SPEEDUP.items():
        got = flops.speedup(ref, flops.count(shapes.shape_config(name), batch=1, seq=512))
        assert got == pytest.approx(published, rel=0.01), (name, got, published)


def test_shapes_have_the_published_sizes():
    for name, millions in STUDY_PARAMS_M.items():
        cfg = shapes.shape_config(name)
        cfg.num_labels = 3
        with torch.device("meta"):
            model = AutoModelForSequenceClassification.from_config(cfg)
        params = sum(p.numel() for p in model.parameters())
        assert round(params / 1e6, 2) == millions, (name, params)
    base6 = shapes.shape_config("albeto-base-6")
    assert (base6.num_hidden_layers, base6.num_hidden_groups, base6.hidden_size) == (6, 1, 768)
    # base-N keeps every parameter of base: the shared layer is only applied fewer times
    assert cli.count_params(base6) == cli.count_params(shapes.shape_config("albeto-base"))


def test_unsupported_architecture_is_named():
    cfg = BertConfig()
    cfg.model_type = "gpt2"
    with pytest.raises(flops.UnsupportedModelError, match="gpt2"):
        flops.count(cfg)


# --- resolution ----------------------------------------------------------------------------------
def test_resolve_shape_catalog_and_missing(monkeypatch, tiny_bert_dir):
    m = shapes.resolve_model("albeto-base-6")
    assert (m.source, m.config.num_hidden_layers) == ("shape", 6)
    assert m.origin == "dccuchile/albert-base-spanish"

    import distill.models

    def fake_catalog(name):
        if name == "my-student":
            return "dccuchile/albert-base-spanish", {"num_hidden_layers": 3}
        raise KeyError(name)

    monkeypatch.setattr(distill.models, "resolve_student", fake_catalog)
    m = shapes.resolve_model("my-student")  # offline: the published model's shape + overrides
    assert (m.source, m.config.model_type, m.config.num_hidden_layers) == ("catalog", "albert", 3)

    m = shapes.resolve_model(str(tiny_bert_dir))
    assert (m.source, m.config.hidden_size) == ("local", 32)
    with pytest.raises(shapes.ModelNotFound, match="shape name"):
        shapes.resolve_model("nobody/no-such-model")
    with pytest.raises(KeyError, match="1 <= N <= 12"):
        shapes.resolve_model("albeto-base-13")


# --- latency -------------------------------------------------------------------------------------
def test_quartiles_and_summary():
    assert latency.quartiles([5.0, 1.0, 3.0, 2.0, 4.0]) == (2.0, 3.0, 4.0)
    assert latency.quartiles([7.0]) == (7.0, 7.0, 7.0)
    t = latency.summarize([0.004, 0.001, 0.002, 0.003], batch=8, seq=16, warmup=0, threads=1,
                          device="cpu", device_name="x")
    assert (t.min_ms, t.max_ms, t.runs) == pytest.approx((1.0, 4.0, 4))
    assert t.median_ms == pytest.approx(2.5)
    assert t.iqr_ms == pytest.approx(t.p75_ms - t.p25_ms) and t.iqr_ms > 0
    assert t.throughput == pytest.approx(8 / 0.0025)
    with pytest.raises(ValueError, match="runs"):
        latency.quartiles([])


def test_random_inputs_use_the_vocabulary_without_padding():
    cfg = TINY_CONFIGS["roberta"]
    inputs = latency.random_inputs(cfg, batch=4, seq=32, seed=1)
    ids = inputs["input_ids"]
    assert ids.shape == (4, 32) and ids.dtype == torch.long
    assert 0 <= int(ids.min()) and int(ids.max()) < cfg.vocab_size
    assert not (ids == cfg.pad_token_id).any()
    assert inputs["attention_mask"].all()
    assert "token_type_ids" in inputs
    assert "token_type_ids" not in latency.random_inputs(TINY_CONFIGS["distilbert"], 1, 8)
    assert torch.equal(ids, latency.random_inputs(cfg, batch=4, seq=32, seed=1)["input_ids"])


def test_measure_a_tiny_model():
    torch.manual_seed(0)
    model = AutoModel.from_config(TINY_CONFIGS["albert"])
    before = torch.get_num_threads()
    t = latency.measure(model, batch=2, seq=16, warmup=2, runs=7, threads=1)
    assert torch.get_num_threads() == before  # the fixed count is restored afterwards
    assert (t.runs, t.warmup, t.batch, t.seq) == (7, 2, 2, 16)
    assert (t.threads, t.device, t.dtype) == (1, "cpu", "fp32")
    assert 0 < t.min_ms <= t.p25_ms <= t.median_ms <= t.p75_ms <= t.max_ms
    assert t.min_ms <= t.mean_ms <= t.max_ms
    assert t.device_name
    with pytest.raises(ValueError, match="positions"):
        latency.measure(model, batch=1, seq=600, warmup=0, runs=1)


def test_measure_interleaved_keeps_cases_apart():
    torch.manual_seed(0)
    small = AutoModel.from_config(TINY_CONFIGS["bert"])
    other = AutoModel.from_config(TINY_CONFIGS["distilbert"])
    rounds = []
    timings = latency.measure_interleaved([(small, 1, 8), (other, 2, 12), (small, 1, 24)],
                                          warmup=1, runs=4, threads=1,
                                          progress=lambda done, total: rounds.append((done, total)))
    assert rounds == [(i, 5) for i in range(1, 6)]
    assert [(t.batch, t.seq, t.runs, t.threads) for t in timings] == [
        (1, 8, 4, 1), (2, 12, 4, 1), (1, 24, 4, 1)]
    for t in timings:
        assert 0 < t.min_ms <= t.p25_ms <= t.median_ms <= t.p75_ms <= t.max_ms
    with pytest.raises(ValueError, match="positions"):
        latency.measure_interleaved([(small, 1, 513)], warmup=0, runs=1)


def test_interleaved_cases_read_the_same_ids_below_the_smallest_vocabulary(monkeypatch):
    """A teacher and its trimmed student are timed on the same ids (a trimmed vocabulary is the
    first ids of no other model, but the ids must be valid for both and alike for the ratio)."""
    torch.manual_seed(0)
    big = AutoModel.from_config(TINY_CONFIGS["bert"])
    config = copy.deepcopy(TINY_CONFIGS["bert"])
    config.vocab_size = 40
    small = AutoModel.from_config(config)
    seen = []
    original = latency.random_inputs

    def recording(*args, **kwargs):
        inputs = original(*args, **kwargs)
        seen.append(inputs["input_ids"])
        return inputs

    monkeypatch.setattr(latency, "random_inputs", recording)
    latency.measure_interleaved([(big, 1, 16), (small, 1, 16)], warmup=0, runs=1, threads=1)
    assert big.config.vocab_size > 40 and len(seen) == 2
    assert torch.equal(seen[0], seen[1]) and int(seen[0].max()) < 40
    assert int(original(big.config, 1, 512, seed=1)["input_ids"].max()) >= 40  # alone: its whole vocabulary


def test_time_calls_counts_warmup_and_runs():
    calls = []
    seconds = latency.time_calls(lambda: calls.append(1), warmup=3, runs=5)
    assert len(calls) == 8 and len(seconds) == 5 and all(s >= 0 for s in seconds)


# --- back-ends -----------------------------------------------------------------------------------
EVAL = [{"text": t, "label": i % 2} for i, t in enumerate(
    ["El gato duerme.", "Hace calor en Sevilla.", "La niña lee un libro.",
     "¿Dónde está la estación?", "El Real Madrid ganó.", "Compré peras y manzanas en el mercado del barrio."] * 2)]


def test_backends_side_by_side(tiny_bert_dir, tmp_path):
    results = backends.compare_backends(
        tiny_bert_dir, EVAL, ["eager", "onnx", "onnx-int8"], batch=2, seq=16, warmup=1, runs=3,
        threads=1, eval_batch_size=5, work_dir=tmp_path,
    )
    by = {r.backend: r for r in results}
    assert all(r.available for r in results), [r.reason for r in results]
    assert by["eager"].agreement == 1.0 and by["eager"].max_logit_diff == 0.0
    assert by["onnx"].agreement == 1.0 and by["onnx"].max_logit_diff < 1e-4
    # the conversion `distill export --onnx` ships (distill.ship.onnx), padded batches included
    assert by["onnx"].notes == ["exported with the torch.export exporter"]
    assert by["onnx"].accuracy == by["eager"].accuracy
    assert 0.0 <= by["onnx-int8"].agreement <= 1.0 and by["onnx-int8"].max_logit_diff > 0  # int8 rounds
    assert by["onnx-int8"].size_mb < by["onnx"].size_mb
    for r in results:
        assert r.timing.runs == 3 and r.timing.threads == 1 and r.timing.median_ms > 0


def test_failed_export_is_reported_not_raised(tiny_bert_dir, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no exporter here")

    monkeypatch.setattr(torch.onnx, "export", broken)
    results = backends.compare_backends(tiny_bert_dir, EVAL[:3], ["eager", "onnx"], batch=1, seq=8,
                                        warmup=0, runs=1, threads=1)
    eager, onnx = results
    assert eager.available and eager.accuracy is not None
    assert not onnx.available
    assert "ONNX export failed" in onnx.reason and "no exporter here" in onnx.reason


def test_eval_rows_are_checked(tmp_path):
    path = tmp_path / "val.jsonl"
    path.write_text('{"text": "hola", "label": "pos"}\n\n{"sentence": "adiós"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="row 2: no 'text' field"):
        backends.load_eval(path)
    rows = backends.load_eval([("uno", "dos", 1), {"text": "tres", "label": "pos"}])
    assert rows[0].text_pair == "dos"
    cfg = BertConfig(num_labels=2, label2id={"neg": 0, "pos": 1}, id2label={0: "neg", 1: "pos"})
    assert backends.label_ids(rows, cfg).tolist() == [1, 1]
    with pytest.raises(ValueError, match="'neutral' is not one of"):
        backends.label_ids([backends.EvalRow("x", "neutral")], cfg)


@pytest.mark.slow
def test_compile_backend(tiny_bert_dir):
    (result,) = backends.compare_backends(tiny_bert_dir, EVAL[:4], ["compile"], batch=2, seq=8,
                                          warmup=1, runs=2, threads=1, eval_batch_size=2)
    if not result.available:  # e.g. no C++ compiler for inductor: reported, with the reason
        assert result.reason
    else:
        assert result.agreement == 1.0 and result.max_logit_diff < 1e-4


# --- command line --------------------------------------------------------------------------------
def test_cli_analytic_study_list(tmp_path, capsys):
    assert cli.main(["--analytic-only", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "bench.json").read_text())
    rows = {(r["model"], r["seq"]): r for r in data["rows"]}
    assert {m for m, _ in rows} == set(shapes.STUDY_MODELS)
    assert data["environment"]["threads"] >= 1 and data["environment"]["device_name"]
    for name, published in STUDY_SPEEDUP.items():
        assert rows[(name, 512)]["speedup_macs"] == pytest.approx(published, rel=0.01)
    assert rows[("beto", 512)]["gmacs"] == pytest.approx(43.53, abs=0.005)
    with open(tmp_path / "bench.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 16 and table[0]["model"] == "beto"
    md = (tmp_path / "bench.md").read_text()
    assert "| albeto-base-6 | 11.81 | 1 | 512 | 21.81 |" in md
    assert "albeto-tiny" in capsys.readouterr().out


@pytest.mark.parametrize("interleave", [False, True])
def test_cli_times_local_models_and_plots(tmp_path, tiny_bert_dir, tiny_albert_dir, interleave):
    scores = tmp_path / "scores.json"
    scores.write_text(json.dumps({str(tiny_albert_dir): 0.7, str(tiny_bert_dir): 0.8}))
    out = tmp_path / "out"
    rc = cli.main([str(tiny_albert_dir), "--reference", str(tiny_bert_dir), "--seq", "8", "32",
                   "--warmup", "1", "--runs", "3", "--threads", "1", "--out", str(out), "--plot",
                   "--scores", str(scores)] + (["--interleave"] if interleave else []))
    assert rc == 0
    rows = json.loads((out / "bench.json").read_text())["rows"]
    assert [r["model"] for r in rows] == [str(tiny_bert_dir)] * 2 + [str(tiny_albert_dir)] * 2
    for r in rows:
        assert r["threads"] == 1 and r["runs"] == 3 and r["p25_ms"] <= r["latency_ms"] <= r["p75_ms"]
        assert r["speedup_latency"] > 0 and r["score"] in (0.7, 0.8)
    assert rows[0]["speedup_latency"] == 1.0 and rows[0]["speedup_macs"] == 1.0
    assert (out / "latency.png").stat().st_size > 0 and (out / "score_vs_speedup.png").stat().st_size > 0


def test_cli_backends(tmp_path, tiny_bert_dir):
    val = tmp_path / "val.jsonl"
    val.write_text("\n".join(json.dumps(r) for r in EVAL), encoding="utf-8")
    out = tmp_path / "out"
    rc = cli.main([str(tiny_bert_dir), "--backends", "eager,onnx", "--eval", str(val), "--batch", "1",
                   "--seq", "16", "--warmup", "0", "--runs", "2", "--threads", "1", "--out", str(out)])
    assert rc == 0
    flat = json.loads((out / "backends.json").read_text())
    assert [r["backend"] for r in flat] == ["eager", "onnx"] and all(r["available"] for r in flat)
    assert "| onnx |" in (out / "backends.md").read_text().replace(f"| {tiny_bert_dir} ", "")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["nobody/no-such-model", "--analytic-only"], "shape name"),
        (["beto", "--seq", "0", "--analytic-only"], "--seq values must be positive"),
        (["beto", "--eval", "x.jsonl"], "--eval is used with --backends"),
        (["beto", "--backends", "eager,tensorrt"], "unknown ['tensorrt']"),
        (["beto", "--backends", "eager"], "not a saved model folder"),
    ],
)
def test_cli_errors_are_for_people(argv, message, tmp_path, capsys):
    assert cli.main([*argv, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_python_dash_m_entry_point(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "distill.bench", "albeto-tiny", "--analytic-only", "--seq", "512",
         "--out", str(tmp_path)], capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "| albeto-tiny | 5.34 | 1 | 512 | 2.42 |" in proc.stdout
