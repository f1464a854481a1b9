"""int8 held to the metric budget: sensitivity-guided fp32 exclusions, static (calibrated) int8, and
answers that do not depend on what else is in the batch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, TOY_NER, cli

from export.runtime import Predictor
from launcher.data.parse import read_conll

pytestmark = pytest.mark.e2e

OUTLIER_NODE = "/encoder/encoder/layer.1/attention/output/dense/MatMul"  # the tiny model's top layer


def with_outliers(run: Path, runs: Path, scale: float = 1000.0, channels: int = 8) -> Path:
    """A copy of `run` whose top (layer-1) attention output projection sees outlier activation channels, as
    large language models grow them. Function-preserving: value channels × scale, the output projection's
    matching input columns ÷ scale (attention mixes values linearly), so PyTorch's answers do not change
    but a per-tensor activation scale on that projection's input is ruined. (In layer 0 the outliers cost
    ner_run's int8 only 0.31 points once casing classes made it sure of itself; in the top layer, 2.77.)"""
    from safetensors.torch import load_file, save_file

    copy = runs / run.name
    copy.mkdir(parents=True)
    for name in ("status.json", "recipe.yaml"):
        shutil.copy(run / name, copy / name)
    shutil.copytree(run / "best", copy / "best")
    path = copy / "best" / "model.safetensors"
    weights = load_file(str(path))
    prefix, picked = "encoder.encoder.layer.1.attention.", list(range(channels))
    weights[prefix + "self.value.weight"][picked] *= scale
    weights[prefix + "self.value.bias"][picked] *= scale
    weights[prefix + "output.dense.weight"][:, picked] /= scale
    save_file(weights, str(path), metadata={"format": "pt"})
    return copy


def spans(results: list) -> list:
    return [[(e["label"], e["start"], e["end"]) for e in ents] for ents in results]


def validation_texts() -> list[str]:
    return [" ".join(ex.tokens) for ex in read_conll(str(TOY_NER / "validation.conll"))]


def test_over_budget_int8_keeps_its_most_sensitive_node_in_fp32(ner_run, tmp_path):
    import onnx

    run = with_outliers(ner_run, tmp_path / "runs")
    bundle = tmp_path / "bundle"
    res = cli("zeroship", "export", "onnx", run.name, "--runs", str(run.parent), "--optimize",
              "--quantize", "int8-dynamic", "--out", str(bundle))  # the default budget: 0.5 points
    assert res.returncode == 0, res.stdout + res.stderr
    manifest = json.loads((bundle / "manifest.json").read_text())
    int8 = manifest["variants"]["int8"]
    assert manifest["metric_budget_points"] == 0.5
    assert int8["search"][0] == {"excluded": 0, "drop": int8["search"][0]["drop"]}
    assert int8["search"][0]["drop"] > 0.5  # plain int8 really was over budget on this model
    kept = [k["node"] for k in int8["kept_fp32"]]
    assert OUTLIER_NODE in kept and len(kept) <= 2  # the outlier's node, found by sensitivity, and little else
    assert manifest["metric_drop_points"]["int8"] <= 0.5
    assert f"kept in fp32: {OUTLIER_NODE}" in " ".join(res.stdout.split())
    graph = onnx.load(str(bundle / "onnx" / "model_quantized.onnx")).graph
    assert {n.op_type for n in graph.node if n.name == OUTLIER_NODE} == {"MatMul"}  # still a float MatMul
    assert any(n.op_type == "MatMulInteger" for n in graph.node)  # while the others are int8

    texts = validation_texts()
    int8_model, fp32 = Predictor.load(bundle, variant="int8"), Predictor.load(bundle, variant="fp32")
    assert not int8_model.batch_independent  # dynamic: fed one window per call
    assert spans(int8_model.predict(texts)) == spans(fp32.predict(texts))
    assert sum(map(len, spans(fp32.predict(texts)))) > 50

    # the rule is needed: the same dynamic model fed in batches gives a text different logits
    encodings = int8_model.tokenizer.encode_batch(texts[:64])
    alone = int8_model.logits(encodings)
    int8_model.batch_independent = True
    batched = int8_model.logits(encodings, batch_size=32)
    assert max(float(np.abs(a - b).max()) for a, b in zip(alone, batched)) > 1e-4


def test_default_budget_refuses_int8_over_half_a_point(ner_run, tmp_path, monkeypatch):
    import export.onnx as ex
    import export.quantize as q

    run = with_outliers(ner_run, tmp_path / "runs")
    monkeypatch.setattr(q, "MAX_EXCLUDED_SHARE", 0.0)  # the one fake: no node may stay in fp32
    messages: list[str] = []
    opts = ex.ExportOptions(out=tmp_path / "bundle", quantize="int8-dynamic", log=messages.append)
    with pytest.raises(ex.ParityError, match=r"over budget.*dynamic: \d+\.\d\d points.*--max-metric-drop 0\.5"):
        ex.export_run(run.name, run.parent, opts)
    assert not (tmp_path / "bundle").exists() and not list(tmp_path.glob(".bundle.tmp-*"))
    assert any("int8 dynamic: drop" in m for m in messages)


def test_static_int8_exports_within_tolerance_and_loads_without_torch(cls_run, tmp_path):
    from export.onnx import INT8_MIN_AGREEMENT

    bundle = tmp_path / "static"
    res = cli("zeroship", "export", "onnx", cls_run.name, "--runs", str(cls_run.parent), "--quantize",
              "int8-static", "--out", str(bundle))
    assert res.returncode == 0, res.stdout + res.stderr
    manifest = json.loads((bundle / "manifest.json").read_text())
    int8 = manifest["variants"]["int8"]
    assert int8["method"] == "static" and int8["batch_independent"] is True
    assert int8["parity"]["argmax_agreement"] >= INT8_MIN_AGREEMENT
    assert manifest["metric_drop_points"]["int8"] <= manifest["metric_budget_points"] == 0.5
    import onnx

    ops = {n.op_type for n in onnx.load(str(bundle / "onnx" / "model_quantized.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # QDQ with calibrated (constant) scales
    assert "DynamicQuantizeLinear" not in ops
    texts = ["The coach praised the defence after the game .", "Investors sold shares of Orbisoft .",
             "A vaccine trial in Estrava showed promise ."]
    code = ("import sys, json; sys.modules['torch'] = sys.modules['transformers'] = None\n"
            "from export.runtime import Predictor\n"
            "p = Predictor.load(sys.argv[1], variant='int8')\n"
            "print(json.dumps(p.predict(sys.argv[2:])))")
    out = subprocess.run([sys.executable, "-c", code, str(bundle), *texts], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    expected = Predictor.load(bundle, variant="fp32").predict(texts)
    assert [g["label"] for g in got] == [e["label"] for e in expected]
    assert all(abs(sum(g["scores"].values()) - 1) < 1e-5 for g in got)


def test_default_variant_answers_do_not_depend_on_the_batch(ner_bundle):
    predictor = Predictor.load(ner_bundle)  # auto on CPU: the int8 variant, whichever method it is
    assert predictor.variant == "int8"
    texts = validation_texts()[:80]
    texts += [f"{name} met {other} in Port Selwyn ." for name, other in
              (("Mara Okafor", "Ivo Lenz"), ("Kestrel Systems", "Orbisoft"), ("Ana", "the board"))]
    alone = [predictor.predict(text) for text in texts]
    batched = predictor.predict(texts, batch_size=32)
    assert spans(alone) == spans(batched)
    assert max(abs(a["score"] - b["score"]) for x, y in zip(alone, batched) for a, b in zip(x, y)) <= 1e-4
