"""Generate the demo's Spanish review-polarity dataset (distill/sample_data/demo/*.jsonl).

    python scripts/make_demo_data.py [--out distill/sample_data/demo] [--seed 13]

Reviews of products and services whose polarity needs more than a keyword: negation flips an
adjective ("no es barato"), a contrast clause decides ("es bonito, pero se rompió"), and
intensifiers/hedges add noise. 5 % of training labels are flipped, as real annotations are
noisy. Deterministic for a given seed.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

PRODUCTS = [
    "el teléfono", "la cámara", "el portátil", "la cafetera", "el hotel", "el restaurante",
    "la aspiradora", "el televisor", "la bicicleta", "el servicio de entrega", "la aplicación",
    "el colchón", "la impresora", "el auricular", "la lavadora", "el libro", "la película",
    "el vuelo", "la tienda online", "el reloj",
]
POSITIVE = [
    "excelente", "muy bueno", "fantástico", "cómodo", "rápido", "fiable", "barato", "precioso",
    "útil", "silencioso", "resistente", "agradable", "práctico", "eficiente", "limpio",
]
NEGATIVE = [
    "horrible", "malo", "lento", "caro", "ruidoso", "frágil", "incómodo", "decepcionante",
    "sucio", "inútil", "defectuoso", "pésimo", "complicado", "aburrido", "mediocre",
]
POS_EVENTS = [
    "llegó antes de lo previsto", "funciona perfectamente", "lo recomiendo sin dudarlo",
    "superó mis expectativas", "volvería a comprarlo", "el soporte me ayudó enseguida",
    "vale cada euro", "mis hijos están encantados",
]
NEG_EVENTS = [
    "se rompió a la semana", "no funciona como prometen", "pedí la devolución",
    "no lo recomiendo a nadie", "me arrepiento de la compra", "el soporte nunca respondió",
    "tardó un mes en llegar", "dejó de encender al segundo día",
]
OPENERS = ["", "Sinceramente, ", "La verdad es que ", "En mi opinión, ", "Tras un mes de uso, ", "Bueno, "]
INTENS = ["", "", "muy ", "bastante ", "realmente ", "algo "]


def clause(rng: random.Random) -> tuple[str, int]:
    """One evaluative clause and its polarity (1 positive, 0 negative)."""
    kind = rng.random()
    if kind < 0.45:
        positive = rng.random() < 0.5
        adj = rng.choice(POSITIVE if positive else NEGATIVE)
        negated = rng.random() < 0.4
        verb = "no es" if negated else "es"
        return f"{rng.choice(PRODUCTS)} {verb} {rng.choice(INTENS)}{adj}", int(positive != negated)
    positive = rng.random() < 0.5
    event = rng.choice(POS_EVENTS if positive else NEG_EVENTS)
    return event, int(positive)


def review(rng: random.Random) -> tuple[str, int]:
    first, label = clause(rng)
    if rng.random() < 0.45:
        # contrast: the clause after "pero" carries the verdict
        second, second_label = clause(rng)
        while second_label == label:
            second, second_label = clause(rng)
        text, label = f"{first}, pero {second}", second_label
    elif rng.random() < 0.3:
        second, second_label = clause(rng)
        while second_label != label:
            second, second_label = clause(rng)
        text = f"{first} y además {second}"
    else:
        text = first
    text = rng.choice(OPENERS) + text
    return text[0].upper() + text[1:] + ".", label


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="distill/sample_data/demo")
    ap.add_argument("--seed", type=int, default=13)
    ap.add_argument("--sizes", default="1200,300,300", help="train,validation,test rows")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    names = ["negativo", "positivo"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    for split, size in zip(("train", "validation", "test"), map(int, args.sizes.split(","))):
        rows = []
        while len(rows) < size:
            text, label = review(rng)
            if text in seen:  # no text shared between splits
                continue
            seen.add(text)
            if split == "train" and rng.random() < 0.05:
                label = 1 - label
            rows.append({"text": text, "label": names[label]})
        with open(out / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"{split}: {len(rows)} rows -> {out / f'{split}.jsonl'}")


if __name__ == "__main__":
    main()
