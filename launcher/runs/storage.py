"""Run storage on a URI (`s3://bucket/runs`, `gs://bucket/runs`, `file:///mnt/x/runs`) through pyarrow.

A run on a URI is worked on in a local mirror (`$ZEROSHIP_CACHE`, default `~/.cache/zeroship/storage/
<hash of the URI>/run-N`): the driver writes status, metrics, `best/`, TensorBoard files there as
it does on a local path, and pushes each to the URI when it changes. Ray Train writes its checkpoints
straight to `<URI>/run-N/ray`. Reading a run (`export`, `runs show`, `--resume`, `init_from`) pulls
it from the URI into the mirror first (everything but `ray/`).

What makes a run complete is the same as on disk: `status.json` says `succeeded` only after `best/`
has been pushed. Object stores have no atomic "create if absent", so two launches racing for the same
new id on one URI could both take it; the registry checks the id is free just before writing.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from zeroship.errors import Problem, RecipeError

# schemes pyarrow's FileSystem.from_uri understands (checked without touching the network)
SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss", "file")
NOT_PUSHED = {"ray"}  # Ray Train writes these to the URI itself


def is_uri(storage: str | os.PathLike) -> bool:
    return "://" in str(storage)


def check_storage(storage: str) -> None:
    if not is_uri(storage):
        check_local_root(storage, "run.storage")
        return
    scheme = str(storage).split("://", 1)[0].lower()
    if scheme not in SCHEMES:
        raise RecipeError(Problem("run.storage", f"unknown storage scheme {scheme}:// in {storage!r}",
                                  "use a path (local or an NFS mount) or one of "
                                  + ", ".join(f"{s}://" for s in SCHEMES)))
    if scheme == "file" and not str(storage).startswith("file:///"):
        raise RecipeError(Problem("run.storage", f"{storage!r}: a file:// URI needs an absolute path",
                                  "write file:///abs/path"))


def check_local_root(root: str | os.PathLike, field: str) -> None:
    """A local storage root is a folder, or a path where one can be made (not a file, a FIFO, /dev/null)."""
    path = Path(root)
    for parent in (path, *path.parents):
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                what = "is not a folder" if parent == path else f"lies under {parent}, which is not a folder"
                raise RecipeError(Problem(field, f"{str(root)!r} {what}",
                                          "give a folder for runs (it is created when missing)"))
            return


def cache_root() -> Path:
    return Path(os.environ.get("ZEROSHIP_CACHE") or Path.home() / ".cache" / "zeroship") / "storage"


class RemoteStore:
    """A storage root on a URI, with its local mirror."""

    def __init__(self, uri: str):
        check_storage(uri)
        self.uri = uri.rstrip("/")
        self.mirror = cache_root() / hashlib.sha256(self.uri.encode()).hexdigest()[:16]
        self._fs = None
        self._base = ""

    @property
    def fs(self):
        if self._fs is None:
            import pyarrow.fs

            from zeroship.errors import RunError
            from zeroship.remote import within_deadline

            fs, base = pyarrow.fs.FileSystem.from_uri(self.uri)
            # the first look is bounded: an unreachable store is an error in seconds, not a hang
            within_deadline(lambda: fs.get_file_info(base), self.uri, "run storage", RunError)
            self._fs, self._base = fs, base.rstrip("/")
        return self._fs

    def path(self, rel: str) -> str:
        self.fs  # noqa: B018  (resolves _base)
        return f"{self._base}/{rel}" if rel else self._base

    def child_uri(self, rel: str) -> str:
        return f"{self.uri}/{rel}"

    # ---------------------------------------------------------------- listing
    def names(self) -> list[str]:
        import pyarrow.fs

        infos = self.fs.get_file_info(pyarrow.fs.FileSelector(self.path(""), allow_not_found=True))
        return [Path(i.path).name for i in infos if i.type == pyarrow.fs.FileType.Directory]

    def exists(self, rel: str) -> bool:
        import pyarrow.fs

        return self.fs.get_file_info(self.path(rel)).type != pyarrow.fs.FileType.NotFound

    # ---------------------------------------------------------------- transfer
    def push(self, local: Path, rel: str) -> None:
        """Upload a file or a folder (recursively, except Ray's own) from the mirror to the URI."""
        import pyarrow.fs

        if local.is_dir():
            # the manifest last: a reader that finds it finds every file it lists
            for file in sorted(local.rglob("*"), key=lambda f: (f.name == "manifest.json", str(f))):
                parts = file.relative_to(local).parts
                if file.is_file() and not (parts and parts[0] in NOT_PUSHED) and not file.name.endswith(".tmp"):
                    self.push(file, f"{rel}/{'/'.join(parts)}")
            return
        self.fs.create_dir(self.path(rel).rsplit("/", 1)[0], recursive=True)
        pyarrow.fs.copy_files(str(local.resolve()), self.path(rel), source_filesystem=pyarrow.fs.LocalFileSystem(),
                              destination_filesystem=self.fs)

    def pull(self, rel: str, local: Path, only: str | None = None) -> None:
        """Download `rel` (a run folder, except `ray/`; or just the file `only` in it) into `local`."""
        import pyarrow.fs

        local.mkdir(parents=True, exist_ok=True)
        if only is not None:
            with self.fs.open_input_stream(self.path(f"{rel}/{only}")) as src:
                data = src.read()
            tmp = local / f".{only}.part"
            tmp.write_bytes(data)
            tmp.replace(local / only)
            return
        selector = pyarrow.fs.FileSelector(self.path(rel), recursive=True, allow_not_found=True)
        base = self.path(rel)
        for info in self.fs.get_file_info(selector):
            inner = info.path[len(base):].lstrip("/")
            if info.type != pyarrow.fs.FileType.File or inner.split("/", 1)[0] in NOT_PUSHED:
                continue
            target = local / inner
            target.parent.mkdir(parents=True, exist_ok=True)
            with self.fs.open_input_stream(info.path) as src:
                data = src.read()
            tmp = target.with_name(f".{target.name}.part")
            tmp.write_bytes(data)
            tmp.replace(target)
