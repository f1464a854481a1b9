"""`zeroship serve` under load: loopback HTTP clients for a bounded time at 1, 8 and 32 concurrent
clients, each sending one CoNLL-2003 test sentence per request (real lengths), against the in-process
`Predictor` on the same sentences. Prints p50/p99 latency per request, sentences/s and the batching
factor (mean texts per model call, from the server's /stats), and appends them to RESULTS.md.

    make quickstart                                   # a trained, exported run
    .venv/bin/python benchmarks/serve_http.py [--run latest] [--runs runs] [--seconds 20]

One replica with --threads-per-replica threads (default 2: this machine's cores); the clients share
the same cores, so the figures are what one small box serves, not the server's ceiling.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CLIENTS = (1, 8, 32)


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return json.loads(resp.read())


def post(url: str, texts: list[str]) -> None:
    req = urllib.request.Request(url, data=json.dumps({"texts": texts}).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        resp.read()


def start_server(bundle: Path, threads: int, port: int, ray_dir: str) -> subprocess.Popen:
    zeroship = Path(sys.executable).parent / "zeroship"
    proc = subprocess.Popen([str(zeroship), "serve", str(bundle), "--port", str(port),
                             "--threads-per-replica", str(threads)], cwd=ROOT, start_new_session=True,
                            env={**os.environ, "ZEROSHIP_RAY_TMPDIR": ray_dir},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit("zeroship serve exited before it was ready")
        try:
            if get(f"http://127.0.0.1:{port}/readyz").get("status") == "ready":
                return proc
        except OSError:
            pass
        time.sleep(1)
    raise SystemExit("zeroship serve not ready in 240 s")


def load(url: str, texts: list[str], clients: int, seconds: float) -> dict:
    """`clients` threads, each sending one sentence per request back to back for `seconds`."""
    latencies: list[float] = []
    lock = threading.Lock()
    stop = time.time() + seconds

    def client(k: int) -> None:
        i, mine = k, []
        while time.time() < stop:
            start = time.perf_counter()
            post(url, [texts[i % len(texts)]])
            mine.append(time.perf_counter() - start)
            i += clients
        with lock:
            latencies.extend(mine)

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "per_s": len(latencies) / wall, "requests": len(latencies)}


def in_process(bundle: Path, texts: list[str], threads: int, seconds: float) -> dict:
    """The Predictor called directly: one sentence per call (b=1), and batches of 32."""
    from export.runtime import Predictor

    pred = Predictor.load(bundle, threads=threads)
    pred.predict(texts[:32])
    single, stop, i = [], time.time() + seconds / 2, 0
    while time.time() < stop:
        start = time.perf_counter()
        pred.predict(texts[i % len(texts)])
        single.append((time.perf_counter() - start) * 1000)
        i += 1
    batches, stop = [], time.time() + seconds / 2
    while time.time() < stop:
        group = [texts[(i + j) % len(texts)] for j in range(32)]
        start = time.perf_counter()
        pred.predict(group, batch_size=32)
        batches.append(time.perf_counter() - start)
        i += 32
    return {"variant": pred.variant, "p50_ms": float(np.percentile(single, 50)),
            "p99_ms": float(np.percentile(single, 99)), "b32_per_s": 32 / statistics.median(batches)}


def main() -> None:
    from benchmarks.conll import sentences
    from benchmarks.results import append_results
    from export.onnx import resolve_run

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default="latest")
    ap.add_argument("--runs", default="runs")
    ap.add_argument("--threads", type=int, default=2, help="threads of the replica and of the in-process Predictor")
    ap.add_argument("--seconds", type=float, default=20, help="load time per client count")
    ap.add_argument("--sentences", type=int, default=512)
    args = ap.parse_args()
    run = resolve_run(args.run, args.runs)
    bundle = run.dir / "onnx"
    if not (bundle / "manifest.json").is_file():
        raise SystemExit(f"{bundle}: not exported; run `zeroship export onnx {run.id} --runs {args.runs}` first")
    texts = [" ".join(s) for s in random.Random(0).sample(sentences("test.txt"), args.sentences)]
    local = in_process(bundle, texts, args.threads, args.seconds)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="zs-", dir="/tmp") as ray_dir:
        proc = start_server(bundle, args.threads, port, ray_dir)
        try:
            rows = {}
            for clients in CLIENTS:
                before = get(f"{url}/stats")
                rows[clients] = load(f"{url}/predict", texts, clients, args.seconds)
                after = get(f"{url}/stats")
                calls = after["model_calls"] - before["model_calls"]
                rows[clients]["batching"] = (after["texts"] - before["texts"]) / max(1, calls)
                print(f"{clients} clients: {rows[clients]}", flush=True)
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=120)
    lines = ["| engine | clients | p50 ms | p99 ms | sentences/s | texts per model call |", "|---|---|---|---|---|---|",
             f"| Predictor in process ({local['variant']}), b=1 | 1 | {local['p50_ms']:.2f} | {local['p99_ms']:.2f} "
             f"| {1000 / local['p50_ms']:.0f} | 1 |",
             f"| Predictor in process ({local['variant']}), b=32 | - | - | - | {local['b32_per_s']:.0f} | 32 |"]
    lines += [f"| zeroship serve (HTTP, 1 replica) | {c} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['per_s']:.0f} "
              f"| {r['batching']:.2f} |" for c, r in rows.items()]
    table = "\n".join(lines) + (f"\n\nModel: {run.id} bundle ({local['variant']}), {args.threads} threads; one CoNLL-2003"
                                f" test sentence per request, {args.seconds:g} s per row, clients on the same cores.")
    print(table)
    append_results("serve_http: zeroship serve under load", " ".join(["benchmarks/serve_http.py", *sys.argv[1:]]), table)


if __name__ == "__main__":
    main()
