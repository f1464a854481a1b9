"""Shared test setup: offline Hugging Face, quiet tokenizers, helpers to run the CLIs for real."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from zeroship.ray_session import free_port  # tests import it from here too

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
# Ray renices its worker processes to 15 (RayConfig worker_niceness). `make test` runs two test processes
# on 2 cores, so a launch's workers (Train controller and ranks, Ray Data tasks) starved whenever the other
# process ran nice-0 work (a test, an export, another launch's driver), while the launch's own nice-0
# daemons kept polling: a tiny launch beside two busy loops took 260 s and 150 CPU-s at 15, 124 s and
# 126 CPU-s at 0 (the Train controller alone waited 140 s to start). Every Ray the suite starts, and every
# launch's private one, inherits this; a user's Ray keeps Ray's default.
os.environ.setdefault("RAY_worker_niceness", "0")

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TOY_NER = ROOT / "recipes" / "data" / "toy_ner"
TOY_CLS = ROOT / "recipes" / "data" / "toy_cls"

# `make test` runs two pytest processes (pytest-xdist, --dist loadgroup): a launch alone leaves ~30% of
# 2 cores idle (Ray's start-up and exits, polls, waits). Each process would build its own copy of a
# session fixture (a trained run, the MLflow server), so every test that uses one runs in one process.
SHARED = {"ner_run", "ner_bundle", "cls_run", "cls_bundle", "quickstart_job", "plain_ner_bundle", "mlflow_server"}


@pytest.hookimpl(tryfirst=True)  # before xdist reads the marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """One xdist group for the tests of the session's runs; one per module for the tests that share a
    module-scoped fixture (a server, a Node install, a model), so that it, too, is built once."""
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        defs = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
        if used & SHARED:
            item.add_marker(pytest.mark.xdist_group("shared-runs"))
        elif any(d[-1].scope == "module" for name, d in defs.items() if name in used and d):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))


def cli(
    *args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 900
) -> subprocess.CompletedProcess:
    """Run one of the console scripts (launch, export, zeroship) in a fresh process. A private Ray it
    starts lives in a temp folder of its own (removed afterwards) unless `env` names one: never Ray's
    shared /tmp/ray, where another Ray on the machine (or a clean-up of it) could meet it."""
    full_env = {**os.environ, **(env or {})}
    own = None if full_env.get("ZEROSHIP_RAY_TMPDIR") else tempfile.mkdtemp(prefix="zs-", dir="/tmp")
    if own:
        full_env["ZEROSHIP_RAY_TMPDIR"] = own
    try:
        return subprocess.run([str(BIN / args[0]), *args[1:]], cwd=cwd or ROOT, env=full_env,
                              capture_output=True, text=True, timeout=timeout)
    finally:
        if own:
            shutil.rmtree(own, ignore_errors=True)


EVAL_BEST = """
import json, sys
from transformers import AutoTokenizer
from launcher.data.parse import load_dataset
from launcher.eval.evaluate import evaluate_model
from launcher.nn.model import load_model
best, data = sys.argv[1], json.loads(sys.argv[2])
model, meta = load_model(best)
ds = load_dataset(data, meta["task"])
tok = AutoTokenizer.from_pretrained(best)
print(json.dumps(evaluate_model(model, tok, meta["task"], meta["labels"], ds.splits["validation"].examples,
                                meta["max_length"], meta["stride"])))
"""


def evaluate_best_in_fresh_process(best: Path, data: dict) -> dict:
    res = subprocess.run([sys.executable, "-c", EVAL_BEST, str(best), json.dumps(data)],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


# One CPU process running real DeepSpeed over gloo, for tests that need an engine but not Ray.
# Scripts get `deepspeed`, `torch`, `json`, `os`, `sys` and MODEL (a 1-layer MiniLM, no dropout);
# their own arguments start at sys.argv[2]; their last stdout line is JSON.
DEEPSPEED_PRELUDE = r"""
import json, os, sys
os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
import deepspeed, torch
from launcher.worker.engine import skip_shm_comm_build
skip_shm_comm_build()  # as the workers do
deepspeed.init_distributed(dist_backend="gloo")
torch.set_num_threads(1)
MODEL = {"encoder": "packaged:all-MiniLM-L6-v2", "task": "token_classification", "num_hidden_layers": 1,
         "head": {"dim": 16, "layers": 1, "activation": "gelu", "dropout": 0.0, "layernorm": True}}
"""

# A two-sentence NER batch for those scripts: LABELS, tok, ex and batch (labels still in it).
TOY_BATCH = r"""
from launcher.data.parse import Example
from launcher.data.features import collate, encode_ner
from launcher.recipe.schema import resolve_encoder
from transformers import AutoTokenizer

LABELS = ["O", "B-PER", "I-PER", "B-LOC"]
tok = AutoTokenizer.from_pretrained(resolve_encoder(MODEL["encoder"]))
ex = [Example(tokens=["Mara", "Okafor", "visited", "Aldmere"], tags=["B-PER", "I-PER", "O", "B-LOC"]),
      Example(tokens=["It", "rained", "in", "Aldmere"], tags=["O", "O", "O", "B-LOC"])]
batch = collate(encode_ner(tok, ex, {t: i for i, t in enumerate(LABELS)}, 32, 4), tok.pad_token_id, True)
"""


def run_deepspeed_script(body: str, *args: str) -> dict:
    res = subprocess.run([sys.executable, "-c", DEEPSPEED_PRELUDE + body, str(free_port()), *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=600,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "TOKENIZERS_PARALLELISM": "false"})
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.fixture
def ray_tmp():
    """A short, private Ray temp dir (Unix socket paths must stay under ~107 characters)."""
    with tempfile.TemporaryDirectory(prefix="zs-", dir="/tmp") as tmp:
        yield tmp


def tiny_ner_recipe(folder: Path, **sections) -> Path:
    """A quick NER recipe on the shipped toy data with a 2-layer MiniLM; sections override keys.

    Its word embeddings are frozen (`model.freeze: embeddings`): 11.7M of the tiny model's 15.5M
    parameters, whose AdamW update and gradient all-reduce were 0.65 s of each 1.09 s step on 2 cores
    (train_step_s 1.09 → 0.42 s, one launch 13 s shorter). The runs that stand for the default path
    (`ner_run`, `cls_run`) and LoRA train them (`freeze: none`)."""
    import yaml

    recipe = {
        "model": {"encoder": "packaged:all-MiniLM-L6-v2", "task": "token_classification",
                  "num_hidden_layers": 2, "head": {"dim": 64, "layers": 1}, "freeze": "embeddings"},
        "data": {"format": "conll", "train": str(TOY_NER / "train.conll"),
                 "validation": str(TOY_NER / "validation.conll"), "max_length": 48, "stride": 8},
        "train": {"epochs": 1, "lr": 2e-4, "head_lr": 2e-3, "batch_size": 16, "seed": 7},
        "deepspeed": {"zero_stage": 2},
        "scaling": {"workers": 2},
        "run": {"storage": str(folder / "runs")},
    }
    for key, value in sections.items():
        recipe[key] = {**recipe.get(key, {}), **value}
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def toy_ner_shards(folder: Path, fmt: str, shards: int, split: str = "train") -> Path:
    """A toy NER split cut into `shards` files (`part-0000.conll`, … or `.jsonl`), sentences in
    order, next to what shard writers leave around them: an empty `_SUCCESS` marker and a hidden
    checksum file that is not UTF-8 (a reader that opened either would fail or change the data)."""
    from launcher.data.parse import read_conll

    examples = read_conll(str(TOY_NER / f"{split}.conll"))
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        part = examples[s * len(examples) // shards:(s + 1) * len(examples) // shards]
        if fmt == "conll":
            text = "".join("".join(f"{t} {g}\n" for t, g in zip(ex.tokens, ex.tags)) + "\n" for ex in part)
        else:
            text = "".join(json.dumps({"tokens": ex.tokens, "tags": ex.tags}) + "\n" for ex in part)
        (folder / f"part-{s:04d}.{fmt}").write_text(text)
    (folder / "_SUCCESS").write_text("")
    (folder / ".part-0000.crc").write_bytes(b"\xff\xfe\x00crc")
    return folder


def train_run(folder: Path, ray_dir: str, **sections) -> Path:
    """Train a tiny recipe through the real CLI; return its run directory."""
    recipe = tiny_ner_recipe(folder, **sections)
    res = cli("launch", str(recipe), env={"ZEROSHIP_RAY_TMPDIR": ray_dir})
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    (folder / "console.txt").write_text(res.stdout + res.stderr)  # what the user saw (test_console.py)
    runs = sorted((folder / "runs").glob("run-*"), key=lambda p: int(p.name.split("-")[1]))
    return runs[-1]


CLS_SECTIONS = dict(
    model={"task": "sequence_classification", "pooling": "mean", "freeze": "none"},
    data={"format": "csv", "train": str(TOY_CLS / "train.csv"), "validation": str(TOY_CLS / "validation.csv"),
          "test": str(TOY_CLS / "test.csv")},
    train={"epochs": 2, "lr": 3e-4},
    deepspeed={"zero_stage": "auto"})  # CPU workers: auto is stage 0


@pytest.fixture(scope="session")
def ner_run(tmp_path_factory) -> Path:
    """A tiny NER run (ZeRO-2, 2 workers, 2 epochs, `model.casing`) on the toy train split as a folder
    of 3 CoNLL shards, shared by the training and export tests (cls_run is the run without casing). It also
    logs to an MLflow file store (`<folder>/mlruns`), which test_mlflow.py reads back."""
    folder = tmp_path_factory.mktemp("ner")
    with tempfile.TemporaryDirectory(prefix="zs-", dir="/tmp") as ray_dir:
        shards = toy_ner_shards(folder / "train_shards", "conll", 3)  # a folder of shards, read in name order
        return train_run(folder, ray_dir, data={"train": str(shards)}, train={"epochs": 2},
                         run={"mlflow_uri": str(folder / "mlruns")}, model={"freeze": "none", "casing": True})


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 (SQLite backend), for the whole session; yields its URL."""
    import time
    import urllib.request

    folder = tmp_path_factory.mktemp("mlflow")
    url = f"http://127.0.0.1:{free_port()}"
    log = open(folder / "server.log", "w")
    proc = subprocess.Popen([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1],
                             "--backend-store-uri", f"sqlite:///{folder}/mlflow.db",
                             "--default-artifact-root", str(folder / "artifacts"), "--workers", "1"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            # no job runner: its ~8 worker processes cost ~30 CPU-s to start, and the
                            # tests only log runs and read them back
                            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    try:
        deadline = time.time() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None and time.time() < deadline, (folder / "server.log").read_text()[-3000:]
            time.sleep(1)
        yield url
    finally:
        stop_process_group(proc, 30)
        log.close()


def stop_process_group(proc: subprocess.Popen, timeout: int) -> None:
    """SIGTERM the process group a test started (start_new_session=True), SIGKILL it after `timeout`."""
    import signal

    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


PAYLOAD = """
import os, sys, torch
class Payload:
    def __reduce__(self):
        return (os.mkdir, (sys.argv[2],))
torch.save({"module": Payload()}, sys.argv[1])
"""


def plant_payload(target: Path, marker: Path) -> None:
    """Overwrite a checkpoint file with a pickle that, if anything unpickles it, creates `marker`."""
    subprocess.run([str(BIN / "python"), "-c", PAYLOAD, str(target), str(marker)], check=True)


@pytest.fixture(scope="session")
def ner_bundle(ner_run) -> Path:
    """ner_run's bundle (optimized + int8), shared by the export and hostile-input tests."""
    res = cli("zeroship", "export", "onnx", ner_run.name, "--runs", str(ner_run.parent), "--optimize",
              "--quantize", "int8")
    assert res.returncode == 0, res.stdout + res.stderr
    return ner_run / "onnx"


@pytest.fixture(scope="session")
def cls_run(tmp_path_factory, mlflow_server) -> Path:
    """A tiny sequence-classification run (`zero_stage: auto`, i.e. ZeRO-0 on CPU workers, so the
    stage-0 merge path is covered); it logs to the
    session's MLflow server, which test_mlflow.py reads back."""
    folder = tmp_path_factory.mktemp("cls")
    with tempfile.TemporaryDirectory(prefix="zs-", dir="/tmp") as ray_dir:
        return train_run(folder, ray_dir, **CLS_SECTIONS, run={"mlflow_uri": mlflow_server, "name": "cls-tests"})


@pytest.fixture(scope="session")
def cls_bundle(cls_run) -> Path:
    """cls_run's bundle (fp32 + dynamic-or-static int8), shared by the export and Node.js tests."""
    res = cli("zeroship", "export", "onnx", cls_run.name, "--runs", str(cls_run.parent), "--quantize", "int8")
    assert res.returncode == 0, res.stdout + res.stderr
    return cls_run / "onnx"


LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}


@dataclass
class QuickstartJob:
    """What `ray job submit -- launch recipes/quickstart_ner.yaml` left: the good job and the bad one."""

    runs: Path
    good: subprocess.CompletedProcess
    good_wall_s: float
    bad: subprocess.CompletedProcess


@pytest.fixture(scope="session")
def quickstart_job(tmp_path_factory) -> QuickstartJob:
    """recipes/quickstart_ner.yaml as it ships (the whole 6-layer MiniLM, 2 epochs, no casing classes),
    submitted with `ray job submit` to a Ray head started here on loopback, then the same recipe with
    more workers than that cluster has (a job that must fail). One launch serves the job-submit test
    (test_e2e_cluster) and the bundle a Transformers.js user loads (plain_ner_bundle, test_e2e_node)."""
    import socket
    import time

    runs = tmp_path_factory.mktemp("quickstart") / "runs"
    env = {**os.environ, **LOOPBACK_ENV, "PATH": f"{BIN}:{os.environ['PATH']}"}
    gcs, dash = free_port(), free_port()
    with tempfile.TemporaryDirectory(prefix="zs-", dir="/tmp") as ray_dir:
        head = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
             "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
             "--dashboard-agent-listen-port", str(free_port()), "--metrics-export-port", str(free_port()),
             "--temp-dir", ray_dir, "--num-cpus", "3", "--include-dashboard", "true"],  # 2 workers + data
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            deadline = time.time() + 120
            while time.time() < deadline:
                try:
                    with socket.create_connection(("127.0.0.1", dash), timeout=1):
                        break
                except OSError:
                    assert head.poll() is None, f"ray start exited with {head.returncode}"
                    time.sleep(1)

            def submit(*args: str) -> subprocess.CompletedProcess:
                retry_until = time.time() + 120
                while True:
                    res = subprocess.run(
                        [str(BIN / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dash}",
                         "--working-dir", str(ROOT), "--", "launch", "recipes/quickstart_ner.yaml", *args,
                         "--runs", str(runs)],
                        env=env, capture_output=True, text=True, timeout=900)
                    # the dashboard answers before the head's job agent has registered; Ray's 500 then says
                    # "No available agent to submit job, please try again later" and no job exists yet
                    if "No available agent to submit job" not in res.stdout + res.stderr or time.time() > retry_until:
                        return res
                    time.sleep(2)

            started = time.time()
            good = submit()
            wall = time.time() - started
            bad = submit("scaling.workers=64")  # more workers than the cluster has CPUs
        finally:
            stop_process_group(head, 60)
    return QuickstartJob(runs, good, wall, bad)


@pytest.fixture(scope="session")
def plain_ner_bundle(quickstart_job) -> Path:
    """The quickstart's run (quickstart_job), exported with int8: the bundle a Transformers.js user
    loads (test_e2e_node)."""
    job = quickstart_job
    assert job.good.returncode == 0, (job.good.stdout + job.good.stderr)[-4000:]
    res = cli("zeroship", "export", "onnx", "run-1", "--runs", str(job.runs), "--quantize", "int8-dynamic")
    assert res.returncode == 0, res.stdout + res.stderr
    (job.runs.parent / "export.txt").write_text(res.stdout + res.stderr)  # what the user saw (test_e2e_cluster)
    return job.runs / "run-1" / "onnx"


def is_loopback(ip: str) -> bool:
    """127.0.0.0/8, ::1, or IPv4 loopback mapped into IPv6 (::ffff:127.0.0.1, as gRPC binds it)."""
    import ipaddress

    address = ipaddress.ip_address(ip.split("%", 1)[0])
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def listeners_of(pid: int) -> list[tuple[str, str, int]]:
    """(process name, address, port) of every TCP socket listening in the process tree under `pid`."""
    import psutil

    root = psutil.Process(pid)
    found = []
    for proc in [root, *root.children(recursive=True)]:
        try:
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    found.append((proc.name(), conn.laddr.ip, conn.laddr.port))
        except psutil.Error:
            continue
    return found


# ------------------------------------------------------------------ zeroship serve, over real HTTP
def http(url: str, body: bytes | None = None, timeout: float = 60) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw or b"{}")
        except ValueError:  # Serve's proxy answers 404 in plain text until the app's routes reach it
            return exc.code, {"raw": raw.decode(errors="replace")}


class Server:
    """`zeroship serve` in its own process session, with its own Ray temp dir."""

    def __init__(self, bundle: Path, *args: str):
        self.runner = "ray" if {"--ray-serve", "--replicas", "--autoscale"} & set(args) else "local"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ray_dir = tempfile.mkdtemp(prefix="zs-", dir="/tmp")
        self.log = open(Path(self.ray_dir) / "serve.log", "w+")
        env = {**os.environ, "ZEROSHIP_RAY_TMPDIR": self.ray_dir}
        self.proc = subprocess.Popen(
            [str(BIN / "zeroship"), "serve", str(bundle), "--port", str(self.port), *args],
            cwd=ROOT,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            self._wait_ready(240)
        except BaseException:  # never leave a server (and its Ray and replicas) behind for the next test
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            raise

    def _wait_ready(self, seconds: int) -> None:
        deadline = time.time() + seconds
        while time.time() < deadline:
            assert self.proc.poll() is None, self.output()
            try:  # ready, and the command has printed its routes (start-up is over)
                if http(f"{self.url}/readyz", timeout=5)[0] == 200 and "Ctrl-C stops it" in self.output():
                    return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(1)
        raise AssertionError(f"server not ready in {seconds} s:\n" + self.output())

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()[-4000:]

    def stop(self, sig=signal.SIGINT) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:  # past the runner's own bound (ray_serve._shut_down: Serve 60 + Ray 30 + 5 s; reached under load)
                self.proc.wait(timeout=150)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode
