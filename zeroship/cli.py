"""The command-line plumbing every zeroship command shares: the consoles, exit codes (0 ok, 2 user
error, 1 a bug with its traceback, 130 interrupted), argparse with zeroship's error format, bounded
numbers, and the environment a CLI process sets before Ray loads."""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import Callable

from rich.console import Console
from rich.markup import escape

from zeroship.errors import ZeroshipError

console = Console(stderr=True)
out = Console()


def run_cli(fn: Callable[[], int | None]) -> int:
    """Run a command: user errors → message + exit 2, bugs → traceback + exit 1."""
    try:
        return fn() or 0
    except ZeroshipError as exc:
        console.print(f"[bold red]error:[/] {escape(exc.title)}", highlight=False)
        for problem in exc.problems:
            console.print(f"  [red]-[/] {escape(str(problem))}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        return 130
    except OSError as exc:
        if exc.errno != errno.ENAMETOOLONG:  # only a path the user typed can be too long: theirs to fix
            raise
        name = str(exc.filename or "")
        console.print(f"[bold red]error:[/] a path is longer than the file system allows: "
                      f"{escape(name[:60])}{'…' if len(name) > 60 else ''} ({len(name)} characters; "
                      "fix: give a shorter path)", highlight=False, soft_wrap=True)
        return 2


def bounded(kind: type, low: float, high: float):
    """An argparse type: an int or a finite float within [low, high] (nan, inf and 10**5000 refused)."""
    def parse(text: str):
        try:
            value = kind(text)
        except (ValueError, OverflowError):
            raise argparse.ArgumentTypeError(
                f"{text[:40]!r} is not {'an integer' if kind is int else 'a number'}"
            ) from None
        if not low <= value <= high:  # also false for nan
            raise argparse.ArgumentTypeError(f"{text[:40]} is out of range: give {low:g} to {high:g}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse exits 2 already; keep our format
        self.print_usage(sys.stderr)
        console.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
        raise SystemExit(2)


# ------------------------------------------------------------------ launch


def process_defaults() -> None:
    """Environment for a CLI process, set before anything imports Ray (which reads it at import)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not os.environ.get("RAY_ADDRESS"):
        # The private local Ray binds loopback only; without this its gRPC servers listen on every
        # interface. Not when joining a cluster: other nodes must reach this driver.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
