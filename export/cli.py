"""`export onnx RUN ...` (also `zeroship export onnx ...` and `python -m export onnx ...`)."""

from __future__ import annotations

import sys

from launcher.cli import run_cli
from launcher.errors import Problem, ZeroshipError


def main(argv: list[str] | None = None, prog: str = "export") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)

    def go() -> int:
        raise ZeroshipError(Problem(prog, "ONNX export is not implemented yet"))

    return run_cli(go)


def export_entry() -> None:
    sys.exit(main())
