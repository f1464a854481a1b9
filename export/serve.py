"""`zeroship serve`: an exported bundle behind HTTP on Ray Serve.

Each replica holds one `Predictor` (onnxruntime + tokenizers + numpy: no torch, no transformers).
Texts from concurrent requests are batched together by `serve.batch` (up to `max_batch_size` texts
per model call, waiting at most `batch_wait_ms` for more) and the Predictor sorts each batch by
length. Routes (FastAPI, so /docs and /openapi.json come with it):

    POST /predict   {"texts": [...]} → {"model": {run, variant, sha256}, "predictions": [...]}
    GET  /healthz   the replica is alive
    GET  /readyz    the model is loaded and answered a warm-up call (503 until then)
    GET  /metadata  task, labels, variant, max length, versions (from the bundle's manifest)
    GET  /stats     this replica's model calls, texts and requests (how well batching works)

A bad request gets a 4xx with {"error", "detail"} and never reaches the model; anything unexpected
is a 500 with a request id that the replica's log repeats next to the traceback.

`build_app(args)` is also the application builder that `serve deploy` imports from a config file
(`zeroship serve --config-only`).
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures' annotations at
# runtime, and under Serve's ingress a string "Request" is taken for a query parameter.
import asyncio
import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, model_validator
from ray import serve

from export.runtime import VARIANT_FILES, Predictor

logger = logging.getLogger("ray.serve")

APP_NAME = "zeroship"


class ServeOptions(BaseModel):
    """Everything a replica needs; also the `args` of the Serve config file."""

    bundle: str
    variant: str = "auto"
    threads_per_replica: int = Field(1, ge=1, le=256)
    replicas: int = Field(1, ge=1, le=1024)
    autoscale: tuple[int, int] | None = None  # (min, max) replicas, scaled on ongoing requests
    max_batch_size: int = Field(32, ge=1, le=4096)
    batch_wait_ms: float = Field(5.0, ge=0, le=10_000)
    max_texts: int = Field(256, ge=1, le=100_000)  # texts per request
    max_chars: int = Field(20_000, ge=1, le=10_000_000)  # characters per text

    @model_validator(mode="after")
    def _autoscale_range(self) -> "ServeOptions":
        if self.autoscale is not None and not 0 <= self.autoscale[0] <= self.autoscale[1] >= 1:
            raise ValueError(f"autoscale: need 0 <= MIN <= MAX and MAX >= 1, got {self.autoscale}")
        return self


class RequestError(Exception):
    def __init__(self, status: int, error: str, detail: Any):
        super().__init__(error)
        self.status, self.error, self.detail = status, error, detail


def parse_texts(body: bytes, max_texts: int, max_chars: int) -> list[str]:
    """The texts of a /predict body, or a RequestError that says what is wrong with it."""
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise RequestError(400, "malformed JSON", str(exc)[:200]) from None
    if not isinstance(payload, dict):
        raise RequestError(422, "expected a JSON object", 'send {"texts": ["...", ...]}')
    extra = sorted(set(payload) - {"texts"})
    if extra:
        raise RequestError(422, "unknown fields", {"fields": extra[:10], "allowed": ["texts"]})
    texts = payload.get("texts")
    if not isinstance(texts, list):
        raise RequestError(422, "texts must be a list of strings", 'send {"texts": ["...", ...]}')
    if not texts:
        raise RequestError(422, "texts is empty", "send at least one text")
    if len(texts) > max_texts:
        raise RequestError(413, "too many texts", {"got": len(texts), "limit": max_texts})
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise RequestError(422, "texts must be a list of strings", {"index": i, "got": type(text).__name__})
        if len(text) > max_chars:
            raise RequestError(413, "text too long", {"index": i, "chars": len(text), "limit": max_chars})
    return texts


def error_response(status: int, error: str, detail: Any) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status)


api = FastAPI(title="zeroship", description="Predictions from an exported zeroship bundle.")


@serve.deployment(name="BundleServer", health_check_period_s=5)
@serve.ingress(api)
class BundleServer:
    def __init__(self, options: dict):
        self.opts = ServeOptions(**options)
        self.predictor = Predictor.load(self.opts.bundle, variant=self.opts.variant,
                                        threads=self.opts.threads_per_replica)
        manifest = self.predictor.manifest
        model_file = VARIANT_FILES[self.predictor.variant]
        self.model_info = {"run": manifest.get("run"), "variant": self.predictor.variant,
                           "sha256": manifest["files"][model_file]["sha256"]}
        self._batch.set_max_batch_size(self.opts.max_batch_size)
        self._batch.set_batch_wait_timeout_s(self.opts.batch_wait_ms / 1000)
        self.counts = {"model_calls": 0, "texts": 0, "requests": 0}
        self.predictor.predict(["warm up"])  # /readyz answers only once the model has answered
        self.ready = True

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _batch(self, texts: list[str]) -> list[Any]:
        """One model call for the texts of every request that arrived within the wait."""
        self.counts["model_calls"] += 1
        self.counts["texts"] += len(texts)
        # the Predictor is CPU-bound: run it off the event loop, so health checks still answer
        return await asyncio.to_thread(self.predictor.predict, list(texts), self.opts.max_batch_size)

    @api.post("/predict")
    async def predict(self, request: Request) -> JSONResponse:
        try:
            texts = parse_texts(await request.body(), self.opts.max_texts, self.opts.max_chars)
            self.counts["requests"] += 1
            predictions = await asyncio.gather(*(self._batch(t) for t in texts))
            return JSONResponse({"model": self.model_info, "predictions": predictions})
        except RequestError as exc:
            return error_response(exc.status, exc.error, exc.detail)
        except Exception:
            request_id = uuid.uuid4().hex[:12]
            logger.exception("request %s failed", request_id)
            return error_response(500, "internal error", {"request_id": request_id})

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz(self) -> JSONResponse:
        if not getattr(self, "ready", False):
            return error_response(503, "not ready", "the model is still loading")
        return JSONResponse({"status": "ready", "model": self.model_info})

    @api.get("/metadata")
    async def metadata(self) -> dict:
        m = self.predictor.manifest
        return {"model": self.model_info, "task": m["task"], "labels": m["labels"], "metric": m.get("metric"),
                "max_length": m["max_length"], "stride": m["stride"], "versions": m.get("versions", {}),
                "limits": {"max_texts": self.opts.max_texts, "max_chars": self.opts.max_chars},
                "batching": {"max_batch_size": self.opts.max_batch_size, "batch_wait_ms": self.opts.batch_wait_ms}}

    @api.get("/stats")
    async def stats(self) -> dict:
        calls = self.counts["model_calls"]
        return {**self.counts, "mean_texts_per_call": self.counts["texts"] / calls if calls else 0.0}

    def check_health(self) -> None:  # Serve restarts a replica whose model is gone
        if self.predictor is None:
            raise RuntimeError("no model loaded")


def build_app(args: dict) -> serve.Application:
    """The Serve application for these options (the application builder `serve deploy` calls)."""
    opts = ServeOptions(**args)
    scaling: dict[str, Any] = {"num_replicas": opts.replicas}
    if opts.autoscale is not None:
        lo, hi = opts.autoscale
        scaling = {"autoscaling_config": {"min_replicas": lo, "max_replicas": hi, "initial_replicas": max(lo, 1),
                                          "target_ongoing_requests": 2 * opts.max_batch_size}}
    deployment = BundleServer.options(ray_actor_options={"num_cpus": opts.threads_per_replica},
                                      max_ongoing_requests=4 * opts.max_batch_size, **scaling)
    return deployment.bind(opts.model_dump())


def config_yaml(opts: ServeOptions, host: str, port: int) -> str:
    """A Ray Serve config file that `serve deploy` runs on an existing cluster (the bundle path must
    be readable on every node: shared storage)."""
    import yaml

    args = opts.model_dump()
    args["bundle"] = str(Path(opts.bundle).resolve())
    if args["autoscale"] is not None:
        args["autoscale"] = list(args["autoscale"])
    config = {"proxy_location": "EveryNode", "http_options": {"host": host, "port": port},
              "applications": [{"name": APP_NAME, "route_prefix": "/", "import_path": "export.serve:build_app",
                                "args": args}]}
    return yaml.safe_dump(config, sort_keys=False)


def run_forever(opts: ServeOptions, host: str, port: int, say) -> int:
    """Start the application on Ray (joined or local), print where, serve until SIGINT/SIGTERM.
    Ctrl-C at any point after Ray is up, start-up included, shuts Serve down and exits 0."""
    import signal

    import ray

    from launcher.ray_session import init_ray

    def stop(*_):
        raise KeyboardInterrupt

    where = init_ray()
    signal.signal(signal.SIGTERM, stop)
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(build_app(opts.model_dump()), name=APP_NAME, route_prefix="/", blocking=False)
        url = f"http://{host}:{port}"
        say(f"serving {opts.bundle} on {where}: {url}")
        say(f"  POST {url}/predict  GET {url}/healthz {url}/readyz {url}/metadata {url}/stats  docs: {url}/docs")
        say("  Ctrl-C stops it")
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        say("shutting down")
    finally:  # a second Ctrl-C must not cut the shutdown short (and leave the port taken)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if where.startswith("cluster"):
            serve.delete(APP_NAME)  # only this application: others on the cluster keep serving
        else:
            serve.shutdown()
        ray.shutdown()
    return 0
