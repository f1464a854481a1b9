"""The one write policy for files a command writes where the user points it (`zeroship evaluate --json`).

- Never over a file zeroship did not write for that purpose: an existing file is replaced only when it is
  a JSON object whose `written_by` names the same command (an earlier result of it), or with `--force`.
- Never inside a run folder: what is in `runs/run-N/` is written by the registry (launcher.runs.registry) alone,
  whatever the flags (a user's `--json runs/run-3/status.json` would make the run unusable).
- Atomically: a temp file in the same folder, renamed over the target (launcher.runs.registry.atomic_write).
- Checked before the command's work, so a refusal costs nothing.

Files inside a run (status, metrics, best/, the bundle, bench.json) go through `Run` methods; bundles
written elsewhere follow export.onnx.check_out (an empty folder or an earlier bundle only).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from zeroship.errors import Problem, ZeroshipError
from launcher.runs.registry import RUN_ID, atomic_write_json

MARK = "written_by"


class OutputError(ZeroshipError):
    """An output file cannot be written there."""


def check_output(path: Path, purpose: str, flag: str, force: bool = False) -> None:
    """Refuse `path` for `purpose`'s output (an OutputError naming `flag`) unless the policy allows it."""
    where = f"{flag} {path}"
    fix = "give a new file path in a writable folder outside the runs folder"
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise OutputError(Problem(where, "is a folder", fix))
    if not parent.is_dir():
        raise OutputError(Problem(where, f"{parent} is not a folder", fix))
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(Problem(where, f"{parent} is not writable", fix))
    run = run_folder_of(path)
    if run is not None:
        raise OutputError(Problem(where, f"is inside the run folder {run}, which only zeroship's run registry "
                                  "writes", fix))
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise OutputError(Problem(where, "exists and is not a regular file", fix))
    if path.exists() and not force and written_by(path) != purpose:
        raise OutputError(Problem(where, f"exists and is not an earlier `{purpose}` result",
                                  f"{fix}, or add --force to replace it"))


def write_output(path: Path, obj: dict[str, Any], purpose: str) -> None:
    """Write `obj` as JSON, marked as `purpose`'s, atomically (after check_output)."""
    atomic_write_json(path, {MARK: purpose, **obj})


def written_by(path: Path) -> str | None:
    """The command that wrote the JSON file at `path` (its `written_by`), or None."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(1 << 22)
        value = json.loads(head).get(MARK)
    except (OSError, ValueError, RecursionError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def run_folder_of(path: Path) -> Path | None:
    """The run folder (`run-N` holding a status.json) that `path` lies in, or None."""
    resolved = path.resolve()
    for folder in resolved.parents:
        if RUN_ID.match(folder.name) and (folder / "status.json").exists():
            return folder
    return None
