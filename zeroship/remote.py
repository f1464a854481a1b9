"""Bounded looks at remote stores: a URI that gives no answer fails in stated time instead of hanging
(used by the data sources and the run store)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import TypeVar

from zeroship.errors import DataError, Problem, ZeroshipError

T = TypeVar("T")


def remote_timeout_s() -> float:
    """How long one look at a remote URI may take (ZEROSHIP_REMOTE_TIMEOUT_S, default 30 s)."""
    try:
        value = float(os.environ.get("ZEROSHIP_REMOTE_TIMEOUT_S", "30"))
    except ValueError:
        value = 30.0
    return value if 0 < value < 86_400 else 30.0


def within_deadline(fn: Callable[[], T], spec: str, field: str, error: type[ZeroshipError] = DataError) -> T:
    """fn() for a URI, or a DataError when the store gives no answer in `remote_timeout_s()`: without a
    network pyarrow's GCS client retries for 15 minutes, and S3's or HDFS's can hang on a dead host. The
    call is left on a daemon thread, which does not keep the process alive."""
    seconds = remote_timeout_s()
    box: list = []

    def run() -> None:
        try:
            box.append((True, fn()))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            box.append((False, exc))

    thread = threading.Thread(target=run, daemon=True, name=f"zeroship-uri {spec[:40]}")
    thread.start()
    thread.join(seconds)
    if not box:
        raise error(Problem(field, f"{spec}: no answer from {spec.split('://', 1)[0]}:// in {seconds:.0f} s",
                                "check the network and credentials for it (ZEROSHIP_REMOTE_TIMEOUT_S sets "
                                "the wait)"))
    ok, value = box[0]
    if not ok:
        raise value
    return value
