"""`zeroship evaluate RUN --data FILE [--onnx]`: a run's winner (or its ONNX bundle) on any data file.

Reads FILE in the run's data format (malformed lines fail with file:line), evaluates with the same
code as training, and prints the per-label report; `--json OUT` also writes metrics and report.
"""

from __future__ import annotations

import sys
from pathlib import Path

from zeroship.cli import Parser, out, run_cli
from zeroship.errors import Problem, ZeroshipError

PURPOSE = "zeroship evaluate"


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="zeroship evaluate", description="Evaluate a run (or its ONNX bundle) on a data file.")
    p.add_argument("run", help="run-42, 42 or latest")
    p.add_argument("--data", required=True, metavar="FILE", help="a file in the run's data format")
    p.add_argument("--runs", default="runs", metavar="DIR")
    p.add_argument("--onnx", action="store_true", help="evaluate the exported bundle with onnxruntime")
    p.add_argument("--variant", default="fp32", choices=["fp32", "optimized", "int8", "fp16"])
    p.add_argument("--json", metavar="OUT", help="also write {metrics, report} to this file (a new file, or an "
                   "earlier result of this command; never inside a run folder)")
    p.add_argument("--force", action="store_true", help="let --json replace a file this command did not write")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    return run_cli(lambda: evaluate(args))


def evaluate(args) -> int:
    import yaml
    from transformers import AutoTokenizer

    from export.onnx import ort_forward, resolve_run
    from export.runtime import BundleError, Predictor
    from launcher.data.parse import load_dataset
    from launcher.eval.evaluate import evaluate_model
    from launcher.eval.report import print_report
    from launcher.nn.model import load_model, read_model_json
    from launcher.runs.outputs import check_output, write_output

    if args.json:  # refused before the evaluation's work, not after it
        check_output(Path(args.json), PURPOSE, "--json", force=args.force)
    run = resolve_run(args.run, args.runs)
    meta = read_model_json(run.best_dir)  # the labels, so that bad data is refused before the model is built
    data = dict(yaml.safe_load((run.dir / "recipe.yaml").read_text())["data"])
    data.update(train=args.data, validation=args.data, test=None, labels=meta["labels"])  # closed label set
    examples = load_dataset(data, meta["task"], sample="train").splits["validation"].examples  # read once whole
    model, _ = load_model(run.best_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(run.best_dir))
    forward, engine = None, "pytorch"
    if args.onnx:
        bundle = run.bundle_dir
        try:  # the whole bundle checked (export.runtime.check_bundle), as every reader of one does
            predictor = Predictor.load(bundle, variant=args.variant)
        except BundleError as exc:
            if "not in this bundle" in str(exc):
                raise ZeroshipError(Problem("--variant", f"{args.variant} is not in {bundle}")) from None
            raise ZeroshipError(Problem(str(bundle), str(exc), f"zeroship export onnx {run.id}")) from None
        forward = ort_forward(predictor.session, list(predictor.manifest["inputs"]))
        engine = f"onnx {args.variant}"
    result = evaluate_model(model, tokenizer, meta["task"], meta["labels"], examples, meta["max_length"],
                            meta["stride"], with_report=True, forward=forward)
    report = result.pop("report")
    print_report(report, f"{run.id} on {args.data} ({engine})", out)
    out.print("  ".join(f"{k}={v:.4f}" for k, v in result.items()), highlight=False)
    if args.json:
        try:
            write_output(Path(args.json), {"run": run.id, "data": args.data, "engine": engine, "metrics": result,
                                           "report": report}, PURPOSE)
        except OSError as exc:
            raise ZeroshipError(Problem(f"--json {args.json}", f"cannot be written ({exc.strerror})")) from None
    return 0
