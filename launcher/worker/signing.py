"""Checkpoints are signed by the ranks that write them and verified before anything unpickles them.

DeepSpeed's checkpoints are pickles (`torch.load(weights_only=False)` in `engine.load_checkpoint` and
`zero_to_fp32`), and they live on shared storage (NFS, EFS, S3) that others may be able to write. So each
rank, right after saving, writes `zeroship_signature_rank<R>.json`: an HMAC-SHA256 of every file it
wrote (keyed also by the file's path inside the checkpoint). Before a worker resumes from a checkpoint
and before the driver merges the winner, `verify_checkpoint` checks that every file in the folder is
covered by a valid HMAC; an unsigned, changed or added file is refused before any file is opened.

The key is 32 random bytes in `~/.config/zeroship/signing.key` (mode 0600; `$ZEROSHIP_KEY_FILE` moves it)
on the machine whose driver launched the run, outside run storage; workers receive it in their environment
(`ZEROSHIP_SIGNING_KEY`, set by `launcher.driver.cluster.connect_ray`), never in a file on storage.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path

from zeroship.errors import Problem, RunFailed, ZeroshipError

KEY_ENV = "ZEROSHIP_SIGNING_KEY"
SIGNATURE_PREFIX = "zeroship_signature_rank"


class CheckpointError(ZeroshipError):
    """A checkpoint failed verification; nothing in it was loaded."""


def key_file() -> Path:
    if os.environ.get("ZEROSHIP_KEY_FILE"):
        return Path(os.environ["ZEROSHIP_KEY_FILE"])
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "zeroship" / "signing.key"


def load_key() -> bytes:
    """This machine's signing key, created on first use (readable by this user only)."""
    path = key_file()
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".signing.key.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))
        try:
            os.link(tmp, path)  # atomic, and never replaces a key another launch created meanwhile
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    key = bytes.fromhex(path.read_text().strip())
    if len(key) < 32:
        raise CheckpointError(Problem(str(path), "the signing key is damaged", "delete it; a new one is made"))
    return key


def worker_key() -> bytes:
    """The key a Ray worker signs and verifies with (from its environment)."""
    text = os.environ.get(KEY_ENV, "")
    if not text:
        raise RunFailed(f"{KEY_ENV} is not set in this worker: start runs with `launch`, which passes it")
    return bytes.fromhex(text)


def _mac(key: bytes, folder: Path, rel: str) -> str:
    mac = hmac.new(key, rel.encode() + b"\0", hashlib.sha256)
    with open(folder / rel, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            mac.update(block)
    return mac.hexdigest()


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() or p.is_symlink())


def sign_checkpoint(folder: str | Path, key: bytes, rank: int) -> None:
    """Sign every file this rank wrote into its (private) checkpoint folder."""
    folder = Path(folder)
    macs = {rel: _mac(key, folder, rel) for rel in _files(folder) if not Path(rel).name.startswith(SIGNATURE_PREFIX)}
    (folder / f"{SIGNATURE_PREFIX}{rank}.json").write_text(json.dumps({"hmac_sha256": macs}))


def verify_checkpoint(folder: str | Path, key: bytes) -> None:
    """Raise CheckpointError unless every file in `folder` carries a valid signature from this key."""
    folder = Path(folder)
    signed: dict[str, set[str]] = {}  # a file every rank writes (e.g. DeepSpeed's `latest`) has several
    files = _files(folder)
    for rel in files:
        if Path(rel).parent == Path(".") and rel.startswith(SIGNATURE_PREFIX):
            try:
                macs = json.loads((folder / rel).read_text(encoding="utf-8"))["hmac_sha256"]
                if not (isinstance(macs, dict) and all(isinstance(v, str) for v in macs.values())):
                    raise TypeError
            except (OSError, ValueError, RecursionError, TypeError, KeyError):
                raise _refused(folder, f"{rel} is not a signature file zeroship wrote") from None
            for name, mac in macs.items():
                signed.setdefault(name, set()).add(mac)
    if not signed:
        raise _refused(folder, "it carries no zeroship signature (written by another tool, or before "
                               "checkpoints were signed)")
    for rel in files:
        if Path(rel).name.startswith(SIGNATURE_PREFIX) and Path(rel).parent == Path("."):
            continue
        if rel not in signed:
            raise _refused(folder, f"{rel} was not written by this run's workers")
        actual = None if (folder / rel).is_symlink() else _mac(key, folder, rel)
        if actual is None or not any(hmac.compare_digest(actual, mac) for mac in signed[rel]):
            raise _refused(folder, f"{rel} was changed after it was written (or signed with another machine's key)")
    absent = sorted(set(signed) - set(files))
    if absent:
        raise _refused(folder, f"{absent[0]} is missing")


def _refused(folder: Path, why: str) -> CheckpointError:
    return CheckpointError(Problem(
        str(folder), f"checkpoint refused before loading: {why}",
        f"zeroship unpickles only checkpoints its own workers signed with {key_file()}; if the run was "
        "launched on another machine, resume or export it there"))
