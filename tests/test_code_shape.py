"""The shape DESIGN.md asks of the code: no function over 80 lines, the engine reads no argparse Namespace,
and runs.py imports neither CLI."""

from __future__ import annotations

import ast
import re

import pytest

from conftest import ROOT

MODULES = sorted(p for p in ROOT.glob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_no_function_runs_over_80_lines(path):
    tree = ast.parse(path.read_text())
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80
    ]
    assert not long, f"{path.name}: split into named steps: {', '.join(long)}"


def imported_modules(path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_the_engine_reads_no_namespace_and_runs_imports_no_cli():
    engine_source = (ROOT / "engine.py").read_text()
    assert "Namespace" not in engine_source and "argparse" not in engine_source
    assert not {"train", "inference"} & imported_modules(ROOT / "runs.py")
    assert not {"train", "inference", "runs"} & imported_modules(ROOT / "engine.py")


def test_the_readme_files_table_lists_every_module():
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Files", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `([^`]+)` \|", table, flags=re.M))
    assert {p.name for p in MODULES} <= listed, sorted({p.name for p in MODULES} - listed)
