"""A run's `best/` → a verified ONNX bundle.

Steps: rebuild the model (eager attention, so onnxruntime's BERT fusions can match the graph) →
`torch.onnx.export` with dynamic batch/sequence axes → `onnx.checker` → parity against PyTorch on
real validation batches (fp32 must agree to 1e-4 with identical argmax, else the export fails) →
optional fusions / int8 / fp16, each re-evaluated on the validation split and held to the metric
budget (int8: see export/quantize.py) → bundle written into a temp folder and renamed into place only
when complete, manifest last.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from export.quantize import (
    CALIBRATION_WINDOWS,
    METHODS,
    SENSITIVITY_BATCHES,
    Int8Builder,
    fastest,
    pad_feeds,
    sample_indices,
)
from export.runtime import FORMAT_VERSION, VARIANT_FILES, make_session, manifest_problem, run_bound, sha256_file
from launcher.data.features import Feature, encode, length_grouped_batches
from launcher.data.parse import load_dataset
from launcher.eval.evaluate import evaluate_features
from launcher.nn.model import ZeroshipModel, load_model
from launcher.runs.registry import Registry, Run
from zeroship.errors import ExportError, Problem
from zeroship.tasks import Task

PARITY_MAX_ABS = 1e-4
# fp16 rounds logits to ~3 significant digits, which can flip a near-tie: the variant must agree with
# PyTorch's argmax on this share of positions (its metric drop is gated separately)
FP16_MIN_AGREEMENT = 0.99
# int8 is held to the metric budget; this floor on argmax agreement with PyTorch (on labelled positions)
# catches a broken graph whose metric happens to survive
INT8_MIN_AGREEMENT = 0.97
DEFAULT_MAX_METRIC_DROP = 0.5  # points of the run's metric (× 100)
OUTPUT = "logits"
BESIDE_FILES = {"manifest.json", "bench.json"}  # written into a bundle by zeroship but not listed in it


class ParityError(Exception):
    """The exported graph does not compute what the PyTorch model computes (exit 1: not the user's fault)."""


@dataclass
class ExportOptions:
    out: Path | None = None
    opset: int = 17
    optimize: bool = False
    quantize: str | None = None  # "int8" (the faster of dynamic/static within budget), "int8-dynamic", "int8-static"
    fp16: bool = False
    max_length: int | None = None
    max_metric_drop: float = DEFAULT_MAX_METRIC_DROP
    parity_batches: int = 8
    log: Any = print


@dataclass
class Validation:
    """The run's validation split, tokenized as in training."""

    examples: list
    features: list[Feature]
    batches: list[list[int]]
    metric: str
    calibration: list[Feature] = field(default_factory=list)  # a seeded sample of the training split
    test: Validation | None = None  # the run's test split, tokenized the same way (scored for the model card)


def resolve_run(run_id: str, runs_dir: str | Path) -> Run:
    run = Registry(runs_dir).get(run_id)
    status = run.status()
    if status.get("state") != "succeeded":
        raise ExportError(Problem(run.id, f"run state is {status.get('state')!r}, not 'succeeded'",
                                  "export a finished run (see `zeroship runs`)"))
    if not (run.best_dir / "model.json").is_file():
        raise ExportError(Problem(str(run.best_dir), "missing: this run has no winning checkpoint"))
    return run


def load_validation(run: Run, meta: dict, tokenizer, max_length: int, batch_size: int = 16,
                    log=lambda msg: None) -> Validation:
    import yaml

    recipe = yaml.safe_load((run.dir / "recipe.yaml").read_text())
    recorded, notes = run.recorded_data()
    for note in notes:
        log(note)
    data = dict(recorded, labels=meta["labels"])
    ds = load_dataset(data, meta["task"], sample="train")  # train only for its format: at most its first MB
    casing = bool(meta.get("casing"))

    def encoded(examples: list) -> tuple[list, list[Feature], list[list[int]]]:
        feats = encode(meta["task"], tokenizer, examples, meta["labels"], max_length, meta["stride"], casing)
        return examples, feats, length_grouped_batches([len(f.input_ids) for f in feats], batch_size, 0, shuffle=False)

    examples, feats, batches = encoded(ds.splits["validation"].examples)
    metric = meta.get("metric") or "eval_f1"
    test = Validation(*encoded(ds.splits["test"].examples), metric) if "test" in ds.splits else None
    train = ds.splits["train"].examples
    seed = int(recipe.get("train", {}).get("seed", 0))
    picked = [train[i] for i in sample_indices(len(train), CALIBRATION_WINDOWS, seed)]
    calibration = encode(meta["task"], tokenizer, picked, meta["labels"], max_length, meta["stride"], casing)
    return Validation(examples, feats, batches, metric, calibration[:CALIBRATION_WINDOWS], test)


def export_graph(model: ZeroshipModel, path: Path, opset: int) -> list[str]:
    """TorchScript-based exporter (dynamo=False): its graph is the one ORT's BERT fusions recognise."""
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if model.uses_token_type_ids else [])
    dummy = tuple(torch.ones(2, 8, dtype=torch.long) if n != "token_type_ids" else torch.zeros(2, 8, dtype=torch.long)
                  for n in names)
    axes = {n: {0: "batch", 1: "sequence"} for n in names}
    axes[OUTPUT] = {0: "batch", 1: "sequence"} if model.task == Task.TOKEN else {0: "batch"}
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, dummy, str(path), input_names=names, output_names=[OUTPUT],
                          dynamic_axes=axes, opset_version=opset, dynamo=False, do_constant_folding=True)
    return names


def ort_forward(session, names: list[str], io_binding: bool = False):
    """A forward function over an onnxruntime session with the torch model's call signature (CPU
    tensors in and out; with `io_binding` the session's device is fed through IO binding)."""
    def forward(input_ids, attention_mask, token_type_ids=None):
        feed = {"input_ids": input_ids.cpu().numpy(), "attention_mask": attention_mask.cpu().numpy()}
        if "token_type_ids" in names:
            feed["token_type_ids"] = (token_type_ids if token_type_ids is not None
                                      else torch.zeros_like(input_ids)).cpu().numpy()
        out = run_bound(session, feed, OUTPUT) if io_binding else session.run([OUTPUT], feed)[0]
        return torch.from_numpy(out.astype(np.float32))
    return forward


def fp16_session(path: Path):
    """The fp16 variant is for GPUs: checked on onnxruntime's CUDA provider (with IO binding) when
    this machine has one, else on the CPU provider."""
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        session = make_session(path, ["CUDAExecutionProvider", "CPUExecutionProvider"])
        return session, session.get_providers()[0]
    return make_session(path), "CPUExecutionProvider"


def check_parity(model: ZeroshipModel, session, names: list[str], val: Validation, pad_id: int,
                 n_batches: int, io_binding: bool = False, labelled_only: bool = False) -> dict:
    """Max |Δ logits| and argmax agreement over real (unpadded) positions of validation batches; with
    `labelled_only`, over the positions that carry a label (NER: each word's first subtoken), the only
    ones whose argmax reaches an answer — the rest were never trained and hold near-ties."""
    from launcher.data.features import collate
    from launcher.nn.device import module_device, to_device

    forward = ort_forward(session, names, io_binding)
    device = module_device(model)
    max_diff, agree, total = 0.0, 0, 0
    batches = val.batches[:n_batches]
    with torch.no_grad():
        for ids in batches:
            batch = collate([val.features[i] for i in ids], pad_id, model.uses_token_type_ids)
            labels = batch.pop("labels")
            ref = model(**to_device(batch, device)).float().cpu()
            got = forward(**batch)
            if model.task == Task.TOKEN:
                mask = (labels != -100) if labelled_only else batch["attention_mask"].bool()
                ref, got = ref[mask], got[mask]
            max_diff = max(max_diff, float((ref - got).abs().max()))
            agree += int((ref.argmax(-1) == got.argmax(-1)).sum())
            total += int(ref.shape[0])
    return {"max_abs_diff": max_diff, "argmax_agreement": agree / max(total, 1), "batches": len(batches),
            "positions": total, **({"counted": "labelled positions"} if labelled_only else {})}


def evaluate_with(forward, model: ZeroshipModel, val: Validation, pad_id: int) -> dict:
    """A variant's metrics on the validation split, through launcher.eval.evaluate like training's."""
    return evaluate_features(forward, model.task, model.labels, val.examples, val.features, val.batches, pad_id,
                             model.uses_token_type_ids)


def optimize_graph(src: Path, dst: Path, model: ZeroshipModel) -> dict[str, int]:
    """onnxruntime's transformer fusions; returns the fused-operator counts."""
    from onnxruntime.transformers.optimizer import optimize_model

    cfg = model.encoder.config
    model_type = (
        "bert" if cfg.model_type in ("bert", "roberta", "xlm-roberta", "distilbert", "electra") else cfg.model_type
    )
    opt = optimize_model(str(src), model_type=model_type, num_heads=cfg.num_attention_heads,
                         hidden_size=cfg.hidden_size, opt_level=1)
    opt.save_model_to_file(str(dst))
    return {k: v for k, v in opt.get_fused_operator_statistics().items() if v}


def metric_drop(metric: str, reference: dict, variant: dict) -> float:
    """Points of `metric` lost by a variant (× 100; for a loss, a rise is a drop)."""
    drop = 100 * (reference[metric] - variant[metric])
    return -drop if metric == "eval_loss" else drop


def int8_builder(source: Path, work: Path, model: ZeroshipModel, names: list[str], val: Validation, pad_id: int,
                 reference: dict, budget: float, log) -> Int8Builder:
    """An Int8Builder over `source` fed from this run's validation split (scoring, sensitivity sample,
    timing) and training split (static calibration)."""
    def evaluate(path: Path) -> tuple[dict, float]:
        metrics = evaluate_with(ort_forward(make_session(path), names), model, val, pad_id)
        return metrics, metric_drop(val.metric, reference, metrics)

    def rows(features: list[Feature]) -> list[dict]:
        return [{"input_ids": f.input_ids, "attention_mask": f.attention_mask, "token_type_ids": f.token_type_ids}
                for f in features]

    sample = []
    for feed in pad_feeds(rows([val.features[i] for b in val.batches[:SENSITIVITY_BATCHES] for i in b]),
                          names, pad_id, 16):
        mask = (feed["attention_mask"].astype(bool) if model.task == Task.TOKEN
                else np.ones(feed["input_ids"].shape[0], dtype=bool))
        sample.append((feed, mask))
    serving = rows(val.features[:256])
    return Int8Builder(source, work, evaluate, sample, pad_feeds(rows(val.calibration), names, pad_id, 16),
                       lambda independent: pad_feeds(serving, names, pad_id, 32 if independent else 1), budget, log)


def build_int8(kind: str, fp32: Path, fused: Path, tmp: Path, model: ZeroshipModel, names: list[str],
               val: Validation, pad_id: int, reference: dict, opts: ExportOptions) -> tuple[dict, dict]:
    """The int8 variant for `--quantize kind`: each method held to the budget (export/quantize.py); with
    plain `int8`, the faster of those within it. Returns (manifest entry, validation metrics).

    Dynamic int8 starts from the fused graph (`fused` is the fp32 graph without --optimize): onnxruntime
    quantizes its fused Attention too. Static QDQ starts from the unfused graph: it cannot quantize a fused
    Attention, and QDQ around the remaining MatMuls was 2x slower than static int8 of the plain graph
    (quickstart model, b=32). A method counts as passing when within the budget and when it agrees with
    PyTorch's argmax on at least INT8_MIN_AGREEMENT of the labelled validation positions."""
    work = tmp / ".int8-work"  # candidates and probes; never listed in the manifest
    work.mkdir()
    methods = METHODS if kind == "int8" else (kind.removeprefix("int8-"),)
    sources = {"dynamic": fused, "static": fp32}
    results, builders = {}, {}
    for method in methods:
        builders[method] = int8_builder(sources[method], work, model, names, val, pad_id, reference,
                                        opts.max_metric_drop, opts.log)
        results[method] = builders[method].build(method, work / f"{method}.onnx")
    within = [r for r in results.values() if r.drop <= opts.max_metric_drop]
    if not within:
        worst = "; ".join(f"{r.method}: {r.drop:.2f} points with {len(r.excluded)} node(s) kept in fp32"
                          for r in results.values())
        raise ParityError(f"int8 variant over budget: best {val.metric} loss reached {worst} "
                          f"(limit --max-metric-drop {opts.max_metric_drop:g}); export without --quantize, "
                          "or raise the limit")
    parity = {r.method: check_parity(model, make_session(r.path), names, val, pad_id, opts.parity_batches,
                                     labelled_only=True) for r in within}
    passing = [r for r in within if parity[r.method]["argmax_agreement"] >= INT8_MIN_AGREEMENT]
    if not passing:
        raise ParityError("int8 variant agrees with PyTorch on too few labelled positions: " + ", ".join(
            f"{m} {p['argmax_agreement']:.2%}" for m, p in parity.items()) + f" (needs {INT8_MIN_AGREEMENT:.0%})")
    chosen = fastest([(builders[r.method], r) for r in passing])
    dst = tmp / VARIANT_FILES["int8"]
    chosen.path.replace(dst)
    shutil.rmtree(work)
    summary = {m: {**r.summary(opts.max_metric_drop), "argmax_agreement": parity.get(m, {}).get("argmax_agreement")}
               for m, r in results.items()}
    opts.log(
        f"int8: {chosen.method} chosen ("
        + ", ".join(
            f"{m} {s['drop']:+.2f} points" + (f", {s['ms_per_window']:.2f} ms/window" if s["ms_per_window"] else "")
            for m, s in summary.items()
        )
        + f"); argmax agreement with PyTorch {parity[chosen.method]['argmax_agreement']:.2%} of labelled positions"
    )
    for node in chosen.excluded:
        opts.log(f"  kept in fp32: {node['node']} (KL divergence from fp32 when quantized alone {node['kl']:.2e})")
    entry = {"file": in_bundle(tmp, dst), "from": in_bundle(tmp, sources[chosen.method]), "method": chosen.method,
             "batch_independent": chosen.batch_independent,
             "kept_fp32": chosen.excluded,
             "kept_fp32_why": ("the most sensitive nodes by KL divergence of validation logits from fp32 "
                               "(each quantized alone); the fewest that bring the drop within the budget")
             if chosen.excluded else "",
             "search": chosen.search, "parity": parity[chosen.method], "candidates": summary,
             "chosen_by": "the faster (ms per validation window, as the runtime feeds it) of the methods "
                          "within the budget" if len(results) > 1 else f"--quantize {kind}"}
    return entry, chosen.metrics


def convert_fp16(src: Path, dst: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    onnx.save(model, str(dst))


def hf_config(model: ZeroshipModel, meta: dict) -> dict:
    """config.json in the Hugging Face layout, so standard tooling (e.g. optimum) can read it."""
    config = dict(meta["encoder_config"])
    config.pop("_name_or_path", None)  # where the training machine kept the encoder: a bundle is portable
    config["id2label"] = {str(i): label for i, label in enumerate(model.labels)}
    config["label2id"] = {label: i for i, label in enumerate(model.labels)}
    arch = "ForTokenClassification" if model.task == Task.TOKEN else "ForSequenceClassification"
    config["architectures"] = [type(model.encoder).__name__.replace("Model", "") + arch]
    config["zeroship"] = {"task": model.task, "head": meta["head"], "pooling": meta.get("pooling")}
    return config


@dataclass
class Variant:
    """One graph of the bundle: its manifest entry and its metrics on the validation split."""

    name: str
    path: Path
    entry: dict
    metrics: dict


@dataclass
class Export:
    """What each phase of one export works on."""

    run: Run
    model: ZeroshipModel
    meta: dict
    tokenizer: Any
    val: Validation
    max_length: int
    tmp: Path  # the bundle being written; renamed into place only when complete
    opts: ExportOptions
    names: list[str] = field(default_factory=list)  # the graph's inputs, set by the fp32 phase

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    def evaluate(self, forward) -> dict:
        return evaluate_with(forward, self.model, self.val, self.pad_id)

    def parity(self, session, io_binding: bool = False) -> dict:
        return check_parity(self.model, session, self.names, self.val, self.pad_id, self.opts.parity_batches,
                            io_binding)


def export_run(run_id: str, runs_dir: str | Path, opts: ExportOptions) -> tuple[Path, dict]:
    """The phases: verify fp32 → build the variants → gate them on the metric budget → score them on the test
    split → write the bundle (with its model card)."""
    run = resolve_run(run_id, runs_dir)
    # abspath, not resolve: ".." is folded without following a link that `out` itself may be
    out = Path(os.path.abspath(opts.out)) if opts.out else run.bundle_dir
    check_out(out)
    model, meta, tokenizer, max_length = load_for_export(run, opts)
    val = load_validation(run, meta, tokenizer, max_length, log=opts.log)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; services read the bundle as another user
    (tmp / "onnx").mkdir()  # the graphs, where Hugging Face loaders look for them
    try:
        ex = Export(run, model, meta, tokenizer, val, max_length, tmp, opts)
        fp32, parity, reference = verify_fp32(ex)
        variants = [fp32, *build_variants(ex, fp32, reference)]
        drops = gate(ex, reference, variants)
        manifest = write_bundle(ex, variants, parity, reference, drops, score_on_test(ex, variants))
        _swap_into_place(tmp, out)
        if not opts.out:
            run.push("onnx")  # storage on a URI: the bundle goes there too (manifest last)
        return out, manifest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_for_export(run: Run, opts: ExportOptions) -> tuple[ZeroshipModel, dict, Any, int]:
    """The winner with eager attention (onnxruntime's fusions match its graph), its tokenizer, the window."""
    from transformers import AutoTokenizer

    model, meta = load_model(run.best_dir, attn="eager")
    tokenizer = AutoTokenizer.from_pretrained(str(run.best_dir))
    max_length = opts.max_length or meta["max_length"]
    positions = getattr(model.encoder.config, "max_position_embeddings", None)
    if isinstance(positions, int) and max_length > positions:
        raise ExportError(Problem("--max-length", f"{max_length} is more than the encoder's {positions} positions",
                                  f"give at most {positions}"))
    return model, meta, tokenizer, max_length


def verify_fp32(ex: Export) -> tuple[Variant, dict, dict]:
    """Phase 1: the fp32 graph, checked by onnx and held to PyTorch (max |Δ| and identical argmax, else
    ParityError). Returns the variant, its parity and PyTorch's own metrics (the reference)."""
    import onnx

    started = time.time()
    fp32 = ex.tmp / VARIANT_FILES["fp32"]
    ex.names = export_graph(ex.model, fp32, ex.opts.opset)
    onnx.checker.check_model(str(fp32))
    ex.opts.log(f"exported {fp32.name} (opset {ex.opts.opset}, inputs {', '.join(ex.names)}) in "
                f"{time.time() - started:.1f}s")
    session = make_session(fp32)
    parity = ex.parity(session)
    ex.opts.log(f"parity vs PyTorch on {parity['batches']} validation batches: max |Δ| "
                f"{parity['max_abs_diff']:.2e}, argmax agreement {parity['argmax_agreement']:.2%}")
    if parity["max_abs_diff"] > PARITY_MAX_ABS or parity["argmax_agreement"] < 1.0:
        raise ParityError(f"ONNX output differs from PyTorch: max |Δ| {parity['max_abs_diff']:.2e} "
                          f"(limit {PARITY_MAX_ABS:g}), argmax agreement {parity['argmax_agreement']:.4%}")
    with torch.no_grad():
        reference = ex.evaluate(ex.model)
    forward = ort_forward(session, ex.names)
    return Variant("fp32", fp32, {"file": in_bundle(ex.tmp, fp32)}, ex.evaluate(forward)), parity, reference


def build_variants(ex: Export, fp32: Variant, reference: dict) -> list[Variant]:
    """Phase 2: the variants asked for — fused, int8 (held to the budget inside, export/quantize.py), fp16."""
    built, source = [], fp32.path
    if ex.opts.optimize:
        dst = ex.tmp / VARIANT_FILES["optimized"]
        fusions = optimize_graph(fp32.path, dst, ex.model)
        ex.opts.log(f"fusions: {fusions or 'none matched'}")
        built.append(Variant("optimized", dst, {"file": in_bundle(ex.tmp, dst), "fusions": fusions},
                             ex.evaluate(ort_forward(make_session(dst), ex.names))))
        source = dst
    if ex.opts.quantize:
        entry, metrics = build_int8(ex.opts.quantize, fp32.path, source, ex.tmp, ex.model, ex.names, ex.val,
                                    ex.pad_id, reference, ex.opts)
        built.append(Variant("int8", ex.tmp / entry["file"], entry, metrics))
    if ex.opts.fp16:
        built.append(build_fp16(ex, source))
    return built


def build_fp16(ex: Export, source: Path) -> Variant:
    """fp16 for GPUs: checked on CUDA with IO binding where there is one; its argmax must agree with
    PyTorch's on FP16_MIN_AGREEMENT of positions."""
    dst = ex.tmp / VARIANT_FILES["fp16"]
    convert_fp16(source, dst)
    session, provider = fp16_session(dst)
    bound = provider == "CUDAExecutionProvider"
    parity = {**ex.parity(session, bound), "provider": provider, "io_binding": bound}
    ex.opts.log(f"fp16 parity on {provider}: max |Δ| {parity['max_abs_diff']:.2e},"
                f" argmax agreement {parity['argmax_agreement']:.2%}")
    if parity["argmax_agreement"] < FP16_MIN_AGREEMENT:
        raise ParityError(f"fp16 variant agrees with PyTorch on {parity['argmax_agreement']:.2%} of"
                          f" positions (needs {FP16_MIN_AGREEMENT:.0%})")
    return Variant("fp16", dst, {"file": in_bundle(ex.tmp, dst), "from": in_bundle(ex.tmp, source), "parity": parity},
                   ex.evaluate(ort_forward(session, ex.names, bound)))


def gate(ex: Export, reference: dict, variants: list[Variant]) -> dict[str, float]:
    """Phase 3: each variant beyond fp32 within --max-metric-drop points of PyTorch's metric, else ParityError."""
    metric, drops = ex.val.metric, {}
    for v in variants:
        if v.name == "fp32":
            continue
        drops[v.name] = drop = metric_drop(metric, reference, v.metrics)
        ex.opts.log(f"{v.name}: {metric} {v.metrics[metric]:.4f} vs torch {reference[metric]:.4f}"
                    f" (drop {drop:+.2f} points)")
        if drop > ex.opts.max_metric_drop:
            raise ParityError(f"{v.name} variant loses {drop:.2f} points of {metric} "
                              f"(limit --max-metric-drop {ex.opts.max_metric_drop:g})")
    return drops


def score_on_test(ex: Export, variants: list[Variant]) -> dict | None:
    """Phase 4: PyTorch and every variant on the run's test split, for the model card (not gated: the budget
    holds on validation). None when the run has no test split."""
    test = ex.val.test
    if test is None:
        return None
    with torch.no_grad():
        scores = {"torch": evaluate_with(ex.model, ex.model, test, ex.pad_id)}
    for v in variants:
        if v.name == "fp16":
            session, provider = fp16_session(v.path)
            forward = ort_forward(session, ex.names, provider == "CUDAExecutionProvider")
        else:
            forward = ort_forward(make_session(v.path), ex.names)
        scores["onnx" if v.name == "fp32" else v.name] = evaluate_with(forward, ex.model, test, ex.pad_id)
    return scores


def write_bundle(ex: Export, variants: list[Variant], parity: dict, reference: dict, drops: dict,
                 test_metrics: dict | None) -> dict:
    """Phase 5: tokenizer, config.json, the model card and, last, the manifest with every file's checksum."""
    import onnx
    import onnxruntime
    import yaml

    from export.card import model_card

    model, tmp = ex.model, ex.tmp
    ex.tokenizer.save_pretrained(str(tmp))
    (tmp / "config.json").write_text(json.dumps(hf_config(model, ex.meta), indent=2) + "\n")
    metrics = {"torch": reference, **{("onnx" if v.name == "fp32" else v.name): v.metrics for v in variants}}
    manifest = {
        "format_version": FORMAT_VERSION,
        "run": ex.run.id,
        "task": model.task,
        "labels": model.labels,
        "metric": ex.val.metric,
        "max_length": ex.max_length,
        "stride": ex.meta["stride"],
        "pad_token_id": ex.pad_id,
        "casing": model.casing,  # token_type_ids carry casing classes (zeroship.casing)
        "opset": ex.opts.opset,
        "inputs": {n: ["batch", "sequence"] for n in ex.names},
        "outputs": {OUTPUT: ["batch", "sequence", "labels"] if model.task == Task.TOKEN
                    else ["batch", "labels"]},
        "variants": {v.name: v.entry for v in variants},
        "parity": parity,
        "metrics": metrics,
        "metric_drop_points": drops,
        "metric_budget_points": ex.opts.max_metric_drop,
        **({"test_metrics": test_metrics} if test_metrics else {}),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
    }
    recipe = yaml.safe_load((ex.run.dir / "recipe.yaml").read_text())
    (tmp / "README.md").write_text(model_card(manifest, recipe), encoding="utf-8")
    manifest["files"] = {in_bundle(tmp, p): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                         for p in sorted(tmp.rglob("*")) if p.is_file()}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def check_out(out: Path) -> None:
    """An export replaces only a bundle it wrote (a valid manifest listing every file in the folder) or an
    empty folder; anything else at `out` — the user's files, a run's own folder, a plain file — is refused
    before any work is done, and nothing is deleted."""
    where = f"--out {out}"
    fix = "give a new or empty folder, or the folder of an earlier export"
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ExportError(Problem(where, "exists and is not a folder", fix))
    if out.is_dir():
        try:
            entries = bundle_entries(out)
        except OSError as exc:
            raise ExportError(Problem(where, f"cannot be read ({exc.strerror})", fix)) from None
        if entries and not _is_our_bundle(out, entries):
            raise ExportError(Problem(where, "is a folder that is not a zeroship bundle (no valid manifest, or "
                                      "files the manifest does not list); an export replaces only a bundle "
                                      "it wrote", fix))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(Problem(where, f"cannot create its parent folder ({exc.strerror})", fix)) from None
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise ExportError(Problem(where, f"{out.parent} is not writable", fix))


def bundle_entries(folder: Path) -> set[str]:
    """What a folder holds, as a manifest names it: top-level names, and onnx/NAME inside its onnx/ folder
    (a folder deeper down keeps a trailing slash, which no manifest lists)."""
    found = set()
    for p in folder.iterdir():
        if p.name == "onnx" and p.is_dir() and not p.is_symlink():
            found |= {f"onnx/{q.name}" + ("" if q.is_file() and not q.is_symlink() else "/") for q in p.iterdir()}
        else:
            found.add(p.name)
    return found


def in_bundle(bundle: Path, path: Path) -> str:
    """`path`'s name inside the bundle, as the manifest lists it (onnx/model.onnx)."""
    return path.relative_to(bundle).as_posix()


def _is_our_bundle(folder: Path, entries: set[str]) -> bool:
    try:
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return not manifest_problem(manifest) and entries <= set(manifest["files"]) | BESIDE_FILES


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Replace `out` with the finished temp folder; an old bundle is removed only after the swap."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
