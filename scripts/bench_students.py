#!/usr/bin/env python
"""Small students next to their teacher: score kept, parameters, size on disk, CPU latency.

    python scripts/bench_students.py docs/evidence/multilingual.json
        [--seed 1] [--seq 128] [--runs 100] [--warmup 10] [--threads 1] [--out docs/evidence/multilingual-students.md]

Reads an evidence table's JSON (scripts/evidence.py) and, per task:
- the score of every student row (axes x mode: test mean ± std over seeds, the paired Δ vs the
  reference mode) and its retention of the teacher's test score (student mean ÷ teacher);
- from one seed's saved models (`--seed`): parameters, the size of model.safetensors, and the
  latency of one forward at batch 1 and `--seq` tokens on the CPU with `--threads` threads,
  median over `--runs`; the teacher and every student are timed round-robin in this one process
  (distill.latency.measure_interleaved), so the speed-ups are ratios taken under the same load;
- the trim check: the fine-tuned teacher trimmed to the vocabulary of a trimmed student (the
  pieces of that student's training text and corpus, `min_count` 1) against the teacher
  untrimmed, on the task's test rows. On rows whose pieces were all kept, trimming alone must
  change no prediction; the other rows show what re-segmenting unseen words costs.

Writes NAME.md (the tables) and NAME.json (every number, the machine, its load).
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import sys
from pathlib import Path
from typing import Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoConfig, AutoTokenizer  # noqa: E402

from distill.config import load_config  # noqa: E402
from distill.data.read import read_file  # noqa: E402
from distill.data.rows import task_columns  # noqa: E402
from distill.latency import measure_interleaved  # noqa: E402
from distill.loop.trim import row_texts  # noqa: E402
from distill.models.load import count_parameters  # noqa: E402
from distill.models.vocab import read_corpus, trim_vocabulary  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evidence import machine  # noqa: E402


def load_model(folder: Path) -> torch.nn.Module:
    """A saved task model with the head class its config names (token / sequence classification)."""
    config = AutoConfig.from_pretrained(folder)
    cls = getattr(transformers, (config.architectures or ["AutoModel"])[0])
    return cls.from_pretrained(folder).eval()


def recipe_of(command: list[str]) -> tuple[str, list[str]]:
    """(recipe, overrides) of a recorded `python -m distill STAGE RECIPE key=value ...` command."""
    return command[4], command[5:]


# ---------------------------------------------------------------------------------------------
# Size and speed
# ---------------------------------------------------------------------------------------------


def model_rows(evidence: dict, seed: int) -> list[dict]:
    """Per task: the teacher and each summary row, with the model folder of `seed`'s run."""
    runs = {(r["task"], json.dumps(r["axes"], sort_keys=True), r["mode"], r["seed"]): r for r in evidence["runs"]}
    out = []
    for teacher in evidence["teachers"]:
        if teacher["status"] != "done":
            continue
        task = teacher["task"]
        metric = next((s["metric"] for s in evidence["summary"] if s["task"] == task), None)
        out.append({"task": task, "student": "teacher", "mode": "–", "n": 1,
                    "test": teacher["test"].get(metric), "model": str(Path(teacher["dir"]) / "model")})
        for s in evidence["summary"]:
            if s["task"] != task or not s["test"]["n"]:
                continue
            run = runs.get((task, json.dumps(s["axes"], sort_keys=True), s["mode"], seed))
            folder = Path(run["dir"]) / run["stage"] / "model" if run and run["status"] == "done" else None
            out.append({
                "task": task, "student": " ".join(s["axes"].values()) or "student", "mode": s["mode"],
                "n": s["test"]["n"], "test": s["test"]["mean"], "test_std": s["test"]["std"],
                "delta": s["delta"]["mean"] if s["delta"] and s["delta"]["n"] else None,
                "delta_std": s["delta"]["std"] if s["delta"] and s["delta"]["n"] else None,
                "wins": f"{s['wins']}/{s['delta']['n']}" if s["delta"] and s["delta"]["n"] else None,
                "model": str(folder) if folder and folder.is_dir() else None,
            })
    return out


def measure_rows(rows: list[dict], seq: int, warmup: int, runs: int, threads: int) -> None:
    """Parameters, model.safetensors size and interleaved latency of every row with a model."""
    timed = [r for r in rows if r["model"]]
    models = []
    for r in timed:
        model = load_model(Path(r["model"]))
        r["parameters"] = count_parameters(model)
        r["embedding_parameters"] = model.get_input_embeddings().weight.numel()
        r["vocab_size"] = model.config.vocab_size
        r["layers"] = model.config.num_hidden_layers
        r["safetensors_bytes"] = (Path(r["model"]) / "model.safetensors").stat().st_size
        models.append(model)
        print(f"[bench] {r['task']} {r['student']} {r['mode']}: {r['parameters']:,} parameters", flush=True)
    print(f"[bench] timing {len(models)} models round-robin: batch 1, seq {seq}, {threads} thread(s), "
          f"{warmup} warm-up + {runs} runs each", flush=True)
    timings = measure_interleaved([(m, 1, seq) for m in models], warmup=warmup, runs=runs, threads=threads)
    for r, t in zip(timed, timings):
        r["latency"] = t.as_dict()
    for task in dict.fromkeys(r["task"] for r in rows):
        teacher = next((r for r in rows if r["task"] == task and r["student"] == "teacher"), None)
        for r in rows:
            if r["task"] != task or not teacher:
                continue
            if r.get("latency") and teacher.get("latency"):
                r["speedup"] = teacher["latency"]["median_ms"] / r["latency"]["median_ms"]
            if r["test"] is not None and teacher["test"]:
                r["retention"] = r["test"] / teacher["test"]


# ---------------------------------------------------------------------------------------------
# Trimming alone changes no prediction
# ---------------------------------------------------------------------------------------------


@torch.inference_mode()
def trim_check(evidence: dict) -> list[dict]:
    """Per task with a teacher and a trimmed student of its tokenizer: the teacher trimmed to
    that student's vocabulary vs the teacher itself on the test rows, split into rows whose
    pieces were all kept and the others. Tagging compares each word's first piece (what the
    task scores), classification the row's label; both are also scored against the gold."""
    out = []
    for teacher in evidence["teachers"]:
        if teacher["status"] != "done":
            continue
        task = teacher["task"]
        trimmed_run = next((r for r in evidence["runs"] if r["task"] == task and r["status"] == "done"
                            and (r.get("info", {}).get("vocab") or {}).get("pieces_after")), None)
        if trimmed_run is None:
            continue
        cfg = load_config(*recipe_of(trimmed_run["command"]))
        if cfg.student.model != cfg.teacher.model or cfg.task.family not in ("tagging", "classification"):
            continue  # not the teacher's vocabulary, or a task this check does not read
        folder = Path(teacher["dir"]) / "model"
        model, tokenizer = load_model(folder), AutoTokenizer.from_pretrained(folder)
        train = read_file(cfg.data.files["train"], cfg.data.format, cfg.data.column_names)
        test = read_file(cfg.data.files["test"], cfg.data.format, cfg.data.column_names)
        texts = row_texts(train, cfg.task.family, cfg.data.columns) + read_corpus(cfg.student.vocab.corpus)
        small, small_tok, report = trim_vocabulary(copy.deepcopy(model), tokenizer, texts, cfg.student.vocab.min_count,
                                                   list(cfg.student.vocab.keep))
        cols = task_columns(cfg.task.family, cfg.data.columns)
        tagging = cfg.task.family == "tagging"
        names = model.config.id2label
        groups = {g: {"rows": 0, "predictions": 0, "same": 0, "gold_full": 0, "gold_trimmed": 0, "pieces_full": 0,
                      "pieces_trimmed": 0, "unknown_trimmed": 0, "max_abs_logit_diff": None} for g in ("kept", "other")}
        for row in test:
            text, gold = (row[cols["tokens"]], row[cols["tags"]]) if tagging else (row[cols["text"]], [row[cols["label"]]])
            kw = dict(is_split_into_words=tagging, truncation=True, max_length=cfg.data.max_length, return_tensors="pt")
            full, cut = tokenizer(text, **kw), small_tok(text, **kw)
            kept = full["input_ids"][0].tolist() == [report.old_ids[i] for i in cut["input_ids"][0].tolist()]
            a, b = model(**full).logits[0], small(**cut).logits[0]  # [seq, labels] (tagging) or [labels]
            g = groups["kept" if kept else "other"]
            g["rows"] += 1
            g["pieces_full"] += full["input_ids"].shape[1]  # special tokens included: what the model reads
            g["pieces_trimmed"] += cut["input_ids"].shape[1]
            g["unknown_trimmed"] += int((cut["input_ids"] == small_tok.unk_token_id).sum())
            if kept:  # the same pieces: every position's logits must agree, not only the argmax
                diff = (a - b).abs().max().item()
                g["max_abs_logit_diff"] = max(g["max_abs_logit_diff"] or 0.0, diff)
            if tagging:  # each word's first piece; words a truncation cut off in either are left out
                fa, fb = first_pieces(full.word_ids()), first_pieces(cut.word_ids())
                n = min(len(fa), len(fb))
                pa, pb, gold = a[fa[:n]].argmax(-1).tolist(), b[fb[:n]].argmax(-1).tolist(), gold[:n]
            else:
                pa, pb = [int(a.argmax())], [int(b.argmax())]
            g["predictions"] += len(pa)
            g["same"] += sum(x == y for x, y in zip(pa, pb))
            g["gold_full"] += sum(names[x] == t for x, t in zip(pa, gold))
            g["gold_trimmed"] += sum(names[y] == t for y, t in zip(pb, gold))
        out.append({"task": task, "teacher": str(folder), "vocabulary_from": trimmed_run["command"],
                    "unit": "word" if tagging else "row",
                    "pieces_before": report.pieces_before, "pieces_after": report.pieces_after,
                    "parameters_before": report.parameters_before, "parameters_after": report.parameters_after,
                    **groups})
        print(f"[bench] trim check {task}: {groups}", flush=True)
    return out


def first_pieces(word_ids: list[Optional[int]]) -> list[int]:
    """Positions of each word's first piece."""
    seen, out = set(), []
    for pos, w in enumerate(word_ids):
        if w is not None and w not in seen:
            seen.add(w)
            out.append(pos)
    return out


# ---------------------------------------------------------------------------------------------
# The document
# ---------------------------------------------------------------------------------------------


def _pct(x: Optional[float], signed: bool = False) -> str:
    return "–" if x is None else (f"{100 * x:+.2f}" if signed else f"{100 * x:.2f}")


def render(header: dict, rows: list[dict], checks: list[dict]) -> str:
    m = header["machine_start"]
    lines = [
        f"# {header['title']}: size and speed",
        "",
        f"Produced by `{header['command']}` ({header['date']}) from `{header['evidence']}`; every number is "
        f"in `{header['json']}`. Scores: test mean ± std over seeds and Δ vs `{header['reference']}` paired by "
        f"seed, from the evidence table. Parameters, size and latency: seed {header['seed']}'s saved models "
        f"(`model/` of each stage), timed round-robin in one process: batch 1, sequence length "
        f"{header['seq']}, {header['threads']} thread(s), fp32, eager PyTorch, {header['warmup']} warm-up + "
        f"{header['runs']} timed forwards each, median (inter-quartile range).",
        "",
        f"Machine: {m['cpu']}, {m['cpu_count']} CPUs, torch {m.get('torch', '?')}. Load average "
        f"(1 / 5 / 15 min): {' / '.join(map(str, m['load_average']))} at the start, "
        f"{' / '.join(map(str, header['machine_end']['load_average']))} at the end.",
    ]
    for task in dict.fromkeys(r["task"] for r in rows):
        lines += [
            "", f"## {task}", "",
            "| student | mode | n | test (%) | Δ vs finetune (paired) | wins | retention of the teacher | "
            "layers | vocabulary | parameters | model.safetensors | latency ms (IQR) | speed-up vs teacher |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in (r for r in rows if r["task"] == task):
            test = _pct(r["test"]) + (f" ± {100 * r['test_std']:.2f}" if r.get("test_std") is not None else "")
            delta = _pct(r.get("delta"), signed=True) + (f" ± {100 * r['delta_std']:.2f}" if r.get("delta_std") is not None else "")
            lat = r.get("latency")
            lines.append("| " + " | ".join([
                r["student"], r["mode"], str(r["n"]), test,
                "(reference)" if r["mode"] == header["reference"] else delta, r.get("wins") or "–",
                f"{100 * r['retention']:.2f} %" if r.get("retention") is not None else "–",
                str(r.get("layers", "–")), f"{r['vocab_size']:,}" if r.get("vocab_size") else "–",
                f"{r['parameters'] / 1e6:.2f}M" if r.get("parameters") else "–",
                f"{r['safetensors_bytes'] / 2**20:.1f} MiB" if r.get("safetensors_bytes") else "–",
                f"{lat['median_ms']:.1f} ({lat['p25_ms']:.1f}–{lat['p75_ms']:.1f})" if lat else "–",
                f"{r['speedup']:.2f}×" if r.get("speedup") else "–",
            ]) + " |")
    for c in checks:
        unit = c["unit"] + "s"
        lines += [
            "", f"## {c['task']}: trimming alone", "",
            f"The fine-tuned teacher trimmed to the trimmed students' vocabulary ({c['pieces_before']:,} → "
            f"{c['pieces_after']:,} pieces, {c['parameters_before'] / 1e6:.1f}M → {c['parameters_after'] / 1e6:.1f}M "
            f"parameters) against itself untrimmed, on the test rows; predictions compared on {unit}.",
            "",
            f"| test rows | rows | pieces untrimmed → trimmed (unknown) | {unit} | same prediction | accuracy untrimmed | "
            "accuracy trimmed | largest logit difference |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for group, what in (("kept", "every piece kept (the same pieces)"), ("other", "some piece dropped (re-segmented)"),
                            (None, "all")):
            g = c[group] if group else {k: c["kept"][k] + c["other"][k] for k in (
                "rows", "predictions", "same", "gold_full", "gold_trimmed", "pieces_full", "pieces_trimmed", "unknown_trimmed")}
            n = max(g["predictions"], 1)
            diff = g.get("max_abs_logit_diff")
            lines.append(
                f"| {what} | {g['rows']} | {g['pieces_full']:,} → {g['pieces_trimmed']:,} ({g['unknown_trimmed']}) | "
                f"{g['predictions']} | {g['same']} ({100 * g['same'] / n:.2f} %) | "
                f"{100 * g['gold_full'] / n:.2f} % | {100 * g['gold_trimmed'] / n:.2f} % | "
                + (f"{diff:.2e}" if diff is not None else "–") + " |"
            )
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/bench_students.py", description=__doc__.split("\n\n")[0])
    p.add_argument("evidence", help="an evidence table's JSON (scripts/evidence.py)")
    p.add_argument("--seed", type=int, default=1, help="whose saved models are measured (default 1)")
    p.add_argument("--seq", type=int, default=128, help="sequence length of the timed forwards (default 128)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--runs", type=int, default=100)
    p.add_argument("--threads", type=int, default=1, help="torch threads while timing (default 1)")
    p.add_argument("--out", help="markdown to write (JSON beside it); default <evidence>-students.md")
    args = p.parse_args(argv)

    path = Path(args.evidence)
    evidence = json.loads(path.read_text())
    out = Path(args.out or path.with_name(path.stem + "-students.md"))
    start = machine()
    rows = model_rows(evidence, args.seed)
    if not rows:
        print(f"bench_students: {path} has no finished teacher", file=sys.stderr)
        return 2
    measure_rows(rows, args.seq, args.warmup, args.runs, args.threads)
    checks = trim_check(evidence)
    header = {
        "title": evidence["spec"]["title"], "evidence": str(path), "json": str(out.with_suffix(".json")),
        "command": "python scripts/bench_students.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "reference": evidence["spec"].get("reference"), "seed": args.seed, "seq": args.seq,
        "warmup": args.warmup, "runs": args.runs, "threads": args.threads,
        "machine_start": start, "machine_end": machine(),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(header, rows, checks))
    out.with_suffix(".json").write_text(json.dumps({**header, "rows": rows, "trim_check": checks}, indent=2,
                                                   ensure_ascii=False) + "\n")
    print(f"[bench] wrote {out} and {out.with_suffix('.json')}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
