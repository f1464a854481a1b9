"""`zeroship serve` for real, both runners: in process (one box, the default) and on Ray Serve on
127.0.0.1 (`--ray-serve`), each in a subprocess, real HTTP from this process."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import TOY_NER, Server, cli, http, is_loopback, listeners_of

from export.runtime import Predictor
from launcher.data.parse import read_conll

pytestmark = pytest.mark.e2e

TEXTS = [" ".join(ex.tokens) for ex in read_conll(str(TOY_NER / "validation.conll"))[:40]]


def predict(url: str, texts: list[str], timeout: float = 60) -> tuple[int, dict]:
    return http(f"{url}/predict", json.dumps({"texts": texts}).encode(), timeout)


@pytest.fixture(scope="module")
def bundle(ner_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("serve") / "bundle"
    res = cli("zeroship", "export", "onnx", ner_run.name, "--runs", str(ner_run.parent), "--out", str(out))
    assert res.returncode == 0, res.stdout + res.stderr
    return out


@pytest.fixture(scope="module", params=["local", "ray"])
def server(bundle, request):
    runner = ["--ray-serve"] if request.param == "ray" else []
    srv = Server(bundle, "--batch-wait-ms", "50", "--max-texts", "8", "--max-chars", "500", *runner)
    yield srv
    srv.stop()


def at_once(clients: int, client) -> None:
    """`client(i)` in `clients` threads released together by a barrier, joined (2 minutes each at most)."""
    barrier = threading.Barrier(clients)

    def run(i: int) -> None:
        barrier.wait()
        client(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)


def spans(predictions: list) -> list:
    return [[(e["label"], e["start"], e["end"], e["text"]) for e in p] for p in predictions]


def test_http_predictions_equal_the_predictor(server, bundle):
    reference = Predictor.load(bundle).predict(TEXTS)
    got, model = [], None
    for i in range(0, len(TEXTS), 8):
        status, body = predict(server.url, TEXTS[i:i + 8])
        assert status == 200, body
        got += body["predictions"]
        model = body["model"]
    assert spans(got) == spans(reference)  # same entities, in input order
    assert sum(map(len, got)) > 20
    for g, r in zip(got, reference):
        assert [e["score"] for e in g] == pytest.approx([e["score"] for e in r], abs=1e-4)
    manifest = json.loads((bundle / "manifest.json").read_text())
    fp32 = manifest["files"]["onnx/model.onnx"]
    assert model == {"run": manifest["run"], "variant": "fp32", "sha256": fp32["sha256"]}


def test_concurrent_clients_get_their_own_answers_batched_together(server, bundle):
    reference = spans(Predictor.load(bundle).predict(TEXTS[:32]))
    before = http(f"{server.url}/stats")[1]
    answers = [None] * 32

    def client(i: int) -> None:
        answers[i] = predict(server.url, [TEXTS[i]])

    at_once(32, client)
    assert all(a is not None and a[0] == 200 for a in answers), answers
    assert [spans(a[1]["predictions"])[0] for a in answers] == reference
    after = http(f"{server.url}/stats")[1]
    calls, texts = after["model_calls"] - before["model_calls"], after["texts"] - before["texts"]
    assert texts == 32
    assert calls < 32, after  # several clients' texts went through one model call


@pytest.mark.parametrize("body,status,error", [
    (b"{not json", 400, "malformed JSON"),
    (b'{"texts": [1, 2]}', 422, "texts must be a list of strings"),
    (b'{"texts": []}', 422, "texts is empty"),
    (b'{"texts": ["a"], "labels": []}', 422, "unknown fields"),
    (json.dumps({"texts": ["a"] * 9}).encode(), 413, "too many texts"),
    (json.dumps({"texts": ["x" * 501]}).encode(), 413, "text too long"),
    (b"[" * 50_000 + b"]" * 50_000, 400, "malformed JSON"),
    (b'{"texts": [' + b"9" * 5000 + b"]}", 400, "malformed JSON"),  # past Python's int digit limit
    (b'{"texts": ["ok", "\\ud800"]}', 422, "invalid text"),  # legal JSON, not a text the tokenizer takes
])
def test_bad_requests_get_json_errors_and_the_replica_stays_up(server, body, status, error):
    got_status, got = http(f"{server.url}/predict", body)
    assert (got_status, got.get("error")) == (status, error), got
    assert "detail" in got
    assert http(f"{server.url}/healthz")[0] == 200
    assert predict(server.url, ["Mara Okafor joined Kestrel Systems."])[0] == 200


def test_metadata_and_openapi(server, bundle):
    status, meta = http(f"{server.url}/metadata")
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert status == 200 and meta["labels"] == manifest["labels"] and meta["task"] == "token_classification"
    assert meta["max_length"] == manifest["max_length"] and meta["limits"] == {
        "max_texts": 8,
        "max_chars": 500,
        "max_queue": 512,
    }
    assert meta["device"] == "cpu" and meta["provider"] == "CPUExecutionProvider"  # the default, and what runs it
    status, spec = http(f"{server.url}/openapi.json")
    assert status == 200 and {"/predict", "/healthz", "/readyz", "/metadata"} <= set(spec["paths"])


def test_one_clients_bad_text_never_fails_another_clients_request(server, bundle):
    """Valid and invalid (lone surrogate) requests at once, batched together by the replica: every valid
    one gets its own right answer, every invalid one a 422 that names its text."""
    reference = spans(Predictor.load(bundle).predict(TEXTS[:40]))
    bad_body = b'{"texts": ["fine", "half an emoji \\ud83d here"]}'
    answers = [None] * 40

    def client(i: int) -> None:
        if i % 4 == 3:
            answers[i] = http(f"{server.url}/predict", bad_body)
        else:
            answers[i] = predict(server.url, [TEXTS[i]])

    at_once(40, client)
    for i, (status, body) in enumerate(answers):
        if i % 4 == 3:
            assert status == 422 and body["detail"]["index"] == 1 and "U+D83D" in body["detail"]["problem"], body
        else:
            assert status == 200 and spans(body["predictions"])[0] == reference[i], (i, status, body)


def test_every_listener_of_the_server_is_on_loopback(server):
    listeners = listeners_of(server.proc.pid)
    names = {name for name, _, _ in listeners}
    assert any(port == server.port for _, _, port in listeners), listeners  # the check sees the HTTP listener
    if server.runner == "ray":
        assert any("ServeRepli" in name for name in names), names  # and the replica (its gRPC server)
        # one replica on a Ray of its own answers on the port itself (Serve's direct ingress), not the proxy
        on_port = [name for name, _, port in listeners if port == server.port]
        assert on_port and all(name.startswith("ray::ServeReplica") for name in on_port), listeners
    else:
        assert names == {"zeroship"}, listeners  # one process, one listener
    assert all(is_loopback(ip) for _, ip, _ in listeners), listeners


def test_the_console_shows_no_line_per_request(server):
    for _ in range(5):
        assert predict(server.url, ["Mara Okafor"])[0] == 200
    output = server.output()
    assert "POST /predict" not in output and "Ctrl-C stops it" in output, output
    assert "INFO" not in output, output  # no Ray banners or Serve start-up chatter


def test_sigint_exits_0_and_frees_the_port(server):
    assert server.stop(signal.SIGINT) == 0, server.output()
    with pytest.raises(ConnectionRefusedError):  # nothing listens there any more
        socket.create_connection(("127.0.0.1", server.port), timeout=5).close()
    with socket.socket() as s:  # and a new server could take the port (past the clients' TIME_WAITs)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", server.port))
        s.listen()
    assert "shutting down" in server.output()


def replica_pids() -> list[int]:
    """Processes of this test's Serve replicas (their process title names the deployment)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and b"ServeReplica:zeroship:BundleServer" in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def test_killing_a_replica_mid_load_loses_no_request(bundle):
    """Two replicas; one is SIGKILLed while four clients keep sending. Every request gets its right
    answer (a client retries once a 5xx or a dropped connection says its replica died), and Serve
    brings the replica back."""
    srv = Server(bundle, "--replicas", "2", "--max-texts", "8")
    try:
        deadline = time.time() + 60
        while len(replica_pids()) < 2 and time.time() < deadline:
            time.sleep(1)
        victims = replica_pids()
        assert len(victims) == 2, victims
        # two replicas: Serve's proxy listens on the port and spreads the requests (not direct ingress)
        on_port = {name for name, _, port in listeners_of(srv.proc.pid) if port == srv.port}
        assert on_port and not any("ServeRepli" in name for name in on_port), on_port
        reference = spans(Predictor.load(bundle).predict(TEXTS[:8]))
        stop, lock = threading.Event(), threading.Lock()
        done, retried, failed = [0], [0], []

        def client(k: int) -> None:
            while not stop.is_set():
                texts = TEXTS[k:k + 4]
                for attempt in range(6):
                    try:
                        status, body = predict(srv.url, texts, timeout=60)
                    except (urllib.error.URLError, ConnectionError, TimeoutError):
                        status, body = 599, {}
                    if status == 200:
                        ok = spans(body["predictions"]) == reference[k:k + 4]
                        with lock:
                            done[0] += 1
                            if not ok:
                                failed.append(("wrong answer", k))
                        break
                    with lock:
                        retried[0] += 1
                    time.sleep(0.5)
                else:
                    with lock:
                        failed.append((status, body))

        threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        time.sleep(3)
        os.kill(victims[0], signal.SIGKILL)
        time.sleep(8)
        stop.set()
        for t in threads:
            t.join(120)
        assert failed == [] and done[0] > 8, (failed, done, retried)
        deadline = time.time() + 120
        while time.time() < deadline and (len(replica_pids()) < 2 or victims[0] in replica_pids()):
            time.sleep(1)
        assert len(replica_pids()) == 2 and victims[0] not in replica_pids()  # a new replica in its place
        assert predict(srv.url, TEXTS[:2])[0] == 200
        print(f"replica kill: {done[0]} requests answered, {retried[0]} retried")
    finally:
        assert srv.stop() == 0, srv.output()


def test_when_its_ray_dies_serve_turns_unready_and_exits_1(bundle):
    """Ray's gcs_server and raylet are SIGKILLed under a running server: /readyz stops saying ready within
    seconds, the command says why and exits 1, and nothing of it is left listening (a supervisor sees a
    dead process, not a healthy one serving nothing)."""
    import psutil

    srv = Server(bundle, "--ray-serve")
    try:
        tree = [srv.proc.pid] + [p.pid for p in psutil.Process(srv.proc.pid).children(recursive=True)]
        core = [p for p in psutil.Process(srv.proc.pid).children() if p.name() in ("gcs_server", "raylet")]
        assert len(core) == 2, [p.name() for p in psutil.Process(srv.proc.pid).children()]
        assert http(f"{srv.url}/readyz")[0] == 200
        for proc in core:
            proc.kill()
        killed = time.monotonic()
        ready_after = []
        while srv.proc.poll() is None and time.monotonic() - killed < 90:
            try:
                status = http(f"{srv.url}/readyz", timeout=2)[0]
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                status = None
            if status == 200:
                ready_after.append(round(time.monotonic() - killed, 1))
            time.sleep(0.3)
        assert srv.proc.poll() == 1, srv.output()
        assert time.monotonic() - killed < 60
        assert all(t < 2.5 for t in ready_after), ready_after  # ready no more once the watch has looked
        said = " ".join(srv.output().split())  # the console wraps at its width: "(exit \n1)" with a 5-digit pid
        # whichever of the two the watch saw exit first (both were killed, a moment apart)
        assert re.search(r"Ray stopped: (gcs_server|raylet) \(pid \d+", said) and "stopping (exit 1)" in said, said
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", srv.port), timeout=5).close()
        left = [pid for pid in tree if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
        assert left == [], left
    finally:
        srv.stop()


def test_overload_gets_503_with_retry_after_and_the_server_recovers(bundle, tmp_path):
    """A queue of 16 texts, 24 clients sending 8 texts at once: every request is answered right or gets a
    503 with Retry-After, /stats counts the rejections, and the server answers normally afterwards. The
    access log has one line per request, and the console none."""
    log = tmp_path / "access.log"
    srv = Server(bundle, "--max-queue", "16", "--max-texts", "8", "--max-batch-size", "4", "--access-log", str(log))
    try:
        reference = spans(Predictor.load(bundle).predict(TEXTS[:8]))
        answers = [None] * 24

        def client(i: int) -> None:
            req = urllib.request.Request(f"{srv.url}/predict", data=json.dumps({"texts": TEXTS[:8]}).encode(),
                                         method="POST", headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=120) as resp:
                    answers[i] = (resp.status, json.loads(resp.read()), None)
            except urllib.error.HTTPError as exc:
                answers[i] = (exc.code, json.loads(exc.read()), exc.headers.get("Retry-After"))

        at_once(24, client)
        ok = [a for a in answers if a[0] == 200]
        rejected = [a for a in answers if a[0] == 503]
        assert len(ok) + len(rejected) == 24, answers
        assert ok and rejected, [a[0] for a in answers]
        assert all(spans(a[1]["predictions"]) == reference for a in ok)
        assert all(a[1]["error"] == "overloaded" and a[2] == "1" for a in rejected), rejected[:2]
        stats = http(f"{srv.url}/stats")[1]
        assert stats["rejected"] == len(rejected) and stats["queue_depth"] == 0 and stats["queue_limit"] == 16
        assert predict(srv.url, TEXTS[:8])[0] == 200  # recovered
        lines = log.read_text().splitlines()
        assert lines[0].startswith("# zeroship serve access log")
        assert sum(" POST /predict 503 " in line for line in lines) == len(rejected)
        assert sum(" POST /predict 200 " in line for line in lines) == len(ok) + 1
        assert "POST /predict" not in srv.output()
    finally:
        assert srv.stop(signal.SIGTERM) == 0, srv.output()


def test_verbose_prints_one_line_per_request_with_its_id(bundle):
    """-v: the access lines on the console (the default keeps them off: test_the_console_shows_no_line_per_request)."""
    srv = Server(bundle, "-v")
    try:
        assert predict(srv.url, ["Mara Okafor"])[0] == 200
        assert http(f"{srv.url}/predict", b"{bad")[0] == 400
        output = srv.output()
        assert " POST /predict 200 " in output and " POST /predict 400 " in output, output
    finally:
        assert srv.stop(signal.SIGTERM) == 0, srv.output()
