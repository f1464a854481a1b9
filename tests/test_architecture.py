"""The shape of the code (issue 19): no import circle among zeroship's modules (imports inside
functions count too: they are still a dependency), no function in launcher/ over 80 lines, and
the driver's side of `launch` free of torch."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("launcher", "export")


def _modules() -> dict[str, ast.Module]:
    return {f"{pkg}.{p.stem}": ast.parse(p.read_text(encoding="utf-8"))
            for pkg in PACKAGES for p in sorted((ROOT / pkg).glob("*.py")) if p.stem != "__init__"}


def _imports(tree: ast.Module, known: set[str]) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]  # `from launcher import x`
        found |= {n for n in names if n in known}
    return found


def _circles(graph: dict[str, set[str]]) -> list[str]:
    circles: list[str] = []
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        for dep in sorted(graph[name]):
            if dep in path:
                circles.append(" → ".join(path[path.index(dep):] + [dep]))
            elif dep not in done:
                visit(dep, path + [dep])
        done.add(name)

    for name in sorted(graph):
        if name not in done:
            visit(name, [name])
    return circles


def test_the_circle_finder_finds_circles():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a → b → c → a"]
    assert _circles({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_no_import_circle():
    trees = _modules()
    graph = {name: _imports(tree, set(trees)) - {name} for name, tree in trees.items()}
    assert "launcher.worker" in graph["launcher.trainer"]  # lazy imports count: worker → train_loop
    assert "launcher.train_loop" in graph["launcher.worker"]
    circles = _circles(graph)
    assert not circles, "import circles:\n" + "\n".join(circles)
    # the layering (docs/architecture.md): everything after training may use the launcher, never the other way round
    upward = sorted(f"{a} → {b}" for a, deps in graph.items() if a.startswith("launcher.")
                    for b in deps if b.startswith("export."))
    assert not upward, upward


def test_no_function_in_launcher_over_80_lines():
    long = [f"{name}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for name, tree in _modules().items() if name.startswith("launcher.")
            for node in ast.walk(tree) if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            and node.end_lineno - node.lineno + 1 > 80]
    assert not long, "functions over 80 lines:\n" + "\n".join(long)


def test_the_driver_side_never_imports_torch_to_plan_a_run():
    """torch (2-3 s of imports) loads in the workers, and in the driver only to merge the winner."""
    code = ("import sys\nimport launcher.cli, launcher.driver, launcher.sweep, export.cli, export.serve_cli\n"
            "from launcher.cli import launch\n"
            "rc = launch(['--check', 'recipes/quickstart_ner.yaml'])\n"
            "print('RESULT', rc, sorted(m for m in ('torch', 'transformers', 'deepspeed') if m in sys.modules))\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert "RESULT 0 []" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
