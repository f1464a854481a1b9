"""Run registry: `run-<N>` directories under a storage root, with an atomic status file.

Ids are allocated with `mkdir`, which is atomic: two launches racing for the same N see one
succeed and the other get FileExistsError and try N+1. Every write that matters goes to a temp
name first and is renamed into place, so a reader never sees half a file.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from zeroship.errors import Problem, RecipeError, RunError, excerpt
from launcher.runs.storage import NOT_PUSHED, RemoteStore, check_local_root, is_uri

RUN_ID = re.compile(r"^run-([1-9][0-9]{0,8})$", re.ASCII)  # run-7, never run-007 (a second run-7?)
RUN_LIKE = re.compile(r"^run-[0-9]+$", re.ASCII)  # what looks like a run folder, to say why it is not one
STATES = ("pending", "running", "succeeded", "failed")


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write via a temp file in the same folder and rename over the target."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _number(name: str) -> int | None:
    match = RUN_ID.match(name)
    return int(match.group(1)) if match else None


def normalize_run_id(text: str) -> str | None:
    """`run-42` or `42` → `run-42`; `latest` → None (resolved against the registry)."""
    text = str(text).strip()
    if text == "latest":
        return None
    if text.isascii() and text.isdigit():  # not "٤٢": int() would read it as 42
        text = f"run-{text}"
    if RUN_ID.match(text):
        return text
    raise RunError(
        Problem(f"run id {excerpt(text)}", "not a run id",
                "use run-<N>, <N> or latest, N without leading zeros (see `zeroship runs`)")
    )


@dataclass
class Run:
    id: str
    dir: Path
    logger: Any = field(default=None, compare=False, repr=False)  # launcher.runs.observe.RunLogger while training
    logs: Any = field(default=None, compare=False, repr=False)  # launcher.runs.run_logs.RunLogs while training
    remote: RemoteStore | None = field(default=None, compare=False, repr=False)  # storage on a URI
    stamps: dict = field(default_factory=dict, compare=False, repr=False)  # the driver's launcher.driver.startup stamps
    data_figures: Any = field(default=None, compare=False, repr=False)  # the plan's data figures (DataEstimate)
    # a sweep's data variants tokenized once for its trials (launcher.driver.sweep.tokenize_once): what Ray
    # Data tokenized, for status.json, and the variants' datasets by data key, for the k-fold refit
    shared_data: list = field(default_factory=list, compare=False, repr=False)
    sweep_datasets: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def ray_storage(self) -> str:
        """Where Ray Train keeps this run's checkpoints: the URI itself, or the run's ray/ folder."""
        return self.remote.child_uri(f"{self.id}/ray") if self.remote else str((self.dir / "ray").resolve())

    @property
    def bundle_dir(self) -> Path:
        """Where `export onnx` writes this run's bundle by default."""
        return self.dir / "onnx"

    @property
    def location(self) -> str:
        return self.remote.child_uri(self.id) if self.remote else str(self.dir)

    def push(self, *names: str) -> None:
        """Copy files or folders of the run from its local mirror to its URI (no-op on a path)."""
        if self.remote is not None:
            for name in names:
                if name not in NOT_PUSHED and (self.dir / name).exists():
                    self.remote.push(self.dir / name, f"{self.id}/{name}")

    @property
    def status_path(self) -> Path:
        return self.dir / "status.json"

    @property
    def best_dir(self) -> Path:
        return self.dir / "best"

    def status(self) -> dict:
        where = str(self.status_path)
        try:
            status = json.loads(self.status_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise RunError(Problem(where, "missing: not a zeroship run")) from None
        except (OSError, ValueError, RecursionError) as exc:  # ValueError: bad JSON, or not UTF-8
            raise RunError(Problem(where, f"corrupt status file: {str(exc)[:200]}")) from None
        problem = _status_problem(status)
        if problem:
            raise RunError(Problem(where, f"corrupt status file: {problem}",
                                   "the run cannot be used; launch it again"))
        return status

    def recorded_data(self) -> tuple[dict, list[str]]:
        """The `data` section of the run's recipe.yaml, for reading its splits again after training
        (export's checks), and a note for each path that had to be found again.

        The recorded paths are absolute. Under `ray job submit --working-dir .` they point into the job's
        copy of the checkout, which Ray deletes with the job: a split whose recorded file is gone but
        lay under the folder the launch ran in (status `cwd`) is read from the same place under this
        process's folder — the checkout the job was submitted from."""
        import yaml

        where = str(self.dir / "recipe.yaml")
        try:
            data = dict(yaml.safe_load((self.dir / "recipe.yaml").read_text(encoding="utf-8"))["data"])
        except (OSError, ValueError, TypeError, KeyError, RecursionError, yaml.YAMLError) as exc:
            raise RunError(Problem(where, f"unreadable: {excerpt(str(exc), 200)}",
                                   "the run cannot be used; launch it again")) from None
        launched_in, notes = self.status().get("cwd"), []
        for split in ("train", "validation", "test"):
            path = data.get(split)
            if not isinstance(path, str) or not launched_in or is_uri(path) or _exists(path):
                continue
            try:
                rel = Path(os.path.normpath(path)).relative_to(os.path.normpath(launched_in))  # no ".."
            except ValueError:
                continue  # outside the launch's folder: load_dataset says it is missing
            here = Path.cwd() / rel
            if _exists(str(here)):
                data[split] = str(here)
                notes.append(f"data.{split}: {excerpt(path, 120)} is gone (the launch's folder); "
                             f"reading ./{rel} instead")
        return data, notes

    def update(self, **fields: Any) -> dict:
        status = self.status()
        if "state" in fields and fields["state"] not in STATES:
            raise ValueError(f"bad state {fields['state']}")
        status.update(fields)
        status["updated"] = now()
        atomic_write_json(self.status_path, status)
        self.push("status.json")
        return status

    def write_json(self, rel: str, obj: Any) -> None:
        """Write a file of this run (a path inside its folder) atomically, and push it to the URI."""
        target = (self.dir / rel).resolve()
        if self.dir.resolve() not in target.parents:
            raise ValueError(f"{rel!r} is not inside {self.id}")
        atomic_write_json(target, obj)
        self.push(rel)

    def append_metrics(self, record: dict) -> None:
        with open(self.dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")
        self.push("metrics.jsonl")

    def metrics(self) -> list[dict]:
        path = self.dir / "metrics.jsonl"
        if not path.exists():
            return []
        records = []
        for lineno, line in enumerate(path.read_text(encoding="utf-8", errors="replace").split("\n"), start=1):
            if line.strip():
                try:
                    record = json.loads(line)
                except (ValueError, RecursionError):
                    record = None
                if not isinstance(record, dict):
                    raise RunError(Problem(f"{path}:{lineno}", "corrupt metrics record (not a JSON object)"))
                records.append(record)
        return records


def _exists(path: str) -> bool:
    """A data path (file, folder of shards or glob) that names something."""
    import glob

    try:
        return Path(path).exists() or bool(glob.glob(path))
    except ValueError:  # a NUL or a lone surrogate: names nothing
        return False


def _status_problem(status: Any) -> str:
    """What is wrong with a status file's shape ("" when nothing)."""
    if not isinstance(status, dict):
        return f"a JSON object was expected, got {type(status).__name__}"
    if status.get("state") not in STATES:
        return f"state {str(status.get('state'))[:40]!r} is not one of {', '.join(STATES)}"
    winner = status.get("winner")
    if winner is not None and not (isinstance(winner, dict) and isinstance(winner.get("metric"), str)
                                   and isinstance(winner.get("value"), (int, float, type(None)))):
        return "winner must be null or {metric, value, ...}"
    for key in ("error", "recipe", "parent", "task", "created", "cwd"):
        if status.get(key) is not None and not isinstance(status[key], str):
            return f"{key} must be text"
    return ""


class Registry:
    """The runs under one storage root: a path, or a URI (launcher.runs.storage) worked on in a mirror."""

    def __init__(self, root: str | Path = "runs"):
        self.storage = str(root)
        if not is_uri(self.storage):
            try:
                check_local_root(root, "storage root (--runs or run.storage)")
            except RecipeError as exc:
                raise RunError(exc.problems) from None
        self.remote = RemoteStore(self.storage) if is_uri(self.storage) else None
        self.root = self.remote.mirror if self.remote else Path(root)

    def ids(self) -> list[int]:
        if self.remote is not None:
            names = self.remote.names()
        elif self.root.is_dir():
            names = [p.name for p in self.root.iterdir()]
        else:
            return []
        return sorted(n for n in map(_number, names) if n is not None)

    def allocate(self, extra: dict | None = None) -> Run:
        """Create the next `run-<N>` directory atomically and write its pending status."""
        self.root.mkdir(parents=True, exist_ok=True)
        n = (self.ids() or [0])[-1] + 1
        while True:
            path = self.root / f"run-{n}"
            if self.remote is not None and self.remote.exists(f"run-{n}/status.json"):
                n += 1
                continue
            if self.remote is not None:
                shutil.rmtree(path, ignore_errors=True)  # a stale mirror of a run the URI no longer has
            try:
                path.mkdir()
                break
            except FileExistsError:
                n += 1
        run = Run(f"run-{n}", path, remote=self.remote)
        stamp = now()
        status = {"id": run.id, "state": "pending", "created": stamp, "updated": stamp,
                  "error": None, "winner": None}
        status.update(extra or {})
        atomic_write_json(run.status_path, status)
        run.push("status.json")
        return run

    def get(self, text: str) -> Run:
        """Resolve a user-supplied id (run-42, 42, latest) to an existing run."""
        run_id = normalize_run_id(text)
        if run_id is None:
            readable = [run for run in self.runs() if _readable(run)]
            if not readable:
                raise RunError(Problem(str(self.root), "no runs yet" + (" that can be read" if self.runs() else ""),
                                       "launch a recipe first"))
            run_id = readable[-1].id
        path = self.root / run_id
        if self.remote is not None and self.remote.exists(f"{run_id}/status.json"):
            shutil.rmtree(path, ignore_errors=True)  # the URI is the truth: a fresh copy, minus ray/
            self.remote.pull(run_id, path)
        if not (path / "status.json").is_file():
            known = ", ".join(run.id for run in self.runs()[-5:]) or "none"
            where = self.remote.child_uri(run_id) if self.remote else str(path)
            raise RunError(
                Problem(where, f"no run {run_id} here", f"recent runs: {known}; or pass --runs DIR")
            )
        return Run(run_id, path, remote=self.remote)

    def runs(self) -> list[Run]:
        """The runs here, in id order: `run-N` folders with a status file (which may still be damaged:
        `Run.status` says how). Anything else is not a run (see `not_runs`)."""
        out = []
        for n in self.ids():
            path = self.root / f"run-{n}"
            if self.remote is not None and self.remote.exists(f"run-{n}/status.json"):
                self.remote.pull(f"run-{n}", path, only="status.json")
            if (path / "status.json").is_file():
                out.append(Run(f"run-{n}", path, remote=self.remote))
        return out

    def not_runs(self) -> list[str]:
        """`name (why)` for each entry here that looks like a run folder but is not one (a local root)."""
        if self.remote is not None or not self.root.is_dir():
            return []
        out = []
        for entry in sorted(self.root.iterdir(), key=lambda p: p.name):
            if not RUN_LIKE.match(entry.name):
                continue
            why = ("not a run id (leading zeros)" if not RUN_ID.match(entry.name) else
                   "not a folder" if not entry.is_dir() else
                   "status.json is not a file" if (entry / "status.json").exists() and not (entry / "status.json").is_file()
                   else "no status.json" if not (entry / "status.json").is_file() else "")
            if why:
                out.append(f"{entry.name} ({why})")
        return out


def _readable(run: Run) -> bool:
    try:
        run.status()
        return True
    except RunError:
        return False


def bundle_folder(text: str, runs: str) -> Path:
    """A bundle folder given as a path, or the bundle of the run id `text` under `runs`."""
    path = Path(text)
    try:
        is_dir = path.is_dir()
    except (OSError, ValueError):  # a name too long for the file system, or with a NUL byte: no folder
        is_dir = False
    return path if is_dir else Registry(runs).get(text).bundle_dir
