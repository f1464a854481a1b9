"""int8 variants of an exported graph, held to the run's metric budget.

Two methods, both with per-channel int8 weights:

- dynamic (`quantize_dynamic`): activations are quantized on every call with one scale per tensor, taken
  over the whole batch, so a text's answer can change with what is batched beside it. The runtime
  therefore feeds a dynamic-int8 model one window per call (manifest: `"batch_independent": false`).
- static (QDQ, `quantize_static`): activation ranges are calibrated once (MinMax) on a sample of the
  *training* split and frozen into the graph: answers do not depend on neighbours, so it is batched.

Either one over budget gets its most sensitive nodes kept in fp32 (`nodes_to_exclude`). Sensitivity of a
node = the KL divergence of the validation logits from fp32 when that node alone is quantized, on a few
batches. Divergence rather than the metric: on a validation split of a few hundred sentences the metric
is a step function (most single nodes change no argmax at all) and ranks nothing, while the divergence is
continuous and cheap. The search then excludes the k most sensitive nodes, k found by doubling and then
bisection (at most about 2·log2(N) evaluations on the full validation split), up to half the nodes —
beyond that an "int8" model is mostly fp32 and the export fails instead, naming the best drop reached.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from export.runtime import make_session, plan_batches

METHODS = ("dynamic", "static")
SENSITIVITY_BATCHES = 4  # validation batches scored per node for the sensitivity ranking
MAX_EXCLUDED_SHARE = 0.5  # beyond half the nodes in fp32 an "int8" model is mostly fp32: fail instead
CALIBRATION_WINDOWS = 256  # training windows the static ranges are calibrated on
CALIBRATION_BATCH = 16
# ops each method quantizes (those with a weight initializer; MatMul only with a constant B)
DYNAMIC_OPS = ("MatMul", "Attention", "Gather", "EmbedLayerNormalization")
STATIC_OPS = ("MatMul", "Gemm")


@dataclass
class Int8Result:
    """One method's outcome: the model file, its validation metrics and drop, what stayed in fp32."""

    method: str
    path: Path
    metrics: dict
    drop: float
    excluded: list[dict] = field(default_factory=list)  # [{"node", "kl"}], most sensitive first
    search: list[dict] = field(default_factory=list)  # [{"excluded": k, "drop": points}] in the order tried
    ms_per_window: float = math.inf  # set by `fastest`

    @property
    def batch_independent(self) -> bool:
        return self.method == "static"

    def summary(self, budget: float) -> dict:
        return {
            "drop": round(self.drop, 4),
            "within_budget": self.drop <= budget,
            "kept_fp32": [e["node"] for e in self.excluded],
            "ms_per_window": round(self.ms_per_window, 4) if math.isfinite(self.ms_per_window) else None,
            "batch_independent": self.batch_independent,
        }


class Int8Builder:
    """Quantizes `src` (an fp32 or fused ONNX graph) with either method and holds each to `budget`.

    `evaluate(path)` → (validation metrics, drop in points) for a candidate model; `sample` are feeds of a
    few validation batches (with their real-position masks) for the sensitivity ranking; `calibration`
    are feeds from the training split; `serve_feeds(batch_independent)` are validation windows batched as
    the runtime would batch them, for timing."""

    def __init__(self, src: Path, folder: Path, evaluate: Callable[[Path], tuple[dict, float]],
                 sample: list[tuple[dict, np.ndarray]], calibration: list[dict],
                 serve_feeds: Callable[[bool], list[dict]], budget: float, log: Callable[[str], None]):
        self.src, self.folder, self.evaluate, self.sample = src, folder, evaluate, sample
        self.calibration, self.serve_feeds, self.budget, self.log = calibration, serve_feeds, budget, log
        self._reference: list[np.ndarray] | None = None
        self._tried = 0

    # ------------------------------------------------------------ quantization
    def candidates(self, method: str) -> list[str]:
        """Names of the nodes `method` quantizes: the ops it handles that carry a weight initializer."""
        import onnx

        graph = onnx.load(str(self.src), load_external_data=False).graph
        weights = {init.name for init in graph.initializer}
        ops = DYNAMIC_OPS if method == "dynamic" else STATIC_OPS
        names = []
        for node in graph.node:
            if node.op_type not in ops:
                continue
            has_weight = (node.input[1] in weights if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1
                          else any(i in weights for i in node.input))
            if has_weight:
                names.append(node.name)
        return names

    def quantize(self, method: str, dst: Path, exclude: list[str] | None = None,
                 only: list[str] | None = None) -> Path:
        import onnx

        # DefaultTensorType: without it, an ORT-optimized graph fails with "Unable to find data type".
        extra = {"DefaultTensorType": onnx.TensorProto.FLOAT}
        with _quiet():
            return self._quantize(method, dst, exclude, only, extra)

    def _quantize(self, method, dst, exclude, only, extra) -> Path:
        from onnxruntime.quantization import (
            CalibrationDataReader,
            QuantFormat,
            QuantType,
            quantize_dynamic,
            quantize_static,
        )

        if method == "dynamic":
            # per-channel: per-tensor scales cost 0.65 F1 points on CoNLL-2003 validation (RESULTS.md)
            quantize_dynamic(str(self.src), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                             nodes_to_quantize=only, nodes_to_exclude=exclude, extra_options=extra)
            return dst
        feeds = self.calibration

        class Reader(CalibrationDataReader):
            def __init__(self):
                self._it = iter(feeds)

            def get_next(self):
                return next(self._it, None)

        # uint8 activations × int8 weights with 7-bit weights: onnxruntime's advice for x86 without VNNI
        # (its u8s8 kernels can saturate otherwise); constant-B MatMuls only — the attention products of
        # two activations stay fp32. The ranges depend on the graph and the op types, not on which nodes
        # are quantized: calibrated once, every later candidate (the ranking quantizes each node alone)
        # reads them from onnxruntime's calibration cache instead of running the calibration data again.
        quantize_static(str(self.src), str(dst), Reader(), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=list(STATIC_OPS), per_channel=True, reduce_range=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        nodes_to_quantize=only, nodes_to_exclude=exclude,
                        extra_options={**extra, "MatMulConstBOnly": True},
                        calibration_cache_path=str(self.calibration_cache))
        return dst

    @property
    def calibration_cache(self) -> Path:
        """Where the static ranges of `src` are kept between candidates (inside the work folder)."""
        return self.folder / f".calibration-{self.src.stem}.json"

    # ------------------------------------------------------------ sensitivity
    def logits(self, path: Path) -> list[np.ndarray]:
        session = make_session(path)
        return [session.run(["logits"], feed)[0][mask] for feed, mask in self.sample]

    def divergence(self, path: Path) -> float:
        """Mean KL(fp32 ‖ candidate) over the real positions of the sample batches."""
        if self._reference is None:
            self._reference = self.logits(self.src)
        total, count = 0.0, 0
        for ref, got in zip(self._reference, self.logits(path)):
            p, logq = _log_softmax(ref), _log_softmax(got)
            total += float((np.exp(p) * (p - logq)).sum())
            count += ref.shape[0]
        return total / max(count, 1)

    def sensitivity(self, method: str) -> list[dict]:
        """Every candidate node quantized alone, most sensitive first."""
        scores = []
        probe = self.folder / f".probe_{method}.onnx"
        for node in self.candidates(method):
            self.quantize(method, probe, only=[node])
            scores.append({"node": node, "kl": self.divergence(probe)})
        probe.unlink(missing_ok=True)
        return sorted(scores, key=lambda s: -s["kl"])

    # ------------------------------------------------------------ the budget
    def build(self, method: str, dst: Path) -> Int8Result:
        """Plain `method` int8; if over budget, the smallest sensitivity-ordered exclusion that meets it."""
        self.quantize(method, dst)
        metrics, drop = self.evaluate(dst)
        result = Int8Result(method, dst, metrics, drop, search=[{"excluded": 0, "drop": round(drop, 4)}])
        self.log(f"int8 {method}: drop {drop:+.2f} points (budget {self.budget:g})")
        if drop > self.budget:
            result = self._search(method, dst, result)
        return result

    def _search(self, method: str, dst: Path, plain: Int8Result) -> Int8Result:
        if int(len(self.candidates(method)) * MAX_EXCLUDED_SHARE) < 1:
            return plain
        started = time.time()
        ranked = self.sensitivity(method)
        top = ", ".join(f"{s['node']} ({s['kl']:.2e})" for s in ranked[:3])
        self.log(f"int8 {method}: over budget; ranked {len(ranked)} nodes by KL divergence from fp32 in "
                 f"{time.time() - started:.0f}s; most sensitive: {top}")
        limit = int(len(ranked) * MAX_EXCLUDED_SHARE)
        search = list(plain.search)
        tried: dict[int, tuple[dict, float]] = {}
        trial = self.folder / f".search_{method}.onnx"

        def attempt(k: int) -> bool:
            self.quantize(method, trial, exclude=[s["node"] for s in ranked[:k]])
            tried[k] = self.evaluate(trial)
            search.append({"excluded": k, "drop": round(tried[k][1], 4)})
            self.log(f"int8 {method}: {k} node{'s' * (k != 1)} in fp32 → drop {tried[k][1]:+.2f} points")
            if tried[k][1] <= self.budget:
                trial.replace(dst)  # keep the best passing model so far
                return True
            return False

        good = smallest_passing(limit, attempt)
        trial.unlink(missing_ok=True)
        if good is None:  # over budget even so: the caller fails the export, naming the best drop reached
            best = min(tried, key=lambda i: tried[i][1]) if tried else 0
            drop = tried[best][1] if tried else plain.drop
            return Int8Result(method, dst, {}, drop, ranked[:best], search)
        metrics, drop = tried[good]  # dst holds this model: only a success writes it, and `good` is the last
        return Int8Result(method, dst, metrics, drop, ranked[:good], search)

    # ------------------------------------------------------------ speed
    def time(self, path: Path, batch_independent: bool, repeats: int = 1) -> float:
        """Milliseconds per validation window, fed as the runtime feeds this kind of model."""
        session = make_session(path)
        feeds = self.serve_feeds(batch_independent)
        windows = sum(next(iter(f.values())).shape[0] for f in feeds)
        best = math.inf
        for _ in range(repeats):
            started = time.perf_counter()
            for feed in feeds:
                session.run(["logits"], feed)
            best = min(best, time.perf_counter() - started)
        return 1000 * best / max(windows, 1)


def fastest(results: list[tuple[Int8Builder, Int8Result]], rounds: int = 3) -> Int8Result:
    """Times each model as the runtime feeds it, round-robin so that a busy moment of the machine does
    not land on one method only (best of `rounds`), and returns the fastest."""
    for _ in range(rounds):
        for builder, result in results:
            result.ms_per_window = min(result.ms_per_window, builder.time(result.path, result.batch_independent))
    return min((result for _, result in results), key=lambda r: r.ms_per_window)


def smallest_passing(limit: int, passes: Callable[[int], bool]) -> int | None:
    """The smallest k in 1..limit with passes(k), assuming that excluding more never hurts: doubling
    (1, 2, 4, ... limit) to the first success, then bisection between it and the last failure. At most
    about 2·log2(limit) + 2 calls; None when even `limit` fails."""
    good, bad, k = None, 0, 1
    while k <= limit:
        if passes(k):
            good = k
            break
        bad, k = k, (limit if k < limit < 2 * k else 2 * k)
    while good is not None and good - bad > 1:
        mid = (good + bad) // 2
        if passes(mid):
            good = mid
        else:
            bad = mid
    return good


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The quantizer's advice ("consider pre-processing", on the root logger) and its calibration
    sessions' notices ("Removing initializer ...") are noise on the export's console."""
    import onnxruntime

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    onnxruntime.set_default_logger_severity(3)
    try:
        yield
    finally:
        root.setLevel(level)
        onnxruntime.set_default_logger_severity(2)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def sample_indices(n: int, k: int, seed: int) -> list[int]:
    """k of n indices, the same for the same seed (calibration sample of the training split)."""
    return sorted(random.Random(seed).sample(range(n), min(k, n)))


def pad_feeds(rows: list[dict[str, list[int]]], names: list[str], pad_id: int, batch_size: int) -> list[dict]:
    """Length-grouped, padded numpy feeds (the runtime's own batching) from token-id rows."""
    feeds = []
    for idx in plan_batches([len(r["input_ids"]) for r in rows], batch_size):
        width = max(len(rows[i]["input_ids"]) for i in idx)
        feed = {}
        for name in names:
            fill = pad_id if name == "input_ids" else 0
            feed[name] = np.full((len(idx), width), fill, dtype=np.int64)
            for row, i in enumerate(idx):
                values = rows[i].get(name) or [0] * len(rows[i]["input_ids"])
                feed[name][row, :len(values)] = values
        feeds.append(feed)
    return feeds
