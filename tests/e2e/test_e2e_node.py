"""examples/node: the bundle served from Node.js gives Predictor's answers.

The example is installed as its README says (`npm install --ignore-scripts`: onnxruntime-node's CPU binaries
ship in the package; its install script only fetches GPU builds) into a temporary copy, started as a real
HTTP service, and asked the shipped validation sentences. Transformers.js's own pipeline (aggregation
"simple", which reads every sub-token) must find Predictor's entities on ≥ 99% of them — what
`data.label_all_tokens` is for — and the onnxruntime-node engine, which also handles casing bundles, the
same spans to the character.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import unicodedata
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import ROOT, TOY_CLS, TOY_NER, stop_process_group

from export.runtime import Predictor
from launcher.data.parse import read_conll, read_csv

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(shutil.which("node") is None or shutil.which("npm") is None,
                                 reason="node and npm are not installed: the Node.js example cannot run")]

NETWORK = ("ENOTFOUND", "EAI_AGAIN", "ETIMEDOUT", "ECONNREFUSED", "ECONNRESET", "network")


@pytest.fixture(scope="module")
def example(tmp_path_factory) -> Path:
    """examples/node installed in a temporary copy (the checkout stays as it is)."""
    folder = tmp_path_factory.mktemp("node") / "example"
    shutil.copytree(ROOT / "examples" / "node", folder, ignore=shutil.ignore_patterns("node_modules"))
    res = subprocess.run(["npm", "install", "--ignore-scripts", "--no-audit", "--no-fund"], cwd=folder,
                         capture_output=True, text=True, timeout=600)
    if res.returncode != 0 and any(word in res.stderr for word in NETWORK):
        pytest.skip(f"npm cannot reach its registry: {res.stderr.strip()[-300:]}")
    assert res.returncode == 0, res.stderr[-3000:]
    return folder


@contextmanager
def service(example: Path, bundle: Path, *flags: str):
    """`node server.mjs BUNDLE --port 0 …`: yields its URL once it says where it listens."""
    proc = subprocess.Popen(["node", "server.mjs", str(bundle), "--port", "0", *flags], cwd=example,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        line = proc.stdout.readline()  # the first line, or "" if it exited
        if not line.startswith("listening on "):
            proc.wait(timeout=30)
            raise AssertionError(f"the service did not start ({proc.returncode}): {line}{proc.stderr.read()[-2000:]}")
        yield line.split()[2]
    finally:
        stop_process_group(proc, 20)


def post(url: str, texts: list[str]) -> list:
    out = []
    for start in range(0, len(texts), 64):  # the service's per-request limit
        req = urllib.request.Request(f"{url}/predict", json.dumps({"texts": texts[start:start + 64]}).encode(),
                                     {"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as res:
            out += json.loads(res.read())["predictions"]
    return out


def folded(text: str) -> str:
    """An entity's text as an uncased tokenizer decodes it: no case, accents or spaces."""
    return "".join(c for c in unicodedata.normalize("NFD", text.lower()) if not c.isspace()
                   and unicodedata.category(c) != "Mn")


def ner_texts() -> list[str]:
    return [" ".join(ex.tokens) for ex in read_conll(str(TOY_NER / "validation.conll"))]


def same_share(ours: list, theirs: list) -> float:
    assert len(ours) == len(theirs)
    return sum(a == b for a, b in zip(ours, theirs)) / len(ours)


@pytest.mark.parametrize("dtype,variant", [("fp32", "fp32"), ("q8", "int8")])
def test_transformers_js_pipeline_finds_predictors_entities(example, plain_ner_bundle, dtype, variant):
    texts = ner_texts()
    want = [[(e["label"], folded(e["text"])) for e in ents]
            for ents in Predictor.load(plain_ner_bundle, variant=variant).predict(texts)]
    with service(example, plain_ner_bundle, "--dtype", dtype) as url:
        got = [[(e["label"], folded(e["text"])) for e in ents] for ents in post(url, texts)]
    assert sum(map(len, want)) > len(texts) // 2  # the model does find entities
    share = same_share(got, want)
    print(f"Transformers.js {dtype}: the same entities as Predictor on {share:.1%} of {len(texts)} sentences")
    assert share >= 0.99, [(t, g, w) for t, g, w in zip(texts, got, want) if g != w][:5]


@pytest.mark.parametrize("dtype,variant", [("fp32", "fp32"), ("q8", "int8")])
def test_onnxruntime_node_gives_predictors_spans_on_a_casing_bundle(example, ner_bundle, dtype, variant):
    texts = ner_texts()
    want = [[(e["label"], e["start"], e["end"], e["text"]) for e in ents]
            for ents in Predictor.load(ner_bundle, variant=variant).predict(texts)]
    with service(example, ner_bundle, "--dtype", dtype) as url:  # auto: ort for a casing bundle
        got = [[(e["label"], e["start"], e["end"], e["text"]) for e in ents] for ents in post(url, texts)]
    share = same_share(got, want)
    print(f"onnxruntime-node {dtype} (casing): the same spans as Predictor on {share:.1%} of {len(texts)} sentences")
    assert share >= 0.99, [(t, g, w) for t, g, w in zip(texts, got, want) if g != w][:5]


def test_transformers_js_pipeline_refuses_a_casing_bundle(example, ner_bundle):
    proc = subprocess.run(["node", "server.mjs", str(ner_bundle), "--engine", "pipeline", "--port", "0"],
                          cwd=example, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "casing classes" in proc.stderr and "--engine ort" in proc.stderr


@pytest.mark.parametrize("engine", ["pipeline", "ort"])
def test_classification_labels_match_predictor(example, cls_bundle, engine):
    texts = [ex.text for ex in read_csv(str(TOY_CLS / "validation.csv"), "text", "label", ",")] + [
        "Zerran met Kestrel Systems in Paris .", "", "A vaccine trial in Estrava showed promise . " * 60]
    for dtype, variant in (("fp32", "fp32"), ("q8", "int8")):
        want = [p["label"] for p in Predictor.load(cls_bundle, variant=variant).predict(texts)]
        with service(example, cls_bundle, "--engine", engine, "--dtype", dtype) as url:
            got = [p["label"] for p in post(url, texts)]
        share = same_share(got, want)
        print(f"{engine} {dtype}: the same label as Predictor on {share:.1%} of {len(texts)} texts")
        assert share >= 0.995


def test_bad_requests_get_a_400_that_says_why(example, cls_bundle):
    with service(example, cls_bundle) as url:
        for body, why in ((b"{", "not JSON"), (b'{"texts": "a"}', 'expected {"texts"'),
                          (b'{"texts": ["ok", 7]}', "texts[1] is number"),
                          (b'{"texts": ["\\ud800"]}', "texts[0] holds a lone surrogate"),
                          (json.dumps({"texts": ["x"] * 65}).encode(), "65 texts; at most 64")):
            req = urllib.request.Request(f"{url}/predict", body, {"content-type": "application/json"})
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(req, timeout=30)
            assert err.value.code == 400 and why in json.loads(err.value.read())["detail"]
        assert post(url, ["Investors sold shares of Orbisoft ."])[0]["label"]  # and it still answers
