"""One exception family for user errors: what is wrong, where, and how to fix it.

The CLI prints these without a traceback and exits 2. Anything else is a bug (exit 1).
"""

from __future__ import annotations

from dataclasses import dataclass

EXCERPT_CHARS = 40


def excerpt(text: str, limit: int = EXCERPT_CHARS) -> str:
    """A short, escaped quote of user data for an error message: at most `limit` characters of `text`
    (control characters, surrogates and quotes escaped by repr), with … when cut. Errors quote no more
    than this of a file, so pointing a recipe at a file that is not data shows little of it."""
    text = str(text)
    return repr(text[:limit]) + ("…" if len(text) > limit else "")


def text_problem(text: str) -> str:
    """What keeps the tokenizer from taking `text` ("" when nothing): a lone surrogate, which JSON's
    "\\ud800" escapes and undecodable command-line bytes (Python's surrogateescape) both produce."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        char = ord(text[exc.start])
        if 0xDC80 <= char <= 0xDCFF:  # an undecodable byte kept by surrogateescape (argv, file names)
            return f"byte 0x{char - 0xDC00:02x} at character {exc.start} is not UTF-8"
        return f"lone surrogate U+{char:04X} at character {exc.start} is not valid Unicode"
    return ""


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


class RunFailed(RuntimeError):
    """The run itself failed (its workers, every trial, a fold, its checkpoint), not its input: the run is
    marked failed with this message and `launch` exits 1 with the path of its logs."""


class ExportError(ZeroshipError):
    """The export cannot proceed."""
