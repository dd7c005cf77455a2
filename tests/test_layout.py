"""The layout stays as docs/architecture.md describes it: packages in layers that import only
downward, no import circle anywhere in distill/ (imports inside functions count too), no module
imports the training loop for a helper, and no module over 600 lines."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "distill"


def import_graph() -> dict[str, set[str]]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import circle, as a list of modules, or [] (depth-first search)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return []


def test_no_import_circle_in_the_package():
    cycle = find_cycle(import_graph())
    assert not cycle, "import circle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []


def test_only_the_cli_and_the_study_tooling_import_the_loop():
    importers = sorted(m for m, deps in import_graph().items() if "distill.loop.train" in deps)
    assert all(m == "distill.cli" or m.startswith("distill.study") for m in importers), importers


# From the bottom up: a module may import its own package and the layers below it, never above.
LAYERS = (
    ("distill", "distill.errors", "distill.files", "distill.latency", "distill.launch"),  # shared leaves
    ("distill.config",),  # the recipe's schema, its checks, the search grammar
    ("distill.models",),  # loading, the student catalog, cutting and trimming
    ("distill.data",),  # reading, formats, labels, features, sampling, transfer sets, augmentation
    ("distill.tasks",),  # the three task families: features, targets, predictions, metrics
    ("distill.objective",),  # loss terms, intermediate terms, capture
    ("distill.teachers",),  # teacher callables, the cache, ensembles
    ("distill.loop",),  # plan, setup, train, evaluate, checkpoints, stage folders
    ("distill.ship",),  # export, ONNX, card, Hub
    ("distill.bench",),  # speed of models
    ("distill.study",),  # grid, search, report, the closing summary
    ("distill.cli", "distill.__main__"),
)


def layer_of(module: str) -> int:
    """The layer a module belongs to (its longest matching prefix); -1 when none claims it."""
    best, rank = -1, -1
    for i, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > best:
                best, rank = len(name), i
    return rank


def test_every_module_has_a_layer():
    unplaced = sorted(m for m in import_graph() if layer_of(m) < 0 or (layer_of(m) == 0 and m.count(".") > 1))
    assert not unplaced, f"modules in no layer of LAYERS: {unplaced}"


def test_no_import_points_up_a_layer():
    up = sorted(
        f"{m} ({LAYERS[layer_of(m)][0]}) -> {d} ({LAYERS[layer_of(d)][0]})"
        for m, deps in import_graph().items() for d in deps if layer_of(d) > layer_of(m)
    )
    assert not up, "imports from a lower layer to a higher one:\n" + "\n".join(up)


def test_the_layer_check_finds_an_upward_import():
    assert layer_of("distill.data.features") < layer_of("distill.tasks.base")
    assert layer_of("distill.loop.plan") > layer_of("distill.config.recipe") > layer_of("distill.errors")
    assert layer_of("distill.elsewhere") == 0 and layer_of("somewhere.else") == -1


def test_the_package_root_holds_only_entry_points_and_shared_leaves():
    top = sorted(p.stem for p in PACKAGE.glob("*.py"))
    assert top == ["__init__", "__main__", "cli", "errors", "files", "latency", "launch"], top


def test_no_module_over_600_lines():
    long = sorted(
        (n, str(p.relative_to(PACKAGE.parent))) for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 600
    )
    assert not long, f"modules over 600 lines: {long}"
