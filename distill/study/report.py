"""`distill report RUNS_DIR`: a tree of runs -> the study's two tables, Summary and All results.

    distill report runs/study                       # runs/study/report/{tables.md,summary.csv,results.csv}
    distill report runs/study --compare-published   # the published numbers beside ours
    distill report runs/study --split validation

The runs and the best of each (block, task, model) come from runs.py; this module turns them
into the tables: each cell the run's score in percent, each row its parameters, its speedup
(MACs from model/config.json) and the study's Score, and the published numbers beside them on
request. A `distill search` folder is reported as its trials table instead.
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
from collections import defaultdict
from dataclasses import dataclass
from decimal import ROUND_DOWN, ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from distill.study.published import (
    BLOCK_TITLES,
    BLOCKS,
    FAMILY_METRICS,
    MODELS,
    TASKS,
    PublishedModel,
    find_model,
    task_info,
)
from distill.study.runs import (  # noqa: F401  (safe_name, student_ref, write_selection: for distill grid)
    Key,
    ReportError,
    Run,
    collect_runs,
    model_title,
    read_selection,
    safe_name,
    select_best,
    student_ref,
    write_selection,
)

log = logging.getLogger("distill.report")

SPEED_BATCH, SPEED_SEQ = 1, 512  # the study's Speedup: MACs at batch 1, sequence 512, vs BETO


# --- numbers -----------------------------------------------------------------------------------
def as_printed(value: float) -> Decimal:
    """A percent score as the tables print it: two decimals, halves rounded up."""
    return Decimal(repr(float(value))).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)


def study_score(values: Sequence[float]) -> float:
    """The study's Score: the mean of the printed task scores (QA by F1), cut to two decimals.

    Cutting rather than rounding is what the published table did: it reproduces all 17
    published Scores from the printed task scores, where rounding misses 9 of them.
    """
    if not values:
        raise ValueError("a score needs at least one task score")
    mean = sum(as_printed(v) for v in values) / len(values)
    return float(mean.quantize(Decimal("0.01"), rounding=ROUND_DOWN))


_SPEED_CACHE: dict[str, Optional[float]] = {}


def macs_speedup(model_dir: Path) -> Optional[float]:
    """BETO's MACs over this model's, batch 1, sequence 512 (the study's Speedup), from the saved
    model's config.json; None when it cannot be counted (no config, unsupported architecture)."""
    key = str(model_dir)
    if key in _SPEED_CACHE:
        return _SPEED_CACHE[key]
    value = None
    if (Path(model_dir) / "config.json").exists():
        try:
            from transformers import AutoConfig

            from distill.bench.flops import count
            from distill.bench.shapes import shape_config

            reference = count(shape_config("beto"), SPEED_BATCH, SPEED_SEQ)
            ours = count(AutoConfig.from_pretrained(model_dir), SPEED_BATCH, SPEED_SEQ)
            value = reference.macs / ours.macs
        except Exception as err:  # UnsupportedModelError, unreadable config: leave the cell empty
            log.warning("no speedup for %s: %s", model_dir, err)
    _SPEED_CACHE[key] = value
    return value


def format_parameters(n: Optional[int]) -> str:
    """As the study prints them: 110M, 5M; below a million, in thousands."""
    if n is None:
        return "–"
    return f"{round(n / 1e6)}M" if n >= 1e6 else f"{round(n / 1e3)}K"


# --- tables ------------------------------------------------------------------------------------
@dataclass
class Column:
    """A task column of the All results table."""

    task: str  # the runs' task name
    title: str
    family: str
    metrics: tuple[str, ...]
    published_key: Optional[str]  # the study's task this column stands for, if any


@dataclass
class Row:
    """One model in one block: its best run per task and the numbers derived from them."""

    block: str
    model: str
    title: str
    runs: dict[str, Run]
    parameters: Optional[int] = None
    speedup: Optional[float] = None
    published: Optional[PublishedModel] = None

    def cell(self, column: Column, split: str) -> Optional[tuple[Optional[float], ...]]:
        run = self.runs.get(column.task)
        if run is None:
            return None
        return tuple(run.score(split, m) for m in column.metrics)

    def task_scores(self, columns: Sequence[Column], split: str) -> list[float]:
        """The numbers the Score averages: the first metric of every present cell."""
        scores = []
        for column in columns:
            cell = self.cell(column, split)
            if cell is not None and cell[0] is not None:
                scores.append(cell[0])
        return scores


@dataclass
class Tables:
    split: str
    columns: list[Column]
    rows: list[Row]
    compare: bool = False


def build_columns(runs: Iterable[Run]) -> list[Column]:
    """Task columns in the study's order, other tasks after them by name."""
    seen: dict[str, str] = {}
    for run in runs:
        if run.task in seen and seen[run.task] != run.family:
            raise ReportError(
                f"task '{run.task}' appears as both {seen[run.task]} and {run.family} "
                f"(e.g. {run.path}); give different tasks different task.name"
            )
        seen.setdefault(run.task, run.family)
    order = {t.key: i for i, t in enumerate(TASKS)}
    columns = []
    for task, family in seen.items():
        info = task_info(task)
        if family not in FAMILY_METRICS:
            raise ReportError(f"task '{task}' has unknown family '{family}'")
        columns.append(Column(task, info.title if info else task, family, FAMILY_METRICS[family],
                              info.key if info else None))
    columns.sort(key=lambda c: (order.get(c.published_key, len(order)), c.task))
    return columns


def build_tables(best: dict[Key, Run], split: str = "test", compare: bool = False) -> Tables:
    """Rows per (block, model) from the selected runs: parameters, speedup, published match."""
    columns = build_columns(best.values())
    grouped: dict[tuple[str, str], dict[str, Run]] = defaultdict(dict)
    for (block, task, model), run in best.items():
        grouped[(block, model)][task] = run
    rows = []
    for (block, model), runs in grouped.items():
        published = find_model(block, model)
        params = [r.parameters for r in runs.values() if r.parameters is not None]
        speed = next((s for r in runs.values() if (s := macs_speedup(r.path / "model")) is not None), None)
        rows.append(Row(block, model, published.title if published else model_title(model), runs,
                        max(params) if params else None, speed, published))

    def order(row: Row) -> tuple:
        # the study's rows in its order, then ours by name
        rank = list(MODELS[row.block]).index(row.published.key) if row.published else 0
        return (BLOCKS.index(row.block), row.published is None, rank, row.title)

    rows.sort(key=order)
    return Tables(split, columns, rows, compare)


def _fmt(value: Optional[float]) -> str:
    return "–" if value is None else f"{as_printed(value)}"


def _fmt_cell(cell: Optional[Sequence[Optional[float]]]) -> str:
    if cell is None:
        return "–"
    return " / ".join(_fmt(v) for v in cell)


def _published_cell(model: PublishedModel, column: Column) -> Optional[tuple[float, ...]]:
    if column.published_key is None or column.published_key not in model.results:
        return None
    value = model.results[column.published_key]
    return value if isinstance(value, tuple) else (value,)


def summary_values(row: Row, tables: Tables) -> dict[str, Any]:
    """The Summary numbers of a row (published ones when comparing)."""
    scores = row.task_scores(tables.columns, tables.split)
    out: dict[str, Any] = {
        "block": row.block,
        "model": row.model,
        "title": row.title,
        "parameters": row.parameters,
        "speedup": round(row.speedup, 2) if row.speedup is not None else None,
        "score": study_score(scores) if scores else None,
        "tasks": len(scores),
    }
    if tables.compare:
        pub = row.published
        same = []
        if pub is not None:
            for column in tables.columns:
                mine = row.cell(column, tables.split)
                if mine is not None and mine[0] is not None and column.published_key:
                    theirs = pub.task_score(column.published_key)
                    if theirs is not None:
                        same.append(theirs)
        out["published_speedup"] = pub.speedup if pub else None
        out["published_score_same_tasks"] = study_score(same) if same else None
        out["published_score"] = pub.score if pub else None
    return out


def summary_markdown(tables: Tables) -> str:
    header = ["Model", "Parameters", "Speedup", "Score"]
    if tables.compare:
        header += ["Published speedup", "Published score (same tasks)", "Published score (8 tasks)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" + "---:|" * (len(header) - 1)]
    n_tasks = len(tables.columns)
    for block in BLOCKS:
        rows = [r for r in tables.rows if r.block == block]
        if not rows:
            continue
        lines.append(f"| **{BLOCK_TITLES[block]}** |" + " |" * (len(header) - 1))
        for row in rows:
            v = summary_values(row, tables)
            score = _fmt(v["score"])
            if v["score"] is not None and v["tasks"] < n_tasks:
                score += f" ({v['tasks']} of {n_tasks} tasks)"
            speed = f"{v['speedup']:.2f}x" if v["speedup"] is not None else "–"
            cells = [row.title, format_parameters(row.parameters), speed, score]
            if tables.compare:
                ps = v["published_speedup"]
                cells += [f"{ps:.2f}x" if ps is not None else "–", _fmt(v["published_score_same_tasks"]),
                          _fmt(v["published_score"])]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _column_header(column: Column) -> str:
    names = {"accuracy": "accuracy", "f1": "F1", "exact_match": "EM"}
    return f"{column.title} ({' / '.join(names[m] for m in column.metrics)})"


def results_markdown(tables: Tables) -> str:
    header = ["Model"] + [_column_header(c) for c in tables.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" + "---:|" * (len(header) - 1)]
    for block in BLOCKS:
        rows = [r for r in tables.rows if r.block == block]
        if not rows:
            continue
        lines.append(f"| **{BLOCK_TITLES[block]}** |" + " |" * (len(header) - 1))
        for row in rows:
            cells = [row.title] + [_fmt_cell(row.cell(c, tables.split)) for c in tables.columns]
            lines.append("| " + " | ".join(cells) + " |")
            if tables.compare and row.published is not None:
                pub = [_fmt_cell(_published_cell(row.published, c)) for c in tables.columns]
                lines.append("| ↳ published | " + " | ".join(pub) + " |")
    return "\n".join(lines)


def results_records(tables: Tables) -> list[dict[str, Any]]:
    """One flat record per row: `<task>` (accuracy or F1) and `<task>_em` for QA, in percent."""
    records = []
    for row in tables.rows:
        record: dict[str, Any] = {"block": row.block, "model": row.model, "title": row.title}
        for column in tables.columns:
            cell = row.cell(column, tables.split) or (None,) * len(column.metrics)
            pub = _published_cell(row.published, column) if row.published else None
            for i, metric in enumerate(column.metrics):
                name = column.task if i == 0 else f"{column.task}_em"
                record[name] = float(as_printed(cell[i])) if cell[i] is not None else None
                if tables.compare:
                    record[f"{name}_published"] = pub[i] if pub else None
        records.append(record)
    return records


def _write_csv(path: Path, records: list[dict[str, Any]]) -> None:
    if not records:
        return
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        for record in records:
            writer.writerow({k: "" if v is None else v for k, v in record.items()})


def render(tables: Tables, title: str = "") -> str:
    """Both tables as one markdown document."""
    what = {"test": "test-set scores", "validation": "validation scores"}.get(tables.split, f"{tables.split} scores")
    parts = [f"# {title}" if title else "# Results", "",
             f"Scores are {what} in percent: accuracy for classification, F1 for tagging, "
             "F1 / EM for QA. Score = mean over the tasks present (QA by F1), cut to two "
             "decimals as the study did. Speedup = MACs of BETO / MACs of the model (batch 1, "
             "sequence 512).", "",
             "## Summary", "", summary_markdown(tables), "", "## All results", "", results_markdown(tables), ""]
    return "\n".join(parts)


def write_report(tables: Tables, out: Path, title: str = "") -> dict[str, Path]:
    """tables.md, summary.csv and results.csv in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / "tables.md", "summary": out / "summary.csv", "results": out / "results.csv"}
    paths["markdown"].write_text(render(tables, title))
    _write_csv(paths["summary"], [summary_values(r, tables) for r in tables.rows])
    _write_csv(paths["results"], results_records(tables))
    return paths


def report(root: Path, out: Optional[Path] = None, split: str = "test", compare: bool = False,
           reselect: bool = False) -> tuple[Tables, dict[str, Path]]:
    """Collect, select (or read best.json), build and write the tables; returns them and the files."""
    root = Path(root)
    runs = collect_runs(root)
    if not runs:
        raise ReportError(
            f"no finished runs under {root}: a finished stage folder holds metrics.json and "
            "config.yaml (run `distill run` or `distill grid` first)"
        )
    best = None if reselect else read_selection(root, runs)
    if best is None:
        best = select_best(runs)
    tables = build_tables(best, split, compare)
    paths = write_report(tables, Path(out) if out else root / "report", title=f"Results of {root}")
    return tables, paths


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="distill report",
        description="Collect metrics.json/config.yaml from a tree of runs into the study's Summary "
        "and All results tables (markdown + CSV), best run per (block, task, model).",
    )
    p.add_argument("runs_dir", help="folder holding the runs (searched recursively), or a `distill search` folder")
    p.add_argument("--out", default=None, help="output folder (default RUNS_DIR/report)")
    p.add_argument("--split", default="test", help="split whose scores fill the tables (default test)")
    p.add_argument("--compare-published", action="store_true",
                   help="put the study's published numbers beside ours")
    p.add_argument("--reselect", action="store_true",
                   help="ignore RUNS_DIR/best.json and select the best runs again")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    from distill.study.search.outputs import is_search_folder, search_report

    if is_search_folder(args.runs_dir):  # a `distill search` folder: its trials table and best trial(s)
        print(search_report(args.runs_dir))
        return 0
    try:
        tables, paths = report(Path(args.runs_dir), args.out, args.split, args.compare_published, args.reselect)
    except ReportError as err:
        print(f"distill report: {err}", file=sys.stderr)
        return 2
    print(paths["markdown"].read_text())
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
