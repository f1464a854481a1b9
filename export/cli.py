"""`export onnx RUN`, `export predict BUNDLE TEXT...`, `export bench RUN`.

Also reachable as `zeroship export ...` and `python -m export ...` (`export` alone is a shell builtin
in bash and zsh). Exit codes: 0 ok, 2 user error (unknown run, bad arguments, corrupt bundle),
1 the export itself failed its checks (parity or metric drop) or a bug.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.markup import escape

from launcher.cli import launch, runs_command
from zeroship.cli import Parser, bounded, console, out, process_defaults, run_cli
from zeroship.tasks import Task


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = Parser(prog=prog, description="Export a run's winning checkpoint to ONNX, and use the bundle.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    o = sub.add_parser("onnx", help="export RUN (run-42, 42 or latest) to a verified ONNX bundle")
    o.add_argument("run")
    o.add_argument("--runs", default="runs", metavar="DIR", help="storage root (default: runs)")
    o.add_argument("--out", metavar="DIR", help="bundle folder (default: runs/RUN/onnx)")
    o.add_argument("--opset", type=bounded(int, 14, 20), default=17, help="ONNX opset, 14-20 (default 17)")
    o.add_argument("--optimize", action="store_true", help="apply onnxruntime transformer fusions")
    o.add_argument("--quantize", choices=["int8", "int8-dynamic", "int8-static"],
                   help="int8 for CPU: int8-dynamic, int8-static (calibrated on the training split), or int8 "
                        "(both, keeps the faster within --max-metric-drop)")
    o.add_argument("--fp16", action="store_true", help="also write an fp16 variant (GPU)")
    o.add_argument("--max-length", type=bounded(int, 8, 1 << 20), metavar="N",
                   help="max tokens per window, up to the encoder's positions (default: as trained)")
    o.add_argument("--max-metric-drop", type=bounded(float, -100, 100), default=0.5, metavar="POINTS",
                   help="budget: points of the run's metric a variant may lose (default 0.5); int8 over it keeps "
                        "its most sensitive nodes in fp32, and the export fails if that is not enough")
    pr = sub.add_parser("predict", help="predict with a bundle (or a run's bundle) using the runtime only")
    pr.add_argument("bundle", help="bundle folder, or a run id whose runs/RUN/onnx to use")
    pr.add_argument("texts", nargs="+")
    pr.add_argument("--runs", default="runs", metavar="DIR")
    pr.add_argument("--variant", default="auto", choices=["auto", "fp32", "optimized", "int8", "fp16"])
    pr.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="onnxruntime provider (cuda needs onnxruntime-gpu; default cpu)")
    b = sub.add_parser("bench", help="latency/throughput of PyTorch vs each ONNX variant of RUN's bundle")
    b.add_argument("run")
    b.add_argument("--runs", default="runs", metavar="DIR")
    b.add_argument("--threads", type=bounded(int, 1, 1024), default=2)
    b.add_argument("--repeats", type=bounded(int, 1, 100_000), default=20)
    return p


def main(argv: list[str] | None = None, prog: str = "export") -> int:
    args = build_parser(prog).parse_args(sys.argv[1:] if argv is None else argv)

    def go() -> int:  # export.runtime's BundleError and TextError are ZeroshipErrors: exit 2
        if args.command == "onnx":
            return cmd_onnx(args)
        if args.command == "predict":
            return cmd_predict(args)
        return cmd_bench(args)

    return run_cli(go)


def cmd_onnx(args) -> int:
    from export.onnx import ExportOptions, ParityError, export_run

    opts = ExportOptions(opset=args.opset, optimize=args.optimize, quantize=args.quantize, fp16=args.fp16,
                         max_length=args.max_length, max_metric_drop=args.max_metric_drop,
                         out=Path(args.out) if args.out else None,
                         log=lambda msg: out.print(msg, highlight=False, markup=False))
    try:
        path, manifest = export_run(args.run, args.runs, opts)
    except ParityError as exc:
        console.print(f"[bold red]export failed:[/] {escape(str(exc))}; no bundle was written", highlight=False)
        return 1
    metric = manifest["metric"]
    summary = ", ".join(f"{k} {v[metric]:.4f}" for k, v in manifest["metrics"].items())
    out.print(f"[bold green]bundle written[/] → {path}  ({metric}: {summary})", highlight=False)
    return 0


def cmd_predict(args) -> int:
    from export.runtime import Predictor, check_texts
    from launcher.runs.registry import bundle_folder

    check_texts(args.texts)  # before the bundle loads: `text 1: byte 0xf6 … is not UTF-8`, exit 2
    predictor = Predictor.load(bundle_folder(args.bundle, args.runs), variant=args.variant, device=args.device)
    out.print(f"[dim]{predictor.bundle} ({predictor.variant})[/]")
    for text, result in zip(args.texts, predictor.predict(list(args.texts))):
        out.print(f"[bold]{escape(text)}[/]", highlight=False)
        if predictor.task == Task.TOKEN:
            for ent in result or []:
                out.print(
                    escape(f"  {ent['label']:<6} {ent['text']!r} [{ent['start']}:{ent['end']}] {ent['score']:.3f}"),
                    highlight=False,
                )
            if not result:
                out.print("  (no entities)")
        else:
            out.print(f"  {result['label']} {result['score']:.3f}", highlight=False)
    return 0


def cmd_bench(args) -> int:
    from export.bench import run_bench

    result = run_bench(args.run, args.runs, threads=args.threads, repeats=args.repeats, console=out)
    out.print(json.dumps(result["settings"]), highlight=False)
    return 0


# ------------------------------------------------------------------ umbrella
def zeroship(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = "usage: zeroship {launch,export,serve,runs,evaluate} ...  (zeroship COMMAND --help for more)"
    if not argv or argv[0] in ("-h", "--help"):
        out.print(usage)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "launch":
        return launch(rest, prog="zeroship launch")
    if cmd == "export":
        return main(rest, prog="zeroship export")
    if cmd == "serve":
        from export.serve.cli import serve_command

        return serve_command(rest)
    if cmd == "runs":
        return runs_command(rest)
    if cmd == "evaluate":
        from export.evaluate import main as evaluate_main

        return evaluate_main(rest)
    console.print(f"[bold red]error:[/] unknown command {escape(repr(cmd))}\n{usage}", highlight=False)
    return 2


def export_entry() -> None:
    sys.exit(main())


def zeroship_entry() -> None:
    process_defaults()
    sys.exit(zeroship())
