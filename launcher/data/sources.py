"""Where a data split's files are: one file, a folder of shards, a glob, or a URI that pyarrow opens
(`s3://bucket/ner/`, `gs://…/part-*.jsonl`, `file:///data/train.conll`).

A folder means the regular files directly in it, in name order, without hidden files and the `_`
markers that Spark and Hadoop write next to their shards (`_SUCCESS`). A glob is expanded in name
order (`**` crosses folders); a literal path that exists wins over reading it as a glob. Every file
keeps its own name, so a bad line is reported as `shard:line`.
"""

from __future__ import annotations

import fnmatch
import glob
from dataclasses import dataclass
from pathlib import Path

from zeroship.errors import DataError, Problem
from zeroship.remote import within_deadline

GLOB_CHARS = "*?["
FIX = "data paths are files, folders of shards or globs, relative to the recipe file's folder, or URIs"


@dataclass(frozen=True)
class Source:
    name: str  # the path or URI, as errors show it
    size: int  # bytes


def is_uri(spec: str) -> bool:
    return "://" in spec


def expand(spec: str, field: str) -> list[Source]:
    """The files a split names, in a stable order; a clear error when there are none."""
    if is_uri(spec):
        files = within_deadline(lambda: _expand_uri(spec, field), spec, field)
    else:
        files = _expand_local(spec, field)
    if not files:
        raise DataError(Problem(field, f"{spec}: no data files there", FIX))
    return files


def _visible(name: str) -> bool:
    return not name.startswith((".", "_"))


def _expand_local(spec: str, field: str) -> list[Source]:
    path = Path(spec)
    if path.is_file():
        return [Source(spec, path.stat().st_size)]
    if path.is_dir():
        return [Source(str(c), c.stat().st_size) for c in sorted(path.iterdir())
                if _visible(c.name) and c.is_file()]
    if path.exists():
        raise DataError(Problem(field, f"{spec} is not a file or a folder (a FIFO or a device?)", FIX))
    if any(c in spec for c in GLOB_CHARS):
        matches = sorted(m for m in glob.glob(spec, recursive=True) if Path(m).is_file())
        if not matches:
            raise DataError(Problem(field, f"no file matches {spec}", FIX))
        return [Source(m, Path(m).stat().st_size) for m in matches]
    raise DataError(Problem(field, f"file not found: {spec}", FIX))


def _filesystem(spec: str, field: str):
    import pyarrow.fs

    try:
        return pyarrow.fs.FileSystem.from_uri(spec)
    except (pyarrow.ArrowException, ValueError, OSError) as exc:
        raise DataError(Problem(field, f"cannot open {spec}: {exc}",
                                "check the URI's scheme and the credentials for it")) from None


def _expand_uri(spec: str, field: str) -> list[Source]:
    import pyarrow.fs

    scheme = spec.split("://", 1)[0]
    fs, path = _filesystem(spec, field)
    pattern = None
    if any(c in path.rsplit("/", 1)[-1] for c in GLOB_CHARS):  # a glob in the last part: list its folder
        path, pattern = path.rsplit("/", 1)
    if any(c in path for c in GLOB_CHARS):
        raise DataError(Problem(field, f"{spec}: a URI takes a glob in its last part only",
                                "name the folder, e.g. s3://bucket/ner/part-*.jsonl"))
    try:
        info = fs.get_file_info(path)
        if pattern is None and info.type == pyarrow.fs.FileType.File:
            return [Source(spec, info.size)]
        if info.type != pyarrow.fs.FileType.Directory:
            raise DataError(Problem(field, f"not found: {spec}", FIX))
        listing = fs.get_file_info(pyarrow.fs.FileSelector(path))
    except (pyarrow.ArrowException, OSError) as exc:
        raise DataError(Problem(field, f"cannot list {spec}: {exc}", "check the URI and its credentials")) from None
    keep = [i for i in sorted(listing, key=lambda i: i.path)
            if i.type == pyarrow.fs.FileType.File and _visible(i.base_name)
            and (pattern is None or fnmatch.fnmatchcase(i.base_name, pattern))]
    if not keep and pattern is not None:
        raise DataError(Problem(field, f"no file matches {spec}", FIX))
    return [Source(_uri(scheme, spec, i.path), i.size) for i in keep]


def _uri(scheme: str, spec: str, fs_path: str) -> str:
    if scheme == "file":
        return "file://" + fs_path
    if scheme in ("s3", "gs", "gcs"):  # pyarrow's paths on these are bucket/key
        return f"{scheme}://{fs_path}"
    # other schemes carry a host (hdfs://host:port/…): keep the spec's authority
    authority = spec.split("://", 1)[1].split("/", 1)[0]
    return f"{scheme}://{authority}{fs_path if fs_path.startswith('/') else '/' + fs_path}"


def read_bytes(source: str, field: str = "", limit: int | None = None, offset: int = 0) -> bytes:
    """A file's bytes (`limit` of them from `offset` when given), local or on a URI."""
    if not is_uri(source):
        path = Path(source)
        if not path.is_file():
            raise DataError(Problem(source, "file not found" if not path.exists() else "not a file",
                                    "check the data paths in the recipe (relative to the recipe file)"))
        with open(path, "rb") as fh:
            fh.seek(offset)
            return fh.read(-1 if limit is None else limit)
    import pyarrow

    def open_file():
        fs, path = _filesystem(source, field or source)
        try:  # a random-access file where a range is asked for (object stores answer ranged GETs)
            return fs.open_input_file(path) if offset else fs.open_input_stream(path)
        except (pyarrow.ArrowException, OSError) as exc:
            raise DataError(Problem(source, f"cannot read: {exc}", "check the URI and its credentials")) from None

    # only the first contact is bounded: reading a large shard from a store that answers may take long
    stream = within_deadline(open_file, source, field or source)
    try:
        with stream as fh:
            if offset:
                fh.seek(offset)
            return fh.read(limit)
    except (pyarrow.ArrowException, OSError) as exc:
        raise DataError(Problem(source, f"cannot read: {exc}", "check the URI and its credentials")) from None


def describe(files: list[Source]) -> str:
    """`3 MB` for one file, `4 files, 12 MB` for shards."""
    size = _size(sum(f.size for f in files))
    return size if len(files) == 1 else f"{len(files)} files, {size}"


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"
