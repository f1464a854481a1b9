"""The shape of the code: no import circle among zeroship's modules (imports inside functions count
too: they are still a dependency), the layers of docs/architecture.md (which package may import which),
no function over 80 lines, and the driver's side of `launch` free of torch."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("zeroship", "launcher", "export")


def _modules() -> dict[str, ast.Module]:
    """Every module of the three packages, sub-packages included, by dotted name."""
    found = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                assert not [
                    n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Import | ast.ImportFrom)
                ], f"{path}: an __init__.py imports nothing (importing a package loads no more than its module)"
                continue
            found[".".join(parts)] = ast.parse(path.read_text(encoding="utf-8"))
    return found


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


def _all_imports(tree: ast.Module) -> set[str]:
    """Every module a tree imports, zeroship's or not (top-level and inside functions)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return found


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


# (what, may not import) — docs/architecture.md draws the same layers
LAYERS = [
    (("zeroship",), ("launcher", "export", "torch", "transformers", "deepspeed")),
    (("export.runtime", "export.serve.service", "export.serve.local", "export.serve.ray_serve"),
     ("launcher", "torch", "transformers", "deepspeed")),
    (("launcher.recipe", "launcher.data"), ("launcher.worker", "launcher.driver", "launcher.nn", "launcher.eval",
                                            "launcher.runs", "launcher.cli")),
    (("launcher.nn", "launcher.eval"), ("launcher.worker", "launcher.driver", "launcher.runs", "launcher.cli")),
    (("launcher.worker",), ("launcher.driver", "launcher.runs", "launcher.cli")),
    (("launcher.runs",), ("launcher.worker", "launcher.driver", "launcher.nn", "launcher.cli")),
    (("launcher",), ("export",)),
]


def _layer_breaks(trees: dict[str, ast.Module]) -> list[str]:
    return sorted(f"{name} imports {dep}" for name, tree in trees.items() for what, banned in LAYERS
                  if _within(name, what) for dep in _all_imports(tree) if _within(dep, banned))


def test_the_layer_check_sees_an_upward_import():
    tree = ast.parse("def f():\n    from launcher.driver.plan import Plan\n")
    assert _layer_breaks({"launcher.data.ingest": tree}) == ["launcher.data.ingest imports launcher.driver.plan",
                                                           "launcher.data.ingest imports launcher.driver.plan.Plan"]
    assert _layer_breaks({"export.runtime": ast.parse("import torch")}) == ["export.runtime imports torch"]
    assert _layer_breaks({"launcher.driver.plan": tree}) == []


def test_each_package_imports_only_the_layers_below_it():
    breaks = _layer_breaks(_modules())
    assert not breaks, "imports against docs/architecture.md's layers:\n" + "\n".join(breaks)


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
    assert "launcher.worker.entry" in graph["launcher.driver.trainer"]  # lazy imports count: worker → train_loop
    assert "launcher.worker.train_loop" in graph["launcher.worker.entry"]
    circles = _circles(graph)
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_no_import_circle_among_the_benchmarks():
    trees = {f"benchmarks.{p.stem}": ast.parse(p.read_text(encoding="utf-8"))
             for p in sorted((ROOT / "benchmarks").glob("*.py")) if p.stem != "__init__"}
    graph = {name: _imports(tree, set(trees)) - {name} for name, tree in trees.items()}
    assert "benchmarks.train_overhead" in graph["benchmarks.profile_step"]
    circles = _circles(graph)
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_no_function_over_80_lines():
    long = [f"{name}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for name, tree in _modules().items()
            for node in ast.walk(tree) if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            and node.end_lineno - node.lineno + 1 > 80]
    assert not long, "functions over 80 lines:\n" + "\n".join(long)


def test_the_driver_side_never_imports_torch_to_plan_a_run():
    """torch (2-3 s of imports) loads in the workers, and in the driver only to merge the winner."""
    code = (
        "import sys\nimport launcher.cli, launcher.driver.launch, launcher.driver.sweep, export.cli, export.serve.cli\n"
        "from launcher.cli import launch\n"
        "rc = launch(['--check', 'recipes/quickstart_ner.yaml'])\n"
        "print('RESULT', rc, sorted(m for m in ('torch', 'transformers', 'deepspeed') if m in sys.modules))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert "RESULT 0 []" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]


def test_ruff_is_clean():
    """`make lint` in the suite, so CI holds the style rules too (line length 120, imports sorted, pyflakes)."""
    ruff = Path(sys.executable).parent / "ruff"
    out = subprocess.run([str(ruff), "check", "--quiet", "zeroship", "launcher", "export", "tests", "benchmarks"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-1000:]
