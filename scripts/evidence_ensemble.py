"""Evidence for `teachers:`: the student of an ensemble of differently seeded teachers vs the
student of the best single one, over several student seeds, through the public CLI.

    python scripts/evidence_ensemble.py [--recipe recipes/evidence/wic_pos.yaml] [--rows 400]
        [--teacher-seeds 1 2 3] [--seeds 1 2 3] [--teacher-epochs 5] [--epochs 15] [--baseline]
        [--root runs/evidence/ensemble]

1. `distill teacher` fine-tunes one teacher per teacher seed (stages teacher-<i> of one
   `teachers:` recipe, each in its own folder, outputs cached once in a shared cache).
2. The best single teacher is the one with the highest *validation* score (what a user would
   pick without looking at test).
3. For every student seed: `distill student` from that teacher alone (`single-best`), from the
   mean of all teachers (`ensemble-mean`) and, with --baseline, the student fine-tuned alone.
   Same data, student cut, epochs and seed in every mode; only the teachers differ.
4. The ensemble teacher itself is scored on the test split (the mean of the teachers'
   probabilities, T = 1), beside each teacher.

Writes `<root>/results.json` (every run's numbers and command) and `<root>/table.md` (mean ±
sample std over seeds, min–max, and the per-seed paired difference ensemble − single). Finished
stages are skipped by the CLI, so a stopped run resumes with the same command.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ENV = {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}


def distill(*args: str, log: Path) -> float:
    """Run `python -m distill ARGS`, output to `log`; returns the wall time, fails loudly."""
    start = time.perf_counter()
    with open(log, "a") as f:
        code = subprocess.call([sys.executable, "-m", "distill", *args], stdout=f, stderr=subprocess.STDOUT,
                               env={**os.environ, **ENV})
    if code != 0:
        sys.exit(f"distill {' '.join(args)} failed with status {code}; see {log}")
    return time.perf_counter() - start


def write_recipe(base: dict, path: Path, teachers: list[dict], args: argparse.Namespace, root: Path) -> Path:
    recipe = {k: v for k, v in base.items() if k not in ("teacher", "search")}
    recipe["teachers"] = teachers
    recipe["data"] = {**base["data"], "max_train_samples": args.rows}
    recipe["train"] = {**base["train"], "epochs": args.epochs}
    recipe["distill"] = {**base.get("distill", {}), "teacher_combine": "mean", "cache_dir": str(root / "cache")}
    recipe["run"] = {"baseline": False}
    path.write_text(
        "# written by scripts/evidence_ensemble.py\n#   python -m distill run " + str(path) + "\n"
        + yaml.safe_dump(recipe, sort_keys=False)
    )
    return path


def metrics(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


def ensemble_teacher_score(recipe: Path, folders: list[Path]) -> dict:
    """Test accuracy of each teacher and of the mean of their probabilities (T = 1), from the
    saved models on the recipe's test split (its own tokenization: data.max_length)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from distill.config import load_config

    cfg = load_config(recipe)
    rows = [json.loads(x) for x in Path(cfg.data.files["test"]).read_text().splitlines() if x.strip()]
    text, label = cfg.data.columns.get("text", "text"), cfg.data.columns.get("label", "label")
    gold = torch.tensor([list(cfg.task.labels).index(r[label]) for r in rows])
    probs = []
    for folder in folders:
        model = AutoModelForSequenceClassification.from_pretrained(folder / "model").eval()
        tok = AutoTokenizer.from_pretrained(folder / "model")
        order = [model.config.label2id[name] for name in cfg.task.labels]  # the recipe's label order
        out = []
        with torch.no_grad():
            for i in range(0, len(rows), 64):
                enc = tok([r[text] for r in rows[i:i + 64]], truncation=True, max_length=cfg.data.max_length,
                          padding=True, return_tensors="pt")
                out.append(model(**enc).logits[:, order].softmax(-1))  # [batch, labels]
        probs.append(torch.cat(out))  # [rows, labels]
    each = [float((p.argmax(-1) == gold).float().mean()) for p in probs]
    mean = torch.stack(probs).mean(0)  # [rows, labels]
    return {"teachers": each, "mean": float((mean.argmax(-1) == gold).float().mean())}


def summary(values: list[float]) -> str:
    pct = [100 * v for v in values]
    spread = f" ± {statistics.stdev(pct):.2f}" if len(pct) > 1 else ""
    return f"{statistics.mean(pct):.2f}{spread} | {min(pct):.2f} – {max(pct):.2f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="recipes/evidence/wic_pos.yaml")
    p.add_argument("--root", default="runs/evidence/ensemble")
    p.add_argument("--rows", type=int, default=400, help="training rows (data.max_train_samples)")
    p.add_argument("--teacher-seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="student seeds")
    p.add_argument("--teacher-epochs", type=int, default=5)
    p.add_argument("--epochs", type=int, default=15, help="student epochs")
    p.add_argument("--baseline", action="store_true", help="also the student fine-tuned alone")
    args = p.parse_args(argv)
    root = Path(args.root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    base = yaml.safe_load(Path(args.recipe).read_text())
    if not Path(base["data"]["files"]["train"]).exists():
        sys.exit(f"{base['data']['files']['train']} is missing: run python scripts/make_evidence_data.py first")
    log = root / "runs.log"
    t = base["teacher"]
    teachers = [
        {"model": t["model"], "lr": t.get("lr"), "epochs": args.teacher_epochs, "seed": s, "dir": str(root / "teachers" / f"seed-{s}")}
        for s in args.teacher_seeds
    ]
    all_recipe = write_recipe(base, root / "ensemble.yaml", teachers, args, root)
    results: dict = {"args": vars(args), "runs": []}
    wall = distill("teacher", str(all_recipe), log=log)
    results["runs"].append({"what": "teachers", "command": f"distill teacher {all_recipe}", "wall_s": wall})
    folders = [Path(x["dir"]) for x in teachers]
    scores = [metrics(f) for f in folders]
    metric = scores[0]["info"]["metric"]
    best = max(range(len(teachers)), key=lambda i: scores[i]["validation"][metric])
    single_recipe = write_recipe(base, root / "single.yaml", [teachers[best]], args, root)
    results["teachers"] = [
        {"seed": s, "validation": m["validation"][metric], "test": m["test"][metric]} for s, m in zip(args.teacher_seeds, scores)
    ]
    results["best_teacher_seed"] = args.teacher_seeds[best]
    results["ensemble_teacher"] = ensemble_teacher_score(all_recipe, folders)
    modes = {"single-best": ("student", single_recipe), "ensemble-mean": ("student", all_recipe)}
    if args.baseline:
        modes["finetune"] = ("baseline", single_recipe)
    scores_by_mode: dict[str, dict[int, dict]] = {m: {} for m in modes}
    for seed in args.seeds:
        for mode, (stage, recipe) in modes.items():
            out = root / mode / f"seed-{seed}"
            cmd = [stage, str(recipe), f"seed={seed}", f"output_dir={out}"]
            wall = distill(*cmd, log=log)
            m = metrics(out / stage)
            scores_by_mode[mode][seed] = {"validation": m["validation"][metric], "test": m["test"][metric]}
            results["runs"].append({"what": mode, "seed": seed, "command": "distill " + " ".join(cmd), "wall_s": wall,
                                    **scores_by_mode[mode][seed]})
            print(f"{mode} seed {seed}: test {metric} {m['test'][metric]:.4f} ({wall:.0f} s)", flush=True)
    results["modes"] = scores_by_mode
    lines = [
        f"| student of | n | test {metric} mean ± std (%) | min – max | validation mean (%) |",
        "|---|---|---|---|---|",
    ]
    for mode, by_seed in scores_by_mode.items():
        tests = [v["test"] for v in by_seed.values()]
        vals = [v["validation"] for v in by_seed.values()]
        lines.append(f"| {mode} | {len(tests)} | {summary(tests)} | {100 * statistics.mean(vals):.2f} |")
    diffs = [scores_by_mode["ensemble-mean"][s]["test"] - scores_by_mode["single-best"][s]["test"] for s in args.seeds]
    wins = sum(d > 0 for d in diffs)
    spread = f" ± {100 * statistics.stdev(diffs):.2f}" if len(diffs) > 1 else ""
    lines += [
        "",
        f"Paired by student seed, ensemble-mean − single-best: {100 * statistics.mean(diffs):+.2f}{spread} points "
        f"(per seed {', '.join(f'{100 * d:+.2f}' for d in diffs)}; the ensemble's student won on {wins}/{len(diffs)} seeds).",
        "",
        "| teacher seed | validation (%) | test (%) |",
        "|---|---|---|",
        *[f"| {t['seed']}{' (best on validation)' if t['seed'] == results['best_teacher_seed'] else ''} | "
          f"{100 * t['validation']:.2f} | {100 * t['test']:.2f} |" for t in results["teachers"]],
        f"| mean of the {len(teachers)} (T = 1) | – | {100 * results['ensemble_teacher']['mean']:.2f} |",
    ]
    results["diffs"] = diffs
    (root / "results.json").write_text(json.dumps(results, indent=1))
    (root / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
