"""How often Node.js gives Predictor's answers: examples/node (installed into a temporary copy with
`npm install --ignore-scripts`) serves each bundle, once per engine (Transformers.js's pipeline,
onnxruntime-node) and dtype (fp32, q8), and is sent a CoNLL file's sentences; a sentence agrees when its
entities are Predictor's (pipeline: label and text, case- and space-folded, since the pipeline decodes
pieces; ort: label and character span). A casing bundle has no pipeline row (its token types are casing
classes, which the pipeline cannot compute).

    .venv/bin/python benchmarks/node_agreement.py --bundle first=/tmp/a/run-1/onnx --bundle every=/tmp/b/run-1/onnx
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import tempfile
import unicodedata
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.results import append_results  # noqa: E402
from export.runtime import Predictor  # noqa: E402
from launcher.data.parse import read_conll  # noqa: E402

DTYPES = {"fp32": "fp32", "q8": "int8"}


def folded(text: str) -> str:
    return "".join(c for c in unicodedata.normalize("NFD", text.lower())
                   if not c.isspace() and unicodedata.category(c) != "Mn")


def key(engine: str, entity: dict) -> tuple:
    return (entity["label"], folded(entity["text"])) if engine == "pipeline" else (
        entity["label"], entity["start"], entity["end"])


def node_predictions(example: Path, bundle: Path, engine: str, dtype: str, texts: list[str]) -> list:
    proc = subprocess.Popen(["node", "server.mjs", str(bundle), "--port", "0", "--engine", engine, "--dtype", dtype],
                            cwd=example, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        if not line.startswith("listening on "):
            raise SystemExit(f"the service did not start: {line}{proc.stderr.read()[-2000:]}")
        url, out = line.split()[2], []
        for start in range(0, len(texts), 64):
            body = json.dumps({"texts": texts[start:start + 64]}).encode()
            req = urllib.request.Request(f"{url}/predict", body, {"content-type": "application/json"})
            with urllib.request.urlopen(req, timeout=300) as res:
                out += json.loads(res.read())["predictions"]
        return out
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", action="append", required=True, metavar="NAME=PATH")
    ap.add_argument("--data", default=str(ROOT / "recipes/data/toy_ner/validation.conll"))
    args = ap.parse_args()
    texts = [" ".join(ex.tokens) for ex in read_conll(args.data)]
    rows = ["| bundle | engine | dtype | sentences with Predictor's entities |", "|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        example = Path(tmp) / "node"
        shutil.copytree(ROOT / "examples" / "node", example, ignore=shutil.ignore_patterns("node_modules"))
        subprocess.run(["npm", "install", "--ignore-scripts", "--no-audit", "--no-fund"], cwd=example, check=True,
                       capture_output=True)
        for spec in args.bundle:
            name, _, path = spec.partition("=")
            bundle = Path(path)
            casing = json.loads((bundle / "manifest.json").read_text()).get("casing")
            for engine in (("ort",) if casing else ("pipeline", "ort")):
                for dtype, variant in DTYPES.items():
                    want = Predictor.load(bundle, variant=variant).predict(texts)
                    got = node_predictions(example, bundle, engine, dtype, texts)
                    same = sum([key(engine, e) for e in g] == [key(engine, e) for e in w] for g, w in zip(got, want))
                    rows.append(f"| {name} | {engine} | {dtype} | {same / len(texts):.1%} ({same} of {len(texts)}) |")
                    print(rows[-1], flush=True)
    command = "benchmarks/node_agreement.py " + " ".join(f"--bundle {shlex.quote(b)}" for b in args.bundle) + (
        f" --data {shlex.quote(args.data)}" if "--data" in sys.argv else "")
    append_results("Node.js (examples/node) against Predictor", command, "\n".join(rows))


if __name__ == "__main__":
    main()
