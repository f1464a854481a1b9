"""What `zeroship serve` does with a request, whichever runner serves it (export.serve.local in this
process on one box, export.serve.ray_serve on Ray Serve): the options, the body parser, the routes' logic and
the counters. One app, two runners: both expose these routes through FastAPI with the same answers.

    POST /predict   {"texts": [...]} → {"model": {run, variant, sha256}, "predictions": [...]}
    GET  /healthz   the server is alive
    GET  /readyz    the model is loaded and answered a warm-up call (503 until then, and once stopping)
    GET  /metadata  task, labels, variant, device and provider, max length, limits, versions
    GET  /stats     model calls, texts, requests, texts per call, queue depth, rejected requests

A bad request gets a 4xx with {"error", "detail"} and never reaches the model (a text the tokenizer
cannot take is a 422 naming its index); more texts waiting than `max_queue` is a 503 with Retry-After;
anything unexpected is a 500 with a request id that the log repeats next to the traceback. When a
batched model call fails, its texts are predicted one by one, so only the request whose text fails
gets the 500.
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures' annotations at
# runtime, and under Serve's ingress a string "Request" is taken for a query parameter.
import json
import logging
import os
import uuid
from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, model_validator

from export.runtime import Predictor, TextError, text_problem, variant_files
from zeroship.errors import ZeroshipError


class ServeOptions(BaseModel):
    """Everything a replica needs; also the `args` of the Serve config file."""

    bundle: str
    variant: str = "auto"
    device: Literal["cpu", "cuda"] = "cpu"  # onnxruntime's provider (cuda: onnxruntime-gpu; a GPU per Serve replica)
    threads_per_replica: int = Field(1, ge=1, le=256)
    replicas: int = Field(1, ge=1, le=1024)
    autoscale: tuple[int, int] | None = None  # (min, max) replicas, scaled on ongoing requests
    max_batch_size: int = Field(32, ge=1, le=4096)
    batch_wait_ms: float = Field(5.0, ge=0, le=10_000)
    max_texts: int = Field(256, ge=1, le=100_000)  # texts per request
    max_chars: int = Field(20_000, ge=1, le=10_000_000)  # characters per text
    max_queue: int = Field(512, ge=1, le=1_000_000)  # texts waiting for the model; beyond it 503 + Retry-After
    access_log: bool = False  # Ray Serve's per-request log lines (-v); the local runner writes its own
    ready_file: str | None = None  # set by run_forever on a private Ray: /readyz is 503 once it is gone

    @model_validator(mode="after")
    def _queue_holds_a_request(self) -> "ServeOptions":
        if self.max_queue < self.max_texts:
            raise ValueError(f"max_queue ({self.max_queue}) must hold one whole request (max_texts {self.max_texts})")
        return self

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
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, not UTF-8, an integer past 4300 digits
        raise RequestError(400, "malformed JSON", str(exc).split(";")[0][:200]) from None
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
        problem = text_problem(text)
        if problem:  # a lone surrogate ("\\ud800" is legal JSON) would fail the tokenizer for the whole batch
            raise RequestError(422, "invalid text", {"index": i, "problem": problem})
    return texts


def predict_isolated(predict, texts: list[str], batch_size: int) -> list[Any]:
    """`predict(texts)`, one result per text; when the batched call fails, each text is predicted on its
    own and a text that still fails gets its exception in place of a result, so texts batched together
    from other requests are still answered."""
    try:
        return predict(texts, batch_size)
    except Exception:
        results: list[Any] = []
        for text in texts:
            try:
                results.append(predict([text], batch_size)[0])
            except Exception as exc:
                results.append(exc)
        return results


def error_response(status: int, error: str, detail: Any, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status, headers=headers)


class ServeError(ZeroshipError):
    """zeroship serve cannot start with these options."""


class Overloaded(Exception):
    """More texts are waiting for the model than the queue holds."""


class BundleService:
    """A loaded bundle and what the routes answer. A runner supplies `submit(texts)` (the model call for
    a request's texts, batched with other requests' as it sees fit) and may add to `stats`."""

    log = logging.getLogger("zeroship.serve")

    def load(self, options: dict) -> None:
        self.opts = ServeOptions(**options)
        self.predictor = Predictor.load(self.opts.bundle, variant=self.opts.variant, device=self.opts.device,
                                        threads=self.opts.threads_per_replica)
        manifest = self.predictor.manifest
        model_file = variant_files(manifest)[self.predictor.variant]
        self.model_info = {"run": manifest.get("run"), "variant": self.predictor.variant,
                           "sha256": manifest["files"][model_file]["sha256"]}
        self.provider = self.predictor.session.get_providers()[0]  # what really runs it (/metadata)
        self.counts = {"model_calls": 0, "texts": 0, "requests": 0, "rejected": 0}
        self.predictor.predict(["warm up"])  # /readyz answers only once the model has answered
        self.ready = True

    async def submit(self, texts: list[str]) -> list[Any]:
        raise NotImplementedError

    async def handle_predict(self, body: bytes, request_id: str | None = None) -> JSONResponse:
        try:
            texts = parse_texts(body, self.opts.max_texts, self.opts.max_chars)
            self.counts["requests"] += 1
            predictions = await self.submit(texts)
            failed = next((p for p in predictions if isinstance(p, Exception)), None)
            if failed is not None:
                raise failed
            return JSONResponse({"model": self.model_info, "predictions": predictions})
        except RequestError as exc:
            return error_response(exc.status, exc.error, exc.detail)
        except TextError as exc:
            return error_response(422, "invalid text", {"index": exc.index, "problem": exc.problems[0].what})
        except Overloaded as exc:
            self.counts["rejected"] += 1
            return error_response(503, "overloaded", str(exc), headers={"Retry-After": "1"})
        except Exception:
            request_id = request_id or uuid.uuid4().hex[:12]
            self.log.exception("request %s failed", request_id)
            return error_response(500, "internal error", {"request_id": request_id})

    def readyz(self) -> JSONResponse:
        if not getattr(self, "ready", False):
            return error_response(503, "not ready", "the model is still loading")
        if self.opts.ready_file is not None and not os.path.exists(self.opts.ready_file):
            return error_response(503, "not ready", "the server is stopping")
        return JSONResponse({"status": "ready", "model": self.model_info})

    def metadata(self) -> dict:
        m = self.predictor.manifest
        return {"model": self.model_info, "device": self.opts.device, "provider": self.provider,
                "task": m["task"], "labels": m["labels"], "metric": m.get("metric"),
                "max_length": m["max_length"], "stride": m["stride"], "versions": m.get("versions", {}),
                "limits": {"max_texts": self.opts.max_texts, "max_chars": self.opts.max_chars,
                           "max_queue": self.opts.max_queue},
                "batching": {"max_batch_size": self.opts.max_batch_size, "batch_wait_ms": self.opts.batch_wait_ms}}

    def stats(self) -> dict:
        calls = self.counts["model_calls"]
        return {**self.counts, "mean_texts_per_call": self.counts["texts"] / calls if calls else 0.0}
