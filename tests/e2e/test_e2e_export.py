"""Export end to end: real trained runs → ONNX bundle → onnxruntime, checked against PyTorch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TOY_CLS, TOY_NER, cli

from export.runtime import BundleError, Predictor, sha256_file
from launcher.data.parse import read_conll
from launcher.runs.registry import Registry

pytestmark = pytest.mark.e2e


def torch_entities(run: Path, texts: list[str]) -> list[list[dict]]:
    """Reference predictions straight from the PyTorch model, decoded independently of the runtime:
    transformers tokenizer with offsets (token types: each token's casing class when the run has
    `model.casing`), argmax on each word's first subtoken, BIO runs → spans."""
    from transformers import AutoTokenizer

    from launcher.nn.model import load_model
    from zeroship.casing import casing_class

    model, meta = load_model(run / "best")
    tok = AutoTokenizer.from_pretrained(str(run / "best"))
    labels, out = meta["labels"], []
    for text in texts:
        enc = tok(text, return_offsets_mapping=True, return_tensors="pt")
        offsets = enc.pop("offset_mapping")[0].tolist()
        if meta["casing"]:
            enc["token_type_ids"] = torch.tensor([[0 if w is None else casing_class(text[s:e])
                                                   for w, (s, e) in zip(enc.word_ids(0), offsets)]])
        with torch.no_grad():
            pred = model(**enc)[0].argmax(-1).tolist()
        words = enc.word_ids(0)
        spans, seen = [], set()
        for pos, wid in enumerate(words):
            if wid is None or wid in seen:
                continue
            seen.add(wid)
            end = max(offsets[p][1] for p, w in enumerate(words) if w == wid)
            tag = labels[pred[pos]]
            if tag.startswith("I-") and spans and spans[-1]["label"] == tag[2:] and spans[-1]["open"]:
                spans[-1]["end"] = end
            elif tag != "O":
                spans.append({"label": tag[2:], "start": offsets[pos][0], "end": end, "open": True})
            else:
                if spans:
                    spans[-1]["open"] = False
            if tag.startswith("B-") and len(spans) > 1:
                spans[-2]["open"] = False
        out.append([(s["label"], s["start"], s["end"], text[s["start"]:s["end"]]) for s in spans])
    return out


def test_ner_bundle_manifest_and_parity(ner_run, ner_bundle):
    manifest = json.loads((ner_bundle / "manifest.json").read_text())
    for key in ("run", "task", "labels", "opset", "inputs", "outputs", "files", "parity", "metrics",
                "created", "versions"):
        assert key in manifest
    assert manifest["run"] == ner_run.name and manifest["task"] == "token_classification"
    assert manifest["casing"] is True  # ner_run has model.casing: the runtime feeds casing classes
    assert set(manifest["inputs"]) >= {"input_ids", "attention_mask"} and list(manifest["outputs"]) == ["logits"]
    assert manifest["parity"]["max_abs_diff"] <= 1e-4 and manifest["parity"]["argmax_agreement"] == 1.0
    assert manifest["parity"]["batches"] >= 1
    assert {"torch", "onnx", "int8"} <= set(manifest["metrics"])
    assert "int8" in manifest["metric_drop_points"]
    int8 = manifest["variants"]["int8"]  # `--quantize int8`: both methods built, held to the default budget
    assert manifest["metric_budget_points"] == 0.5
    assert set(int8["candidates"]) == {"dynamic", "static"} and int8["method"] in int8["candidates"]
    assert int8["candidates"][int8["method"]]["ms_per_window"] > 0  # timed as the runtime feeds it
    assert all(c["ms_per_window"] is None or c["ms_per_window"] > 0 for c in int8["candidates"].values())
    assert int8["batch_independent"] is (int8["method"] == "static")
    assert manifest["variants"]["optimized"]["fusions"].get("Attention", 0) >= 1  # fusions really fired
    for name, info in manifest["files"].items():
        assert sha256_file(ner_bundle / name) == info["sha256"]
    config = json.loads((ner_bundle / "config.json").read_text())
    assert config["model_type"] == "bert" and config["id2label"]["0"] == "O"
    assert {"tokenizer.json", "onnx/model.onnx", "onnx/model_quantized.onnx", "onnx/model_optimized.onnx"} <= set(
        manifest["files"])  # the Hugging Face ONNX layout
    assert manifest["format_version"] == 2
    assert not list(ner_run.glob(".onnx.tmp-*"))


def test_predictor_matches_pytorch(ner_run, ner_bundle):
    sentences = [" ".join(ex.tokens) for ex in read_conll(str(TOY_NER / "validation.conll"))[:20]]
    texts = sentences + ["Mara Okafor, of Kestrel Systems, flew to Port Selwyn.", "nothing to see here"]
    predictor = Predictor.load(ner_bundle, variant="fp32")
    got = [[(e["label"], e["start"], e["end"], e["text"]) for e in ents] for ents in predictor.predict(texts)]
    assert got == torch_entities(ner_run, texts)
    assert predictor.predict(texts, batch_size=3) == predictor.predict(texts, batch_size=64)  # order kept
    assert sum(map(len, got)) > 20  # the comparison is about real entities, not empty lists


def test_predictor_threads_long_and_empty_inputs(ner_bundle):
    predictor = Predictor.load(ner_bundle, threads=1)
    assert predictor.variant == "int8"  # auto on CPU prefers the int8 variant when present
    text = "Mara Okafor joined Kestrel Systems in Port Selwyn last spring ."
    long_text = " ".join([text] * 40)  # far beyond max_length: windows with stride
    ents = predictor.predict(long_text)
    assert [e["text"] for e in ents] == ["Mara Okafor", "Kestrel Systems", "Port Selwyn"] * 40
    assert all(long_text[e["start"]:e["end"]] == e["text"] for e in ents)
    assert predictor.predict([""]) == [[]]
    with pytest.raises(TypeError, match="item 1 is int"):
        predictor.predict(["ok", 3])
    expected = predictor.predict([text] * 8)
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(predictor.predict([text] * 8))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [expected] * 6


def test_corrupt_bundle_refused(ner_bundle, tmp_path):
    broken = tmp_path / "bundle"
    shutil.copytree(ner_bundle, broken)
    data = bytearray((broken / "onnx" / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (broken / "onnx" / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        Predictor.load(broken, variant="fp32")
    res = cli("zeroship", "export", "predict", str(broken), "hello", "--variant", "fp32")
    assert res.returncode == 2 and "sha256" in res.stderr
    (broken / "manifest.json").unlink()
    with pytest.raises(BundleError, match="manifest"):
        Predictor.load(broken)


def test_the_bundle_is_portable_and_carries_its_model_card(ner_run, ner_bundle):
    """No path of the training machine in any file (config.json's `_name_or_path` held the encoder's), and a
    README.md model card listed in the manifest like every other file."""
    import sys

    machine = [str(ner_run.parent.parent), sys.prefix, str(ROOT), "site-packages"]
    for path in [p for p in ner_bundle.rglob("*") if p.is_file()]:
        data = path.read_bytes()
        for where in machine:
            assert where.encode() not in data, (path.name, where)
    manifest = json.loads((ner_bundle / "manifest.json").read_text())
    assert "README.md" in manifest["files"] and "test_metrics" not in manifest  # ner_run has no test split
    card = (ner_bundle / "README.md").read_text()
    assert card.startswith(f"# {ner_run.name}: named-entity recognition")
    f1 = manifest["metrics"]["int8"]["eval_f1"]
    assert f"| int8 ({manifest['variants']['int8']['method']}) | `onnx/model_quantized.onnx` | {f1:.4f} | — |" in card
    assert "first sub-token" in card and "casing class" in card and "Predictor.load" in card


def test_a_bundle_in_the_earlier_flat_layout_still_loads(ner_bundle, tmp_path):
    """Format 1 (every file at the top, model_int8.onnx): what exports before the Hugging Face layout wrote."""
    from export.runtime import FORMAT1_VARIANT_FILES, VARIANT_FILES

    old = tmp_path / "old"
    shutil.copytree(ner_bundle, old)
    manifest = json.loads((old / "manifest.json").read_text())
    renamed = {VARIANT_FILES[v]: FORMAT1_VARIANT_FILES[v] for v in VARIANT_FILES}
    for new, flat in renamed.items():
        if (old / new).is_file():
            (old / new).rename(old / flat)
    (old / "onnx").rmdir()
    manifest["files"] = {renamed.get(name, name): info for name, info in manifest["files"].items()}
    for entry in manifest["variants"].values():
        entry["file"] = renamed[entry["file"]]
    (old / "manifest.json").write_text(json.dumps({**manifest, "format_version": 1}))
    texts = ["Mara Okafor joined Kestrel Systems in Port Selwyn .", "Zerran met Ilse Varga in Aldmere ."]
    for variant in ("fp32", "int8"):
        expected = Predictor.load(ner_bundle, variant=variant).predict(texts)
        assert Predictor.load(old, variant=variant).predict(texts) == expected
    # and an export may replace it: an earlier bundle of ours, whatever its layout
    from export.onnx import bundle_entries, check_out

    assert "model_int8.onnx" in bundle_entries(old) and "onnx/model.onnx" in bundle_entries(ner_bundle)
    check_out(old)


def test_sequence_classification_export(cls_run, cls_bundle):
    manifest = json.loads((cls_run / "onnx" / "manifest.json").read_text())
    assert manifest["parity"]["argmax_agreement"] == 1.0 and manifest["parity"]["max_abs_diff"] <= 1e-4
    # the run has a test split: PyTorch and every variant scored on it, and the card shows it
    assert set(manifest["test_metrics"]) == {"torch", "onnx", "int8"}
    test_acc = json.loads((cls_run / "best" / "metrics.json").read_text())["test"]["eval_accuracy"]
    assert manifest["test_metrics"]["torch"]["eval_accuracy"] == pytest.approx(test_acc, abs=1e-6)
    card = (cls_run / "onnx" / "README.md").read_text()
    torch_test = manifest["test_metrics"]["torch"]["eval_accuracy"]
    assert f"| {torch_test:.4f} | — |" in card and "text classification" in card
    texts = ["The coach praised the defence after the game .", "Investors sold shares of Orbisoft .",
             "A vaccine trial in Estrava showed promise ."]
    from transformers import AutoTokenizer

    from launcher.nn.model import load_model

    model, meta = load_model(cls_run / "best")
    tok = AutoTokenizer.from_pretrained(str(cls_run / "best"))
    with torch.no_grad():
        ref = model(**tok(texts, padding=True, return_tensors="pt")).softmax(-1)
    got = Predictor.load(cls_run / "onnx", variant="fp32").predict(texts)
    assert [g["label"] for g in got] == [meta["labels"][i] for i in ref.argmax(-1).tolist()]
    for g, r in zip(got, ref):
        assert abs(g["score"] - float(r.max())) < 1e-4 and abs(sum(g["scores"].values()) - 1) < 1e-5


def test_metric_drop_gate_fails_and_leaves_no_bundle(ner_run, tmp_path):
    out = tmp_path / "gate"
    res = cli("zeroship", "export", "onnx", ner_run.name, "--runs", str(ner_run.parent), "--optimize",
              "--max-metric-drop", "-100", "--out", str(out))
    assert res.returncode == 1
    assert "export failed" in res.stderr and "no bundle was written" in res.stderr
    assert "optimized variant loses" in res.stderr and "--max-metric-drop -100" in res.stderr
    assert not out.exists() and not list(tmp_path.glob(".gate.tmp-*"))


def test_parity_failure_fails_export(ner_run, tmp_path, monkeypatch):
    import export.onnx as ex

    monkeypatch.setattr(ex, "PARITY_MAX_ABS", 0.0)  # the one fake: a tolerance no real export meets
    with pytest.raises(ex.ParityError, match="differs from PyTorch"):
        ex.export_run(ner_run.name, ner_run.parent, ex.ExportOptions(out=tmp_path / "b", log=lambda m: None))
    assert not (tmp_path / "b").exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("run_id,expected", [("run-999", "no run run-999"), ("../x", "not a run id"),
                                             ("latest", "no runs yet")])
def test_bad_run_ids_exit_2(tmp_path, run_id, expected):
    res = cli("zeroship", "export", "onnx", run_id, "--runs", str(tmp_path / "empty"))
    assert res.returncode == 2 and expected in res.stderr and "Traceback" not in res.stderr


def test_failed_run_and_run_without_best_exit_2(tmp_path):
    reg = Registry(tmp_path)
    reg.allocate().update(state="failed", error="boom")
    reg.allocate().update(state="succeeded")
    res = cli("zeroship", "export", "onnx", "run-1", "--runs", str(tmp_path))
    assert res.returncode == 2 and "'failed'" in res.stderr
    res = cli("zeroship", "export", "onnx", "run-2", "--runs", str(tmp_path))
    assert res.returncode == 2 and "no winning checkpoint" in res.stderr


def test_bench_writes_table_and_json(ner_run, ner_bundle):
    res = cli("zeroship", "export", "bench", ner_run.name, "--runs", str(ner_run.parent), "--repeats", "3")
    assert res.returncode == 0, res.stderr
    bench = json.loads((ner_bundle / "bench.json").read_text())
    assert set(bench["results"]) == {"torch eager", "onnx fp32", "onnx optimized", "onnx int8"}
    assert all(r["b1_ms_p50"] > 0 and r["b32_samples_per_s"] > 0 for r in bench["results"].values())
    int8 = json.loads((ner_bundle / "manifest.json").read_text())["variants"]["int8"]
    assert bench["results"]["onnx int8"]["b32_batched"] is int8["batch_independent"]  # timed as it is served
    assert "onnx int8" in res.stdout


def test_runtime_imports_no_torch():
    code = ("import sys, export.runtime; bad = [m for m in ('torch', 'transformers') if m in sys.modules];"
            "sys.exit(f'imported {bad}' if bad else 0)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr


def test_report_micro_f1_is_the_runs_metric(ner_run):
    status = json.loads((ner_run / "status.json").read_text())
    report = json.loads((ner_run / "best" / "report.json").read_text())["validation"]
    assert abs(report["entity"]["micro avg"]["f1-score"] - status["winner"]["value"]) <= 1e-6
    assert {"PER", "LOC", "ORG", "MISC", "macro avg", "weighted avg"} <= set(report["entity"])
    assert "O" in report["token"] and "micro avg" in report["entity_strict"]


def test_evaluate_onnx_agrees_with_pytorch(ner_run, ner_bundle, tmp_path):
    data = str(TOY_NER / "test.conll")
    for flag, out in (([], "torch.json"), (["--onnx"], "onnx.json")):
        res = cli("zeroship", "evaluate", ner_run.name, "--runs", str(ner_run.parent), "--data", data,
                  "--json", str(tmp_path / out), *flag)
        assert res.returncode == 0, res.stderr
        assert "per-label" in res.stdout or "micro avg" in res.stdout
    torch_eval = json.loads((tmp_path / "torch.json").read_text())
    onnx_eval = json.loads((tmp_path / "onnx.json").read_text())
    assert onnx_eval["engine"] == "onnx fp32"
    assert onnx_eval["metrics"]["eval_f1"] == torch_eval["metrics"]["eval_f1"]  # same argmax everywhere
    assert abs(onnx_eval["metrics"]["eval_loss"] - torch_eval["metrics"]["eval_loss"]) <= 1e-4
    bad = tmp_path / "bad.conll"
    bad.write_text("Mara B-PER\nsaid O\n\nhello B-SHIP\n")
    res = cli("zeroship", "evaluate", ner_run.name, "--runs", str(ner_run.parent), "--data", str(bad))
    assert res.returncode == 2 and f"{bad}:4" in res.stderr and "B-SHIP" in res.stderr


def test_classification_report_has_confusion_matrix(cls_run):
    report = json.loads((cls_run / "best" / "report.json").read_text())["validation"]
    rows = report["confusion_matrix"]["rows_gold_cols_pred"]
    n_validation = len((TOY_CLS / "validation.csv").read_text().splitlines()) - 1
    assert sum(map(sum, rows)) == n_validation
    metrics = json.loads((cls_run / "best" / "metrics.json").read_text())["validation"]
    assert abs(sum(rows[i][i] for i in range(len(rows))) / n_validation - metrics["eval_accuracy"]) < 1e-9
    res = cli("zeroship", "runs", "show", cls_run.name, "--runs", str(cls_run.parent))
    assert res.returncode == 0 and "confusion matrix" in res.stdout


def test_io_binding_gives_the_same_answers_and_cuda_without_provider_is_a_clear_error(ner_bundle):
    """IO binding (what Predictor uses on CUDA) runs on the CPU provider too: same logits as a plain run."""
    import onnxruntime as ort

    texts = [" ".join(ex.tokens) for ex in read_conll(str(TOY_NER / "validation.conll"))[:16]]
    plain = Predictor.load(ner_bundle, variant="fp32")
    bound = Predictor.load(ner_bundle, variant="fp32", io_binding=True)
    assert not plain.io_binding and bound.io_binding
    encodings = plain.tokenizer.encode_batch(texts)
    for a, b in zip(plain.logits(encodings), bound.logits(encodings)):
        assert a.shape == b.shape and float(abs(a - b).max()) <= 1e-6
    assert bound.predict(texts) == plain.predict(texts)
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(BundleError, match="no CUDA provider.*onnxruntime-gpu"):
            Predictor.load(ner_bundle, device="cuda")
    with pytest.raises(BundleError, match="use cpu or cuda"):
        Predictor.load(ner_bundle, device="tpu")
