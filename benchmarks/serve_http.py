"""`zeroship serve` under load, side by side with the server a user would write by hand.

The servers, on the same bundle, one after the other, each driven by `wrk` (a compiled load generator,
Debian's `wrk` package, so the client is not the bottleneck) with 1, 8 and 32 connections, each request
one CoNLL-2003 test sentence (real lengths, rotating through `--sentences` of them):

- hand-written: `benchmarks/handwritten_server.py`, FastAPI + uvicorn around `Predictor`, one process,
  no batching (what the README's Python snippet plus a route gives);
- zeroship serve: the one-box runner (this process's uvicorn, export.serve.local's batcher);
- zeroship serve --ray-serve: the same app on Ray Serve, 1 replica, which answers on the port itself
  (Serve's direct ingress; again with -v: Serve's per-request log on, to measure what logging costs);
- zeroship serve --autoscale 1:1: 1 replica behind Serve's proxy and router, the path of several
  replicas and of a cluster (where the time goes without direct ingress).

Also the Predictor in process at batch 32 (the ceiling on this box), and each zeroship row's texts per
model call (from /stats). Appends the table and the ratios the targets are stated in to RESULTS.md.

    make quickstart && apt-get install wrk
    .venv/bin/python benchmarks/serve_http.py [--run latest] [--runs runs] [--seconds 15] [--threads 2]

With `--device cuda` (onnxruntime-gpu, benchmarks/gpu.sh) every server and the ceiling run on onnxruntime's
CUDA provider: the variant each picks is the same (`auto`: fp16 when the bundle has one).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CLIENTS = (1, 8, 32)
BIN = Path(sys.executable).parent

WRK_SCRIPT = """
local bodies = {}
for line in io.lines(os.getenv("ZS_BODIES")) do bodies[#bodies + 1] = line end
local i = 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
request = function()
  i = i % #bodies + 1
  return wrk.format(nil, "/predict", nil, bodies[i])
end
done = function(summary, latency, requests)
  io.write(string.format("ZS non2xx %d\\n", summary.errors.status))
end
"""


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return json.loads(resp.read())


def wait_ready(proc: subprocess.Popen, url: str, seconds: int = 240) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited before it was ready: {proc.args}")
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"not ready in {seconds} s: {proc.args}")


def wrk(url: str, clients: int, seconds: float, script: Path | None, bodies: Path) -> dict:
    """wrk's figures; with `script` each request POSTs the next sentence, without it a plain GET of `url`."""
    res = subprocess.run(
        [
            "wrk",
            "-t",
            str(min(clients, 2)),
            "-c",
            str(clients),
            "-d",
            f"{seconds:g}s",
            "--latency",
            *(["-s", str(script)] if script else []),
            url,
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "ZS_BODIES": str(bodies)},
        timeout=seconds + 120,
    )
    if res.returncode != 0:
        raise SystemExit(f"wrk failed: {res.stderr[-500:]}")
    text = res.stdout

    def ms(label: str) -> float:
        match = re.search(rf"^\s*{label}\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
        value, unit = float(match.group(1)), match.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    found = re.search(r"ZS non2xx (\d+)", text) or re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    non2xx = int(found.group(1)) if found else 0
    return {"per_s": float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1)), "p50_ms": ms("50%"),
            "p99_ms": ms("99%"), "non2xx": non2xx}


def in_process_b32(bundle: Path, texts: list[str], threads: int, seconds: float, device: str) -> float:
    from export.runtime import Predictor

    pred = Predictor.load(bundle, threads=threads, device=device)
    pred.predict(texts[:32])
    times, i, stop = [], 0, time.time() + seconds
    while time.time() < stop:
        group = [texts[(i + j) % len(texts)] for j in range(32)]
        start = time.perf_counter()
        pred.predict(group, batch_size=32)
        times.append(time.perf_counter() - start)
        i += 32
    return 32 / statistics.median(times)


def servers(bundle: Path, threads: int, port: int, device: str = "cpu") -> dict[str, list[str]]:
    zeroship = str(BIN / "zeroship")
    common = ["--port", str(port), "--threads-per-replica", str(threads), "--device", device]
    return {"hand-written FastAPI + uvicorn": [sys.executable, str(ROOT / "benchmarks" / "handwritten_server.py"),
                                               str(bundle), str(port), str(threads), device],
            "zeroship serve (one box)": [zeroship, "serve", str(bundle), *common],
            "zeroship serve --ray-serve (1 replica, direct ingress)": [zeroship, "serve", str(bundle), "--ray-serve",
                                                                      *common],
            "zeroship serve --ray-serve -v (Serve's request log on)": [zeroship, "serve", str(bundle), "--ray-serve",
                                                                      "-v", *common],
            # --autoscale keeps requests on Serve's proxy and router (as several replicas do): where the
            # time went before direct ingress
            "zeroship serve --autoscale 1:1 (1 replica behind Serve's proxy)": [zeroship, "serve", str(bundle),
                                                                               "--autoscale", "1:1", *common]}


def measure(name: str, cmd: list[str], url: str, seconds: float, script: Path, bodies: Path) -> dict:
    with tempfile.TemporaryDirectory(prefix="zs-", dir="/tmp") as ray_dir:
        proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env={**os.environ, "ZEROSHIP_RAY_TMPDIR": ray_dir})
        try:
            wait_ready(proc, url)
            wrk(f"{url}/predict", 4, 3, script, bodies)  # warm-up
            rows = {}
            for clients in CLIENTS:
                before = get(f"{url}/stats") if "zeroship" in name else None
                rows[clients] = wrk(url, clients, seconds, script, bodies)
                if before is not None:
                    after = get(f"{url}/stats")
                    rows[clients]["per_call"] = ((after["texts"] - before["texts"])
                                                 / max(1, after["model_calls"] - before["model_calls"]))
                print(f"{name}, {clients} clients: {rows[clients]}", flush=True)
            # the fixed cost of a request through this server, without the model: GET /healthz
            rows["healthz"] = wrk(f"{url}/healthz", 32, seconds / 3, None, bodies)
            print(f"{name}, GET /healthz at 32 clients: {rows['healthz']}", flush=True)
            return rows
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def main() -> None:
    from benchmarks.conll import sentences
    from benchmarks.results import append_results
    from export.onnx import resolve_run

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default="latest")
    ap.add_argument("--runs", default="runs")
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime threads of every server and of the ceiling")
    ap.add_argument("--seconds", type=float, default=15, help="load time per row")
    ap.add_argument("--sentences", type=int, default=512)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="onnxruntime's provider, every row")
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found: apt-get install wrk")
    run = resolve_run(args.run, args.runs)
    bundle = run.dir / "onnx"
    if not (bundle / "manifest.json").is_file():
        raise SystemExit(f"{bundle}: not exported; run `zeroship export onnx {run.id} --runs {args.runs}` first")
    texts = [" ".join(s) for s in random.Random(0).sample(sentences("test.txt"), args.sentences)]
    ceiling = in_process_b32(bundle, texts, args.threads, 10, args.device)
    with tempfile.TemporaryDirectory(prefix="zs-bench-") as tmp:
        bodies, script = Path(tmp) / "bodies.jsonl", Path(tmp) / "post.lua"
        bodies.write_text("".join(json.dumps({"texts": [t]}) + "\n" for t in texts))
        script.write_text(WRK_SCRIPT)
        with socket.socket() as sock:  # a free loopback port for the servers, one after the other
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        url = f"http://127.0.0.1:{port}"
        results = {name: measure(name, cmd, url, args.seconds, script, bodies)
                   for name, cmd in servers(bundle, args.threads, port, args.device).items()}
    hand, local, ray, ray_logged, proxied = (results[name] for name in servers(bundle, args.threads, 0))
    lines = ["| server | clients | req/s | p50 ms | p99 ms | non-2xx | texts per model call |",
             "|---|---|---|---|---|---|---|"]
    for name, rows in results.items():
        for clients, r in rows.items():
            if clients == "healthz":
                continue
            per_call = f"{r['per_call']:.2f}" if "per_call" in r else "1 (no batching)"
            lines.append(f"| {name} | {clients} | {r['per_s']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} "
                         f"| {r['non2xx']} | {per_call} |")
    lines.append(f"| Predictor in process, batch 32 (the ceiling) | - | {ceiling:.0f} sentences/s | - | - | - | 32 |")
    lines += [
        "",
        "| server | GET /healthz at 32 clients: req/s | p50 ms | (no model: the server's own cost per request) |",
        "|---|---|---|---|",
    ]
    lines += [f"| {name} | {rows['healthz']['per_s']:.0f} | {rows['healthz']['p50_ms']:.2f} | |"
              for name, rows in results.items()]
    ratios = [
        f"one box ÷ hand-written, 1 client: {local[1]['per_s'] / hand[1]['per_s']:.2f}× req/s, p50 "
        f"{local[1]['p50_ms'] - hand[1]['p50_ms']:+.2f} ms (target ≥ 1.0×, within +1 ms)",
        f"one box ÷ hand-written, 32 clients: {local[32]['per_s'] / hand[32]['per_s']:.2f}× req/s (target ≥ 1.1×); "
        f"{local[32]['per_s'] / ceiling:.2f} of the in-process batch-32 ceiling; "
        f"{local[32]['per_call']:.2f} texts per call",
        f"Ray Serve (1 replica, direct ingress) ÷ hand-written, 32 clients: "
        f"{ray[32]['per_s'] / hand[32]['per_s']:.2f}× req/s (target ≥ 0.7×); "
        f"{ray[32]['per_call']:.2f} texts per call; Serve's request log costs "
        f"{1 - ray_logged[32]['per_s'] / ray[32]['per_s']:.0%} of its req/s at 32 clients (off unless -v)",
        f"behind Serve's proxy (1 replica, --autoscale 1:1) ÷ hand-written, 32 clients: "
        f"{proxied[32]['per_s'] / hand[32]['per_s']:.2f}×: the proxy and router alone serve "
        f"{proxied['healthz']['per_s']:.0f} GET /healthz a second at 32 clients "
        f"({1000 / proxied['healthz']['per_s']:.2f} ms of the box's time per request; the replica answering "
        f"itself: {1000 / ray['healthz']['per_s']:.2f} ms; one box: {1000 / local['healthz']['per_s']:.2f} ms)",
    ]
    table = "\n".join(lines) + "\n\n" + "\n".join(f"- {r}" for r in ratios) + (
        f"\n\nModel: {run.id} bundle ({json.loads((bundle / 'manifest.json').read_text())['task']}), "
        f"{args.threads} onnxruntime threads per server, device {args.device}; wrk with 1/8/32 connections, "
        f"{args.seconds:g} s per row, one CoNLL-2003 test sentence per request, client and server on the same cores.")
    print(table)
    append_results(f"serve_http: hand-written server vs zeroship serve (one box, Ray Serve), {args.device}",
                   " ".join(["benchmarks/serve_http.py", *sys.argv[1:]]), table)


if __name__ == "__main__":
    main()
