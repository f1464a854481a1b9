"""Serving, without a server: request parsing (hostile bodies included), options, the config file,
and that a replica's code loads neither torch nor transformers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from conftest import ROOT, cli

from export.serve.ray_serve import RequestError, ServeOptions, config_yaml, parse_texts


@pytest.mark.parametrize("body,status,error", [
    (b"{bad", 400, "malformed JSON"),
    (b"\xff\xfe\x00", 400, "malformed JSON"),  # not UTF-8
    (b"[" * 100_000 + b"]" * 100_000, 400, "malformed JSON"),  # nesting beyond the parser's depth
    (b"[]", 422, "expected a JSON object"),
    (b'"texts"', 422, "expected a JSON object"),
    (b'{"texts": "one string"}', 422, "texts must be a list of strings"),
    (b'{"texts": [1]}', 422, "texts must be a list of strings"),
    (b'{"texts": [["nested"]]}', 422, "texts must be a list of strings"),
    (b'{"texts": []}', 422, "texts is empty"),
    (b'{"texts": ["a"], "extra": 1}', 422, "unknown fields"),
    (b'{"text": "a"}', 422, "unknown fields"),
    (b'{"texts": ["a", "b", "c", "d"]}', 413, "too many texts"),
    (b'{"texts": ["' + b"x" * 101 + b'"]}', 413, "text too long"),
])
def test_bad_bodies_are_named(body, status, error):
    with pytest.raises(RequestError) as info:
        parse_texts(body, max_texts=3, max_chars=100)
    assert info.value.status == status and info.value.error == error


def test_good_bodies_pass_unchanged():
    texts = ["Mara Okafor", "", "line\u2028break", "x" * 100]
    assert parse_texts(json.dumps({"texts": texts}).encode(), max_texts=4, max_chars=100) == texts
    # a UTF-8 byte-order mark is read as an encoding marker (json's detection), not as text
    assert parse_texts(b'\xef\xbb\xbf{"texts": ["a"]}', max_texts=4, max_chars=100) == ["a"]


@pytest.mark.parametrize("options,field", [
    ({"max_batch_size": 0}, "max_batch_size"), ({"replicas": 0}, "replicas"),
    ({"threads_per_replica": 10**9}, "threads_per_replica"), ({"autoscale": (3, 1)}, "autoscale"),
    ({"batch_wait_ms": -1}, "batch_wait_ms"), ({"max_chars": 0}, "max_chars"),
])
def test_options_out_of_range_refused(options, field):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=field):
        ServeOptions(bundle="b", **options)


def test_config_file_is_what_serve_deploy_reads(tmp_path):
    from ray.serve.schema import ServeDeploySchema

    text = config_yaml(ServeOptions(bundle=str(tmp_path), replicas=3, autoscale=None), "0.0.0.0", 9000)
    config = yaml.safe_load(text)
    ServeDeploySchema.model_validate(config)  # Ray's own schema for `serve deploy` files
    (app,) = config["applications"]
    assert app["import_path"] == "export.serve.ray_serve:build_app"
    assert app["args"]["bundle"] == str(tmp_path.resolve()) and app["args"]["replicas"] == 3
    assert config["http_options"] == {"host": "0.0.0.0", "port": 9000}


def test_a_cuda_replica_reserves_a_gpu_and_a_cpu_replica_none():
    from pydantic import ValidationError

    from export.serve.ray_serve import actor_options

    assert actor_options(ServeOptions(bundle="b", threads_per_replica=3)) == {"num_cpus": 3}
    assert actor_options(ServeOptions(bundle="b", threads_per_replica=3, device="cuda")) == {"num_cpus": 3,
                                                                                            "num_gpus": 1}
    with pytest.raises(ValidationError, match="device"):
        ServeOptions(bundle="b", device="tpu")


def test_serve_cli_refuses_bad_arguments_and_missing_bundles(tmp_path):
    res = cli("zeroship", "serve", str(tmp_path), "--config-only")
    assert res.returncode == 2 and "no manifest.json" in res.stderr and "Traceback" not in res.stderr
    res = cli("zeroship", "serve", "run-9", "--runs", str(tmp_path), "--config-only")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    for bad, field in ((["--port", "70000"], "--port"), (["--autoscale", "x"], "--autoscale"),
                       (["--replicas", "2", "--autoscale", "1:2"], "not allowed with")):
        res = cli("zeroship", "serve", str(tmp_path), *bad)
        assert res.returncode == 2 and field in res.stderr and "Traceback" not in res.stderr, res.stderr


def test_replica_code_imports_neither_torch_nor_transformers():
    code = "import sys, export.serve.ray_serve; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "[]"


def test_kuberay_rayservice_carries_a_valid_serve_config():
    from ray.serve.schema import ServeDeploySchema

    manifest = yaml.safe_load((ROOT / "cluster" / "kuberay-rayservice.yaml").read_text())
    assert manifest["kind"] == "RayService"
    config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(config)
    (app,) = config["applications"]
    assert app["import_path"] == "export.serve.ray_serve:build_app"
    ServeOptions(**app["args"])  # the args are what build_app accepts


def test_unexpected_failure_is_a_500_whose_request_id_is_in_the_log():
    """The one fake: a model call that raises (in place of the batched call, which needs a live
    replica). The route answers 500 with an id the log repeats next to the traceback."""
    import asyncio
    import logging

    from export.serve.ray_serve import BundleServer, logger

    async def broken(text):
        raise RuntimeError("boom")

    class Body:
        async def body(self):
            return b'{"texts": ["Mara Okafor"]}'

    server = object.__new__(BundleServer.func_or_class)
    server._batch, server.model_info = broken, {}
    server.opts = ServeOptions(bundle="b")
    server.counts = {"model_calls": 0, "texts": 0, "requests": 0}
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        response = asyncio.run(server.predict(Body()))
    finally:
        logger.removeHandler(handler)
    body = json.loads(response.body)
    assert response.status_code == 500 and body["error"] == "internal error"
    request_id = body["detail"]["request_id"]
    assert any(request_id in r.getMessage() and r.exc_info and "boom" in str(r.exc_info[1]) for r in records)


def test_the_local_batcher_batches_what_waits_and_bounds_the_queue():
    """The one fake: a model that takes 50 ms a call. One client's text goes straight to the model (no
    wait); texts queued together go in one call, up to max_batch_size; a request that would overfill
    the queue is refused."""
    import asyncio
    import time

    from export.serve.local import LocalBatcher, LocalService
    from export.serve.service import Overloaded

    calls: list[list[str]] = []

    class SlowModel:
        def predict(self, texts, batch_size):
            calls.append(list(texts))
            time.sleep(0.05)
            return [t.upper() for t in texts]

    service = object.__new__(LocalService)
    service.opts = ServeOptions(bundle="b", max_batch_size=4, max_texts=4, max_queue=8)
    service.counts = {"model_calls": 0, "texts": 0, "requests": 0, "rejected": 0}
    service.predictor = SlowModel()
    service.batcher = LocalBatcher(service)

    async def scenario():
        service.batcher.start()
        start = time.perf_counter()
        assert await service.submit(["a"]) == ["A"]
        alone = time.perf_counter() - start
        answers = await asyncio.gather(*(service.submit([f"t{i}"]) for i in range(7)))
        assert [a[0] for a in answers] == [f"T{i}" for i in range(7)]  # each request its own answer
        first = asyncio.ensure_future(service.submit(["x1", "x2", "x3", "x4"]))
        await asyncio.sleep(0.01)  # the model is busy with it
        waiting = [asyncio.ensure_future(service.submit(["y1", "y2", "y3", "y4"])) for _ in range(2)]
        await asyncio.sleep(0)
        try:
            await service.submit(["z1"])
            refused = False
        except Overloaded:
            refused = True
        await asyncio.gather(first, *waiting)
        return alone, refused

    alone, refused = asyncio.run(scenario())
    assert calls[0] == ["a"] and alone < 0.045 + 0.05  # no batching wait on top of the model's 50 ms
    assert calls[1] == ["t0", "t1", "t2", "t3"] and calls[2] == ["t4", "t5", "t6"]  # queued together: batched
    assert refused  # 8 texts waiting: the queue is full
    assert service.counts["model_calls"] == len(calls) and service.counts["texts"] == sum(map(len, calls))
