"""Hostile input, round two: what the running services, the registry and the output files do with it.

One test (or more) per finding of the round-two attack on a trained quickstart run:
1. a text the tokenizer cannot take (HTTP, argv, Python API, files) fails only its own request;
2. no command overwrites a file it did not make, nor writes inside a run folder;
3. every listener binds the address asked for (serve: tests/e2e/test_e2e_serve.py; a private Ray: here);
4. a remote URI that gives no answer fails within a stated time, exit 2;
5. `zeroship serve` exits non-zero when its Ray or application dies (tests/e2e/test_e2e_serve.py; the
   status logic: here);
6. a bundle whose manifest disagrees with its model is refused at load, field named;
7. errors quote a short excerpt of a bad line, never a run of a file's lines;
8. a 5000-digit number in a request body is a 400;
9. the registry ignores what is not a run.
Plus seeded fuzzing of the HTTP body parser and of the manifest loader. Tests marked e2e need the
session's trained run (conftest's ner_run / ner_bundle).
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from conftest import BIN, ROOT, TOY_NER, cli, free_port, is_loopback

from export.serve.ray_serve import RequestError, Watch, parse_texts, predict_isolated
from launcher.data.parse import read_jsonl
from launcher.runs.outputs import OutputError, check_output, write_output
from launcher.runs.registry import Registry
from zeroship.errors import DataError, RunError, excerpt, text_problem

e2e = pytest.mark.e2e

# ------------------------------------------------------------------ 1. texts the tokenizer cannot take


@pytest.mark.parametrize("text,expected", [
    ("a\ud800b", "lone surrogate U+D800 at character 1 is not valid Unicode"),
    ("\udfff", "lone surrogate U+DFFF at character 0 is not valid Unicode"),
    ("K\udcf6ln", "byte 0xf6 at character 1 is not UTF-8"),  # what Python makes of argv's b"K\xf6ln"
    ("fine \U0001F600 text\x00\u2028", ""),
])
def test_text_problem_names_what_the_tokenizer_cannot_take(text, expected):
    assert text_problem(text) == expected


def test_a_lone_surrogate_in_a_request_is_a_422_naming_its_index():
    with pytest.raises(RequestError) as info:
        parse_texts(b'{"texts": ["ok", "\\ud800 x"]}', max_texts=4, max_chars=100)
    assert (info.value.status, info.value.error) == (422, "invalid text")
    assert info.value.detail["index"] == 1 and "U+D800" in info.value.detail["problem"]


def test_a_failing_batch_is_retried_text_by_text():
    """The one fake: a model call that fails on one text (what a valid-looking text the model cannot
    take would do). Batched with it, the other texts still get their own answers."""
    calls = []

    def predict(texts, batch_size):
        calls.append(list(texts))
        if "poison" in texts:
            raise RuntimeError("model call failed")
        return [t.upper() for t in texts]

    results = predict_isolated(predict, ["a", "poison", "b"], 32)
    assert results[0] == "A" and results[2] == "B"
    assert isinstance(results[1], RuntimeError)
    assert calls == [["a", "poison", "b"], ["a"], ["poison"], ["b"]]
    assert predict_isolated(predict, ["x", "y"], 32) == ["X", "Y"]  # one call when nothing fails


def test_jsonl_with_a_lone_surrogate_escape_names_file_and_line(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "fine", "label": "pos"}\n{"text": "bad \\ud800", "label": "neg"}\n')
    with pytest.raises(DataError) as err:
        read_jsonl(str(path), "sequence_classification")
    assert f"{path}:2: lone surrogate U+D800" in str(err.value)
    path.write_text('{"tokens": ["a", "\\udc00"], "tags": ["O", "O"]}\n')
    with pytest.raises(DataError, match=f"{path}:1: lone surrogate U\\+DC00"):
        read_jsonl(str(path), "token_classification")


@e2e
def test_a_bad_text_through_python_and_argv_is_named_not_a_traceback(ner_bundle):
    from export.runtime import Predictor, TextError

    predictor = Predictor.load(ner_bundle)
    with pytest.raises(TextError) as info:
        predictor.predict(["Mara Okafor", "a\ud800"])
    assert info.value.index == 1 and isinstance(info.value, ValueError)
    assert predictor.predict(["Mara Okafor visited Aldmere"])  # the predictor is unharmed
    res = subprocess.run([str(BIN / "zeroship"), "export", "predict", str(ner_bundle), "Mara", b"K\xf6ln"],
                         capture_output=True, cwd=ROOT, timeout=120)
    stderr = res.stderr.decode(errors="replace")
    assert res.returncode == 2 and "Traceback" not in stderr, stderr
    assert "text 1: byte 0xf6 at character 1 is not UTF-8" in stderr


# ------------------------------------------------------------------ 2. the write policy


def test_output_policy_refuses_what_zeroship_did_not_write(tmp_path):
    purpose = "zeroship evaluate"
    theirs = tmp_path / "notes.json"
    theirs.write_text('{"mine": true}')
    with pytest.raises(OutputError, match="not an earlier `zeroship evaluate` result"):
        check_output(theirs, purpose, "--json")
    check_output(theirs, purpose, "--json", force=True)  # --force: the user says so
    ours = tmp_path / "eval.json"
    check_output(ours, purpose, "--json")  # a new file
    write_output(ours, {"metrics": {"f1": 1.0}}, purpose)
    assert json.loads(ours.read_text()) == {"written_by": purpose, "metrics": {"f1": 1.0}}
    check_output(ours, purpose, "--json")  # an earlier result of the same command may be replaced
    with pytest.raises(OutputError, match="not an earlier"):
        check_output(ours, "zeroship bench", "--json")  # but not another command's
    assert list(tmp_path.glob(".*.tmp")) == []  # atomic: no temp file left


def test_output_policy_never_writes_inside_a_run_folder(tmp_path):
    run = Registry(tmp_path / "runs").allocate()
    status = run.status_path.read_bytes()
    for target in (run.status_path, run.dir / "new.json", run.dir / "best" / "x.json"):
        (run.dir / "best").mkdir(exist_ok=True)
        with pytest.raises(OutputError, match="inside the run folder"):
            check_output(target, "zeroship evaluate", "--json", force=True)
    assert run.status_path.read_bytes() == status
    link = tmp_path / "link.json"
    link.symlink_to(run.status_path)
    with pytest.raises(OutputError):
        check_output(link, "zeroship evaluate", "--json", force=True)


@e2e
def test_evaluate_json_keeps_a_users_file_and_the_runs_status(ner_run, tmp_path):
    theirs = tmp_path / "mine.json"
    theirs.write_text("precious")
    status = (ner_run / "status.json").read_bytes()
    for target, extra in ((theirs, []), (ner_run / "status.json", ["--force"])):
        res = cli("zeroship", "evaluate", ner_run.name, "--runs", str(ner_run.parent), "--data",
                  str(TOY_NER / "validation.conll"), "--json", str(target), *extra, timeout=300)
        assert res.returncode == 2 and "Traceback" not in res.stderr and "--json" in res.stderr, res.stderr
        assert "eval_f1=" not in res.stdout  # refused before the work
    assert theirs.read_text() == "precious" and (ner_run / "status.json").read_bytes() == status
    assert cli("zeroship", "runs", "show", ner_run.name, "--runs", str(ner_run.parent)).returncode == 0


# ------------------------------------------------------------------ 3. a private Ray's listeners

LISTENERS = r"""
import json, os, sys
import ray
sys.path.insert(0, "tests")
from conftest import listeners_of
from zeroship.ray_session import init_ray
init_ray()

@ray.remote
class Probe:
    def pid(self):
        return os.getpid()

probe = Probe.remote()
ray.get(probe.pid.remote())
ray.get(ray.put(b"x" * 200_000))  # the object store in use
found = listeners_of(os.getpid())
ray.shutdown()
print(json.dumps(found))
"""


def test_a_private_ray_listens_on_loopback_only(ray_tmp):
    res = subprocess.run([sys.executable, "-c", LISTENERS], capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env={"PATH": "/usr/bin:/bin", "ZEROSHIP_RAY_TMPDIR": ray_tmp, "HF_HUB_OFFLINE": "1",
                              "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
    assert res.returncode == 0, res.stderr[-3000:]
    listeners = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(listeners) >= 3, listeners  # gcs, raylet, the workers' own: the check saw them
    assert all(is_loopback(ip) for _, ip, _ in listeners), listeners


# ------------------------------------------------------------------ 4. unreachable URIs


@pytest.mark.parametrize("args", [
    ("launch", "recipes/quickstart_ner.yaml", "--check", "data.train=gs://zeroship-no-bucket/train.conll"),
    ("launch", "recipes/quickstart_ner.yaml", "--check", "data.validation=gs://zeroship-no-bucket/v/part-*.conll"),
    ("zeroship", "runs", "--runs", "gs://zeroship-no-bucket/runs"),
], ids=["gs-train", "gs-glob", "gs-run-storage"])
def test_an_unreachable_uri_fails_in_the_stated_time(args):
    start = time.monotonic()
    res = cli(*args, env={"ZEROSHIP_REMOTE_TIMEOUT_S": "3"}, timeout=120)
    took = time.monotonic() - start
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert "no answer from gs:// in 3 s" in res.stderr and "ZEROSHIP_REMOTE_TIMEOUT_S" in res.stderr, res.stderr
    assert took < 60, took


@pytest.mark.parametrize("uri", ["s3://zeroship-no-bucket/train.conll", "hdfs://127.0.0.1:9/train.conll",
                                 "http://127.0.0.1:9/train.conll"])
def test_other_schemes_fail_with_exit_2_in_bounded_time(uri):
    start = time.monotonic()
    res = cli("launch", "recipes/quickstart_ner.yaml", "--check", f"data.train={uri}",
              env={"ZEROSHIP_REMOTE_TIMEOUT_S": "10", "AWS_EC2_METADATA_DISABLED": "true"}, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert time.monotonic() - start < 60


# ------------------------------------------------------------------ 5. the application's status


def _status(state: str | None, message: str = "") -> SimpleNamespace:
    apps = {} if state is None else {"zeroship": SimpleNamespace(status=state, message=message)}
    return SimpleNamespace(applications=apps)


def test_watch_reads_serves_status_as_a_supervisor_needs():
    """The one fake: Serve's status object (the live watch is tests/e2e/test_e2e_serve.py's Ray kill)."""
    watch = Watch(unhealthy_grace_s=30)
    assert watch.app_problem(_status("RUNNING"), now=0) == ""
    assert watch.app_problem(_status("DEPLOYING"), now=1) == ""
    assert "gone" in watch.app_problem(_status(None), now=2)
    assert "DEPLOY_FAILED: replica crashed" in watch.app_problem(_status("DEPLOY_FAILED", "replica crashed"), now=3)
    # a replica that died is replaced: UNHEALTHY counts only when it lasts
    assert watch.app_problem(_status("UNHEALTHY", "1 replica down"), now=10) == ""
    assert watch.app_problem(_status("UNHEALTHY"), now=39) == ""
    assert watch.app_problem(_status("RUNNING"), now=40) == ""  # recovered: the clock restarts
    assert watch.app_problem(_status("UNHEALTHY"), now=50) == ""
    assert "UNHEALTHY for 30 s" in watch.app_problem(_status("UNHEALTHY"), now=80)


def test_watch_says_when_serves_controller_does_not_answer():
    def hangs():
        time.sleep(30)

    def fails():
        raise ConnectionError("GCS gone")

    start = time.monotonic()
    assert "Ray does not answer" in Watch(status=hangs, answer_s=0.5).problem()
    assert time.monotonic() - start < 5
    assert "ConnectionError: GCS gone" in Watch(status=fails).problem()


# ------------------------------------------------------------------ 6. bundles that disagree with their model


def _tampered(ner_bundle: Path, folder: Path, name: str, **changes) -> Path:
    bundle = folder / name
    shutil.copytree(ner_bundle, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    (bundle / "manifest.json").write_text(json.dumps({**manifest, **changes}))
    return bundle


def _inconsistent(labels: list[str]) -> list[tuple[str, dict, str]]:
    return [
        ("max-length-1e30", {"max_length": 10**30}, "max_length must be an integer from 8 to"),
        ("stride-1e30", {"stride": 10**30}, "stride must be an integer from 0 to"),
        ("stride-over-window", {"stride": 47}, "stride 47 must be below max_length 48"),
        ("pad-2-70", {"pad_token_id": 2**70}, "pad_token_id must be an integer"),
        ("pad-outside", {"pad_token_id": 40_000}, "pad_token_id 40000 is outside the model's embedding table"),
        ("labels-cut", {"labels": labels[:5]}, f"labels lists 5 labels, but the model has {len(labels)} outputs"),
        ("labels-21", {"labels": labels + [f"B-X{i}" for i in range(21 - len(labels))]},
         f"labels lists 21 labels, but the model has {len(labels)} outputs"),
        ("labels-repeated", {"labels": [labels[0]] * len(labels)}, "labels must be distinct"),
        ("task-switched", {"task": "sequence_classification"}, "the model's logits have rank 3"),
        ("beyond-positions", {"max_length": 1000}, "max_length 1000 is beyond the model's position embeddings"),
    ]


@e2e
def test_an_inconsistent_bundle_is_refused_at_load_with_its_field(ner_bundle, tmp_path):
    from export.runtime import BundleError, Predictor

    labels = json.loads((ner_bundle / "manifest.json").read_text())["labels"]
    for name, changes, expected in _inconsistent(labels):
        bundle = _tampered(ner_bundle, tmp_path, name, **changes)
        with pytest.raises(BundleError) as info:
            Predictor.load(bundle)
        assert expected in str(info.value), (name, str(info.value))
    # a casing bundle's token types need 5 rows; a tokenizer larger than the embedding table
    plain = _tampered(ner_bundle, tmp_path, "tokenizer-too-big")
    tokenizer = json.loads((plain / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    vocab.update({f"zz{i}": len(vocab) + i for i in range(64)})
    (plain / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(BundleError, match="tokenizer.json has .* tokens, more than the model's embedding table"):
        Predictor.load(plain, verify=False)  # (its hash no longer matches: the check behind it is the point)


@e2e
def test_serve_refuses_an_inconsistent_bundle_before_starting(ner_bundle, tmp_path):
    labels = json.loads((ner_bundle / "manifest.json").read_text())["labels"]
    for name, changes, expected in [_inconsistent(labels)[i] for i in (5, 6, 8)]:
        bundle = _tampered(ner_bundle, tmp_path, name, **changes)
        start = time.monotonic()
        res = cli("zeroship", "serve", str(bundle), "--port", "1", timeout=120)
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
        assert expected in res.stderr and "export the run again" in res.stderr, res.stderr
        assert "serving" not in res.stdout and time.monotonic() - start < 60  # no Ray was started


@e2e
def test_serve_on_cuda_without_onnxruntime_gpu_is_refused_and_its_config_asks_a_gpu_per_replica(ner_bundle):
    """Here onnxruntime is the CPU build: `--device cuda` stops before Ray with what to install. The config
    for a cluster is still written (its nodes have their own onnxruntime), with the variant a GPU picks from
    this bundle (fp32, optimized, int8: no fp16, so optimized; int8 on the CPU)."""
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():  # CI's build (`make install`)
        start = time.monotonic()
        res = cli("zeroship", "serve", str(ner_bundle), "--device", "cuda", "--port", str(free_port()), timeout=120)
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
        assert "cannot run the model" in res.stderr and "no CUDA provider" in res.stderr, res.stderr
        assert "install onnxruntime-gpu" in res.stderr
        assert "serving" not in res.stdout and time.monotonic() - start < 60  # no Ray, no server was started
    for device, variant in (("cuda", "optimized"), ("cpu", "int8")):
        res = cli("zeroship", "serve", str(ner_bundle), "--device", device, "--config-only", timeout=120)
        assert res.returncode == 0, res.stderr[-2000:]
        (app,) = yaml.safe_load(res.stdout)["applications"]
        assert app["args"]["device"] == device and app["args"]["variant"] == variant, app["args"]


# ------------------------------------------------------------------ 7. excerpts, never runs of lines


def test_errors_quote_one_short_excerpt_of_a_file_that_is_not_data(tmp_path):
    secret = tmp_path / "shadow"
    lines = [f"user{i}:$6$saltsalt${'h' * 80}{i:03d}:20228:0:99999:7:::" for i in range(30)]
    secret.write_text("\n".join(lines) + "\n")
    res = cli("launch", "recipes/quickstart_ner.yaml", "--check", f"data.train=file://{secret}", timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert f"file://{secret}:2:" in res.stderr  # every bad line is still named
    assert "user0:$6$saltsalt$" in res.stderr and "hhhh" not in res.stderr.split("user0")[1].split("\n")[0][40:]
    for line in lines[1:]:
        assert line[:12] not in res.stderr, line  # no other line quoted at all
    assert len(res.stderr) < 3000


def test_excerpt_is_short_and_escaped():
    assert excerpt("a" * 100) == repr("a" * 40) + "…"
    assert excerpt("tab\there\x1b[31m") == "'tab\\there\\x1b[31m'"
    assert excerpt("ok") == "'ok'"


# ------------------------------------------------------------------ 8. huge numbers in a body


def test_a_5000_digit_number_in_a_body_is_a_400():
    with pytest.raises(RequestError) as info:
        parse_texts(b'{"texts": [' + b"9" * 5000 + b"]}", max_texts=4, max_chars=100)
    assert (info.value.status, info.value.error) == (400, "malformed JSON")
    assert "4300 digits" in info.value.detail and len(info.value.detail) <= 200


# ------------------------------------------------------------------ 9. the registry


def test_the_registry_ignores_what_is_not_a_run(tmp_path):
    reg = Registry(tmp_path)
    good = reg.allocate()
    good.update(state="succeeded", winner={"metric": "eval_f1", "value": 0.5})
    (tmp_path / "run-15" / "status.json").mkdir(parents=True)  # a folder where the status file belongs
    (tmp_path / "run-007").mkdir()  # not run-7
    (tmp_path / "run-007" / "status.json").write_text(good.status_path.read_text())
    (tmp_path / "run-9").mkdir()  # no status at all
    assert reg.get("latest").id == "run-1"  # the newest readable run, not run-15
    assert [r.id for r in reg.runs()] == ["run-1"]
    assert reg.not_runs() == ["run-007 (not a run id (leading zeros))", "run-15 (status.json is not a file)",
                              "run-9 (no status.json)"]
    for text in ("run-007", "007"):
        with pytest.raises(RunError, match="not a run id"):
            reg.get(text)
    with pytest.raises(RunError, match="recent runs: run-1;"):
        reg.get("run-15")
    res = cli("zeroship", "runs", "--runs", str(tmp_path), env={"COLUMNS": "300"})
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("run-1 ") + res.stdout.count("run-1\u2502") >= 1 and "run-7" not in res.stdout
    assert res.stdout.count("not runs, ignored") == 1 and "run-007 (not a run id" in res.stdout


def test_latest_with_only_unreadable_runs_says_so(tmp_path):
    reg = Registry(tmp_path)
    reg.allocate().status_path.write_text("{broken")
    with pytest.raises(RunError, match="no runs yet that can be read"):
        reg.get("latest")


# ------------------------------------------------------------------ fuzzing

HOSTILE_VALUES = [None, True, 0, -1, 1e308, 2**70, "", "\ud800", "\udcff", "x" * 300, [], {}, [[[]]],
                  {"texts": []}, "\u2028", "\x00", 10**30, -0.0, ["a"], {"a": "b"}]


def _mutate(rng: random.Random, value):
    """A random hostile variant of a JSON value: a field replaced, removed, added or nested."""
    roll = rng.random()
    if isinstance(value, dict) and value and roll < 0.7:
        key = rng.choice(sorted(value, key=str))
        out = dict(value)
        pick = rng.random()
        if pick < 0.2:
            del out[key]
        elif pick < 0.6:
            out[key] = rng.choice(HOSTILE_VALUES)
        else:
            out[key] = _mutate(rng, value[key])
        return out
    if isinstance(value, list) and value and roll < 0.7:
        out = list(value)
        out[rng.randrange(len(out))] = _mutate(rng, rng.choice(out))
        return out
    return rng.choice(HOSTILE_VALUES)


def test_fuzz_the_http_body_parser():
    """Every body either parses to a list of strings the tokenizer takes, or is a RequestError."""
    rng = random.Random(35)
    seeds = [{"texts": ["Mara Okafor", "joined Kestrel"]}, {"texts": ["a"]}]
    outcomes = {"ok": 0, "refused": 0}
    for i in range(3000):
        payload = _mutate(rng, rng.choice(seeds))
        body = json.dumps(payload).encode("utf-8", "surrogatepass")
        if i % 5 == 0:  # byte-level damage too
            cut = bytearray(body)
            for _ in range(rng.randint(1, 4)):
                cut[rng.randrange(len(cut))] = rng.randrange(256)
            body = bytes(cut)
        try:
            texts = parse_texts(body, max_texts=8, max_chars=200)
        except RequestError as exc:
            assert 400 <= exc.status < 500 and exc.error
            outcomes["refused"] += 1
            continue
        assert isinstance(texts, list) and 0 < len(texts) <= 8
        assert all(isinstance(t, str) and len(t) <= 200 and not text_problem(t) for t in texts)
        outcomes["ok"] += 1
    assert outcomes["ok"] > 100 and outcomes["refused"] > 1000, outcomes


@e2e
def test_fuzz_the_manifest_loader(ner_bundle, tmp_path):
    """Every mutated manifest either loads into a Predictor that answers, or is a BundleError."""
    from export.runtime import BundleError, Predictor

    manifest = json.loads((ner_bundle / "manifest.json").read_text())
    bundle = tmp_path / "bundle"
    shutil.copytree(ner_bundle, bundle)
    rng = random.Random(35)
    loaded = refused = 0
    for _ in range(60):
        mutated = _mutate(rng, manifest)
        (bundle / "manifest.json").write_bytes(json.dumps(mutated).encode("utf-8", "surrogatepass"))
        try:
            predictor = Predictor.load(bundle)
        except BundleError:
            refused += 1
            continue
        assert isinstance(predictor.predict(["Mara Okafor visited Aldmere."]), list)
        loaded += 1
    assert refused > 20 and loaded > 3, (loaded, refused)
