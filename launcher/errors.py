"""One exception family for user errors: what is wrong, where, and how to fix it.

The CLI prints these without a traceback and exits 2. Anything else is a bug (exit 1).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Problem:
    """One thing wrong with the user's input."""

    where: str  # "recipe.yaml:12 train.lr" or "data/train.conll:40"
    what: str
    fix: str = ""

    def __str__(self) -> str:
        text = f"{self.where}: {self.what}" if self.where else self.what
        return f"{text} (fix: {self.fix})" if self.fix else text


class ZeroshipError(Exception):
    """A user error; carries one or more problems."""

    def __init__(self, problems: list[Problem] | Problem | str, title: str = ""):
        if isinstance(problems, str):
            problems = [Problem("", problems)]
        elif isinstance(problems, Problem):
            problems = [problems]
        self.problems = problems
        self.title = title or type(self).__doc__.strip().splitlines()[0]
        super().__init__(self.render())

    def __reduce__(self):  # pickled across Ray processes with its problems, not as one string
        return type(self), (self.problems, self.title)

    def render(self) -> str:
        lines = [self.title]
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


class RecipeError(ZeroshipError):
    """The recipe is invalid."""


class DataError(ZeroshipError):
    """A data file is invalid."""


class RunError(ZeroshipError):
    """The run id or run directory is invalid."""


class ExportError(ZeroshipError):
    """The export cannot proceed."""
