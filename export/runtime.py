"""Serve an exported bundle with onnxruntime, tokenizers and numpy alone (no torch, no transformers).

    from export.runtime import Predictor
    p = Predictor.load("runs/run-7/onnx")
    p.predict(["Mara Okafor joined Kestrel Systems in Port Selwyn."])
    # NER → [[{"label": "PER", "start": 0, "end": 11, "text": "Mara Okafor", "score": 0.99}, ...]]
    # classification → [{"label": "sports", "score": 0.97, "scores": {...}}]

NER aggregation follows the common "first" strategy: each word takes the label predicted on its
first subtoken; B-/I- runs of one type become a span whose score is the mean of its words'
probabilities. Long texts are cut into overlapping windows and every word takes its prediction
from the window where it sits most centrally.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from zeroship.batching import length_sorted_batches
from zeroship.casing import casing_ids_in_text
from zeroship.errors import Problem, ZeroshipError, text_problem
from zeroship.tasks import Task

CUDA_PROVIDERS = ["CUDAExecutionProvider", "CPUExecutionProvider"]
# The Hugging Face ONNX layout (format 2): Transformers.js and other loaders read onnx/model.onnx (dtype fp32),
# onnx/model_quantized.onnx (q8) and onnx/model_fp16.onnx beside config.json and the tokenizer.
FORMAT_VERSION = 2
VARIANT_FILES = {"fp32": "onnx/model.onnx", "optimized": "onnx/model_optimized.onnx",
                 "int8": "onnx/model_quantized.onnx", "fp16": "onnx/model_fp16.onnx"}
# format 1 (bundles exported before 2026-12): every file at the top of the bundle
FORMAT1_VARIANT_FILES = {"fp32": "model.onnx", "optimized": "model_optimized.onnx", "int8": "model_int8.onnx",
                         "fp16": "model_fp16.onnx"}


def variant_files(manifest: dict) -> dict[str, str]:
    """Where each variant's graph is in a bundle of this manifest's format."""
    return FORMAT1_VARIANT_FILES if manifest.get("format_version") == 1 else VARIANT_FILES


def bundle_file_name(name: str) -> bool:
    """A name the manifest may list: a plain file name, or one inside the bundle's onnx/ folder."""
    parts = name.split("/")
    return (0 < len(parts) <= 2 and (len(parts) == 1 or parts[0] == "onnx") and "\\" not in name
            and all(part and part not in (".", "..") and part == Path(part).name for part in parts))


class BundleError(ZeroshipError):
    """The bundle is missing, incomplete or corrupt."""

    def __init__(self, problems: list[Problem] | Problem | str, title: str = ""):
        super().__init__(problems, title)

    def __str__(self) -> str:  # the problem itself: callers quote it inside their own messages
        return "; ".join(map(str, self.problems))


class TextError(ZeroshipError, ValueError):
    """A text cannot be predicted."""

    def __init__(self, problems: list[Problem] | Problem | str, title: str = "", index: int = 0):
        super().__init__(problems, title)
        self.index = index

    def __reduce__(self):
        return type(self), (self.problems, self.title, self.index)


def check_texts(texts: list[str]) -> None:
    """Refuse, naming its index, the first text that is not a string or that the tokenizer cannot take."""
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TextError(Problem(f"text {i}", f"is {type(text).__name__}, not str"), index=i)
        problem = text_problem(text)
        if problem:
            raise TextError(Problem(f"text {i}", problem, "send valid UTF-8 text"), index=i)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


TASKS = tuple(Task)
LOGITS_RANK = {Task.TOKEN: 3, Task.SEQUENCE: 2}  # (batch, [sequence,] labels)
MAX_LENGTH = 1 << 20  # tokens per window: beyond any encoder's positions
RUNTIME_FILES = ("tokenizer.json",)
MODEL_INPUTS = frozenset(
    {"input_ids", "attention_mask", "token_type_ids"}
)  # opened by the runtime besides the model variant
_HEX = frozenset("0123456789abcdef")


def read_manifest(bundle: Path, verify: bool = True) -> dict:
    """The bundle's manifest, checked for shape; with `verify`, every listed file's size and sha256.

    The manifest names every file the runtime opens (tokenizer.json and each variant), and only plain
    names inside the bundle, so a bundle cannot vouch for an unlisted file or point outside itself."""
    path = bundle / "manifest.json"
    if not path.is_file():
        raise BundleError(f"{bundle}: no manifest.json — not a complete zeroship bundle "
                          "(export it with `zeroship export onnx RUN`)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except RecursionError:
        raise BundleError(f"{path}: corrupt manifest (nested too deeply)") from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError, or an integer past the digit limit
        raise BundleError(f"{path}: corrupt manifest ({str(exc).split(';')[0]})") from None
    problem = manifest_problem(manifest)
    if problem:
        raise BundleError(f"{path}: corrupt manifest ({problem}); export the run again")
    if verify:
        for name, info in manifest["files"].items():
            file = bundle / name
            if not file.is_file():
                raise BundleError(f"{file}: listed in the manifest but missing")
            if file.stat().st_size != info["bytes"] or sha256_file(file) != info["sha256"]:
                raise BundleError(f"{file}: sha256 does not match the manifest — the file was changed or "
                                  "damaged; export the run again")
    return manifest


def manifest_problem(manifest: Any) -> str:
    """What is wrong with a manifest's shape ("" when nothing): the fields the runtime reads."""
    def is_int(value: Any, low: int = 0) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= low

    if not isinstance(manifest, dict):
        return f"a JSON object was expected, got {type(manifest).__name__}"
    if manifest.get("format_version") not in (1, FORMAT_VERSION):
        return (f"format_version {manifest.get('format_version')!r} is not 1 or {FORMAT_VERSION} (a newer zeroship "
                "wrote it: update zeroship, or export the run with this one)")
    if manifest.get("task") not in TASKS:
        return f"task {manifest.get('task')!r} is not one of {', '.join(TASKS)}"
    labels = manifest.get("labels")
    if not (isinstance(labels, list) and len(labels) >= 2 and all(isinstance(x, str) for x in labels)):
        return "labels must be a list of at least 2 strings"
    if len(set(labels)) != len(labels) or not all(labels):
        return "labels must be distinct, non-empty strings"
    if manifest.get("task") == Task.TOKEN and not all(
            x == "O" or (x[:2] in ("B-", "I-") and len(x) > 2) for x in labels):
        return "labels of a token_classification bundle must be O, B-TYPE or I-TYPE"
    for key, low, high in (("max_length", 8, MAX_LENGTH), ("stride", 0, MAX_LENGTH), ("pad_token_id", 0, 2**31 - 1)):
        if not (is_int(manifest.get(key), low) and manifest[key] <= high):
            return f"{key} must be an integer from {low} to {high}"
    inputs = manifest.get("inputs")
    if not (isinstance(inputs, dict) and inputs and set(inputs) <= MODEL_INPUTS):
        return f"inputs must name the model's inputs (some of {', '.join(sorted(MODEL_INPUTS))})"
    files = manifest.get("files")
    if not isinstance(files, dict):
        return "files must be a mapping of file name → {sha256, bytes}"
    for name, info in files.items():
        if not isinstance(name, str) or not bundle_file_name(name):
            return f"file name {name!r} is not a plain name inside the bundle (or its onnx/ folder)"
        if not (isinstance(info, dict) and is_int(info.get("bytes")) and isinstance(info.get("sha256"), str)
                and len(info["sha256"]) == 64 and set(info["sha256"]) <= _HEX):
            return f"files[{name!r}] must be {{\"sha256\": 64 hex digits, \"bytes\": an integer}}"
    missing = [name for name in RUNTIME_FILES if name not in files]
    if missing:
        return f"{', '.join(missing)} is not listed in files"
    if not any(f in files for f in variant_files(manifest).values()):
        return "no model variant is listed in files"
    variants = manifest.get("variants", {})
    if not (isinstance(variants, dict) and all(isinstance(v, dict) for v in variants.values())):
        return "variants must be a mapping of variant → {file, ...}"
    if any(not isinstance(v.get("batch_independent", True), bool) for v in variants.values()):
        return "variants[...].batch_independent must be true or false"
    if not isinstance(manifest.get("casing", False), bool):
        return "casing must be true or false"
    return ""


def batch_independent(manifest: dict, variant: str) -> bool:
    """Whether `variant`'s answer for a text is the same whatever is batched with it. Dynamic int8 is not
    (its activation scales are taken over the whole batch); bundles written before the manifest said so
    only had dynamic int8."""
    info = manifest.get("variants", {}).get(variant, {})
    return info.get("batch_independent", variant != "int8")


def softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


def pick_variant(manifest: dict, variant: str, providers: list[str]) -> str:
    available = [v for v, f in variant_files(manifest).items() if f in manifest["files"]]
    if variant != "auto":
        if variant not in available:
            raise BundleError(f"variant {variant!r} is not in this bundle (has: {', '.join(available)})")
        return variant
    on_gpu = providers[0] == "CUDAExecutionProvider"
    order = ["fp16", "optimized", "fp32"] if on_gpu else ["int8", "optimized", "fp32"]
    return next(v for v in order if v in available)


def providers_for(device: str) -> list[str]:
    """onnxruntime providers for "cpu" or "cuda" (CUDA needs the onnxruntime-gpu build)."""
    if device == "cpu":
        return ["CPUExecutionProvider"]
    title = "The device asked for cannot run the model."
    if device != "cuda":
        raise BundleError(f"device {device!r}: use cpu or cuda", title)
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise BundleError(
            "device cuda: this onnxruntime has no CUDA provider (has "
            f"{', '.join(ort.get_available_providers())}); install onnxruntime-gpu instead of onnxruntime", title
        )
    return list(CUDA_PROVIDERS)


def run_bound(session: ort.InferenceSession, feed: dict[str, np.ndarray], output: str = "logits") -> np.ndarray:
    """One call through IO binding: inputs copied to the session's device once, the output allocated
    there by onnxruntime and copied back once (on CUDA this avoids onnxruntime's per-call staging)."""
    device = "cuda" if session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
    io = session.io_binding()
    for name, value in feed.items():
        io.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value), device, 0))
    io.bind_output(output, device)
    session.run_with_iobinding(io)
    return io.copy_outputs_to_cpu()[0]


def make_session(model_path: Path, providers: list[str] | None = None,
                 threads: int | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(model_path), sess_options=options,
                                providers=providers or ["CPUExecutionProvider"])


def plan_batches(lengths: list[int], batch_size: int, pad_slack: int = 16) -> list[list[int]]:
    """Group items into batches of similar length: sort by length, and start a new batch when it is
    full or when the next item would add more than `pad_slack` padding tokens to the batch.

    Padding every batch to its longest member wastes ~65% of the tokens on a random batch of 32
    CoNLL sentences; this cut b=32 latency 1.7x (benchmarks/serve_latency.py, RESULTS.md). Training
    has no slack (its batch size is a hyperparameter); the runtime's is only latency."""
    return length_sorted_batches(range(len(lengths)), lengths, batch_size, pad_slack)


def check_bundle(bundle: Path, manifest: dict, session: ort.InferenceSession, tokenizer: Tokenizer) -> None:
    """The manifest against the model it describes, before any answer: a manifest can pass its hash
    check and still disagree with the graph (edited by hand, or put together from two exports).

    One probe call at the full window — every id the tokenizer can produce, the pad id, every casing
    class — must run and give logits of the task's rank with one column per label; when it fails,
    smaller probes name the field. Raises BundleError (with the field and the fix)."""
    where = str(bundle / "manifest.json")
    fix = "export the run again (zeroship export onnx RUN)"
    task, labels, max_length = manifest["task"], manifest["labels"], manifest["max_length"]
    specials = len(tokenizer.encode("").ids)
    if task == Task.TOKEN and manifest["stride"] >= max_length - specials:
        raise BundleError(Problem(where, f"stride {manifest['stride']} must be below max_length {max_length} − "
                                  f"{specials} special tokens", fix))
    if max_length <= specials:
        raise BundleError(Problem(where, f"max_length {max_length} leaves no room for text", fix))
    unknown = {i.name for i in session.get_inputs()} - MODEL_INPUTS
    if unknown:
        raise BundleError(Problem(f"{bundle}", f"the model takes inputs the runtime does not feed: {sorted(unknown)}"))
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    types = 5 if manifest.get("casing", False) else 1  # zeroship.casing's classes are token types 0-4

    def probe(length: int, ids: list[int], type_id: int) -> np.ndarray | None:
        row = (ids * length)[:length]
        feed = {"input_ids": np.array([row], dtype=np.int64), "attention_mask": np.ones((1, length), dtype=np.int64),
                "token_type_ids": np.full((1, length), type_id, dtype=np.int64)}
        names = {i.name for i in session.get_inputs()}
        quiet = ort.RunOptions()
        quiet.log_severity_level = 4  # a failing probe is an answer here, not an error to log
        try:
            return session.run(["logits"], {k: v for k, v in feed.items() if k in names}, quiet)[0]
        except Exception:  # onnxruntime's own error types: an index outside a table, a shape that cannot broadcast
            return None

    logits = probe(max_length, [vocab - 1, manifest["pad_token_id"], 0], types - 1)
    if logits is None:
        for failed, what in ((probe(2, [0], 0) is None, "the model does not run on a plain input"),
                             (probe(2, [vocab - 1], 0) is None,
                              f"tokenizer.json has {vocab} tokens, more than the model's embedding table"),
                             (probe(2, [manifest["pad_token_id"]], 0) is None,
                              f"pad_token_id {manifest['pad_token_id']} is outside the model's embedding table"),
                             (probe(2, [0], types - 1) is None,
                              f"casing needs {types} token types, more than the model's token-type table"),
                             (True, f"max_length {max_length} is beyond the model's position embeddings")):
            if failed:
                raise BundleError(Problem(where, what, fix))
    assert logits is not None
    if logits.ndim != LOGITS_RANK[task]:
        other = next(t for t, r in LOGITS_RANK.items() if r == logits.ndim) if logits.ndim in (2, 3) else "no"
        raise BundleError(Problem(where, f"task is {task}, but the model's logits have rank {logits.ndim} "
                                  f"(a {other} model)", fix))
    if logits.shape[-1] != len(labels):
        raise BundleError(Problem(where, f"labels lists {len(labels)} labels, but the model has "
                                  f"{logits.shape[-1]} outputs", fix))


class Predictor:
    """A loaded bundle. `predict` is safe to call from several threads at once."""

    def __init__(self, bundle: Path, manifest: dict, session: ort.InferenceSession, tokenizer: Tokenizer,
                 variant: str, io_binding: bool = False):
        self.bundle, self.manifest, self.session, self.variant = bundle, manifest, session, variant
        self.io_binding = io_binding
        self.task: str = manifest["task"]
        self.labels: list[str] = manifest["labels"]
        self.max_length: int = manifest["max_length"]
        self.stride: int = manifest["stride"]
        self.input_names = [i.name for i in session.get_inputs()]
        self.tokenizer = tokenizer
        self.pad_id = manifest["pad_token_id"]
        self.casing: bool = manifest.get("casing", False)  # token types are casing classes (zeroship.casing)
        # a model whose answers depend on the batch (dynamic int8) is fed one window per call, so a text's
        # answer never depends on what else is predicted with it (batch_independent in the manifest)
        self.batch_independent = batch_independent(manifest, variant)

    @classmethod
    def load(cls, bundle_dir: str | Path, providers: list[str] | None = None, variant: str = "auto",
             threads: int | None = None, verify: bool = True, device: str | None = None,
             io_binding: bool | None = None) -> Predictor:
        """`device` "cpu" (default) or "cuda" picks the providers (or pass `providers` yourself);
        on CUDA the model is fed through IO binding unless `io_binding=False`."""
        bundle = Path(bundle_dir)
        if not bundle.is_dir():
            raise BundleError(f"{bundle}: no such bundle folder")
        manifest = read_manifest(bundle, verify=verify)
        providers = providers or providers_for(device or "cpu")
        chosen = pick_variant(manifest, variant, providers)
        try:
            tokenizer = Tokenizer.from_file(str(bundle / "tokenizer.json"))
            session = make_session(bundle / variant_files(manifest)[chosen], providers, threads)
        except BundleError:
            raise
        except Exception as exc:  # onnxruntime / tokenizers raise their own types for bad files
            raise BundleError(f"{bundle}: cannot load ({type(exc).__name__}: {exc})") from None
        tokenizer.no_padding()
        tokenizer.no_truncation()
        check_bundle(bundle, manifest, session, tokenizer)
        tokenizer.enable_truncation(manifest["max_length"],
                                    stride=manifest["stride"] if manifest["task"] == Task.TOKEN else 0)
        on_gpu = session.get_providers()[0] == "CUDAExecutionProvider"
        return cls(bundle, manifest, session, tokenizer, chosen, on_gpu if io_binding is None else io_binding)

    # ------------------------------------------------------------ inference
    def logits(self, encodings: list[Any], batch_size: int = 32,
               type_ids: list[list[int]] | None = None) -> list[np.ndarray]:
        """Run the model on encodings in length-sorted batches (see `plan_batches`; one per call for a
        batch-dependent variant); results come back in the order of `encodings`. `type_ids` replace the
        encodings' own (a casing bundle's, from `type_ids_of`)."""
        out: list[np.ndarray | None] = [None] * len(encodings)
        if not self.batch_independent:
            batch_size = 1
        for idx in plan_batches([len(e.ids) for e in encodings], batch_size):
            chunk = [encodings[i] for i in idx]
            width = max(len(e.ids) for e in chunk)
            feed = {
                "input_ids": np.full((len(chunk), width), self.pad_id, dtype=np.int64),
                "attention_mask": np.zeros((len(chunk), width), dtype=np.int64),
                "token_type_ids": np.zeros((len(chunk), width), dtype=np.int64),
            }
            for row, (i, enc) in enumerate(zip(idx, chunk)):
                n = len(enc.ids)
                feed["input_ids"][row, :n] = enc.ids
                feed["attention_mask"][row, :n] = 1
                feed["token_type_ids"][row, :n] = enc.type_ids if type_ids is None else type_ids[i]
            feed = {k: v for k, v in feed.items() if k in self.input_names}
            result = run_bound(self.session, feed) if self.io_binding else self.session.run(["logits"], feed)[0]
            for row, (i, enc) in enumerate(zip(idx, chunk)):
                out[i] = result[row, : len(enc.ids)] if self.task == Task.TOKEN else result[row]
        return out  # type: ignore[return-value]

    def predict(self, texts: list[str] | str, batch_size: int = 32) -> list[Any]:
        single = isinstance(texts, str)
        texts = [texts] if single else texts
        if not isinstance(texts, (list, tuple)):
            raise TypeError(f"predict() takes a string or a list of strings, got {type(texts).__name__}")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"predict(): item {i} is {type(text).__name__}, not str")
        check_texts(texts)  # a TextError (a ValueError) naming the text; nothing reaches the tokenizer
        if not texts:
            return []
        encodings = self.tokenizer.encode_batch(list(texts))
        if self.task == Task.SEQUENCE:
            types = self.type_ids_of(encodings, texts)
            results = [self._classify(lg) for lg in self.logits(encodings, batch_size, types)]
        else:
            windows, owner = [], []
            for i, enc in enumerate(encodings):
                for window in [enc, *enc.overflowing]:
                    windows.append(window)
                    owner.append(i)
            logits = self.logits(windows, batch_size, self.type_ids_of(windows, [texts[i] for i in owner]))
            per_text: list[list[tuple[Any, np.ndarray]]] = [[] for _ in texts]
            for window, lg, i in zip(windows, logits, owner):
                per_text[i].append((window, lg))
            results = [self._entities(text, parts) for text, parts in zip(texts, per_text)]
        return results[0] if single else results

    def type_ids_of(self, encodings: list[Any], texts: list[str]) -> list[list[int]] | None:
        """A casing bundle's token types: each token's casing class in its text (None otherwise)."""
        if not self.casing:
            return None
        return [casing_ids_in_text(enc.word_ids, enc.offsets, text) for enc, text in zip(encodings, texts)]

    def _classify(self, logits: np.ndarray) -> dict:
        probs = softmax(logits.astype(np.float32))
        best = int(probs.argmax())
        return {"label": self.labels[best], "score": float(probs[best]),
                "scores": {label: float(p) for label, p in zip(self.labels, probs)}}

    def _entities(self, text: str, parts: list[tuple[Any, np.ndarray]]) -> list[dict]:
        # word → (start, end) in characters, and its first subtoken's probabilities (most central window)
        spans: dict[int, list[int]] = {}
        for enc, _ in parts:
            for wid, (s, e) in zip(enc.word_ids, enc.offsets):
                if wid is not None:
                    span = spans.setdefault(wid, [s, e])
                    span[0], span[1] = min(span[0], s), max(span[1], e)
        best: dict[int, tuple[int, np.ndarray]] = {}
        for enc, lg in parts:
            probs = softmax(lg.astype(np.float32))
            n, prev = len(enc.ids), None
            for pos, (wid, (s, _)) in enumerate(zip(enc.word_ids, enc.offsets)):
                first = wid is not None and wid != prev and s == spans[wid][0]
                prev = wid
                if first:
                    centrality = min(pos, n - 1 - pos)
                    if wid not in best or centrality > best[wid][0]:
                        best[wid] = (centrality, probs[pos])
        entities: list[dict] = []
        current: dict | None = None
        for wid in sorted(best):
            probs = best[wid][1]
            k = int(probs.argmax())
            tag = self.labels[k]
            kind = tag[2:] if tag != "O" else None
            continues = current is not None and tag.startswith("I-") and kind == current["label"]
            if continues:
                current["end"] = spans[wid][1]
                current["_scores"].append(float(probs[k]))
                continue
            if current is not None:
                entities.append(current)
                current = None
            if kind is not None:  # B-X, or an I-X that starts a new entity ("simple" strategy)
                current = {"label": kind, "start": spans[wid][0], "end": spans[wid][1], "_scores": [float(probs[k])]}
        if current is not None:
            entities.append(current)
        for ent in entities:
            scores = ent.pop("_scores")
            ent["text"] = text[ent["start"]:ent["end"]]
            ent["score"] = float(np.mean(scores))
        return [{k: e[k] for k in ("label", "start", "end", "text", "score")} for e in entities]
