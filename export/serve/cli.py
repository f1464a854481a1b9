"""`zeroship serve RUN_OR_BUNDLE [...]`: the command line of export.serve.ray_serve."""

from __future__ import annotations

import os
import sys

from export.serve.service import ServeError
from zeroship.cli import Parser, console, out, run_cli
from zeroship.errors import Problem


def serve_parser() -> Parser:
    p = Parser(prog="zeroship serve", description="Serve an exported bundle over HTTP: in this process on one box, "
                "on Ray Serve to scale out (--replicas/--autoscale, RAY_ADDRESS set, --ray-serve, --config-only).")
    p.add_argument("bundle", help="bundle folder, or a run id whose runs/RUN/onnx to serve")
    p.add_argument("--runs", default="runs", metavar="DIR", help="storage root for run ids (default: runs)")
    p.add_argument("--variant", default="auto", choices=["auto", "fp32", "optimized", "int8", "fp16"],
                   help="the model file (default auto: int8, optimized, fp32 on cpu; fp16, optimized, fp32 on cuda)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="onnxruntime's provider (cuda needs onnxruntime-gpu; on Ray Serve a GPU per replica)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    scale = p.add_mutually_exclusive_group()
    scale.add_argument("--replicas", type=int, default=1, metavar="N", help="fixed number of replicas (default 1)")
    scale.add_argument("--autoscale", metavar="MIN:MAX", help="scale replicas between MIN and MAX on load")
    p.add_argument("--threads-per-replica", type=int, default=None, metavar="T",
                   help="CPUs and onnxruntime threads (default: all cores in this process, 1 per Ray Serve replica)")
    p.add_argument("--ray-serve", action="store_true", help="serve on Ray Serve even with one replica on one box")
    p.add_argument("--max-queue", type=int, default=512, metavar="N",
                   help="texts waiting for the model before requests get 503 + Retry-After (default 512)")
    p.add_argument("--access-log", metavar="FILE", help="append one line per request to FILE")
    p.add_argument("-v", "--verbose", action="store_true", help="one line per request on the console, and Ray's logs")
    p.add_argument("--max-batch-size", type=int, default=32, metavar="N", help="texts per model call (default 32)")
    p.add_argument("--batch-wait-ms", type=float, default=5.0, metavar="MS",
                   help="how long a batch waits for more texts (default 5)")
    p.add_argument("--max-texts", type=int, default=256, metavar="N", help="texts per request (default 256)")
    p.add_argument("--max-chars", type=int, default=20_000, metavar="N", help="characters per text (default 20000)")
    p.add_argument("--config-only", action="store_true",
                   help="print a Serve config file for `serve deploy` on a cluster instead of serving")
    return p


def serve_command(argv: list[str]) -> int:
    args = serve_parser().parse_args(argv)

    def go() -> int:
        from pydantic import ValidationError

        from export.runtime import Predictor, pick_variant, providers_for, read_manifest
        from export.serve.ray_serve import ServeOptions, config_yaml, run_forever
        from launcher.runs.registry import bundle_folder

        if not 0 < args.port < 65536:
            raise ServeError(Problem("--port", f"must be 1-65535, got {args.port}"))
        autoscale = None
        if args.autoscale:
            lo, sep, hi = args.autoscale.partition(":")
            if not (sep and lo.isascii() and lo.isdigit() and hi.isascii() and hi.isdigit()):
                raise ServeError(Problem("--autoscale", f"expected MIN:MAX, got {args.autoscale!r}", "e.g. 1:4"))
            autoscale = (int(lo), int(hi))
        bundle = bundle_folder(args.bundle, args.runs)
        on_ray = bool(args.ray_serve or args.replicas > 1 or autoscale or args.config_only
                      or os.environ.get("RAY_ADDRESS"))
        threads = args.threads_per_replica or (1 if on_ray else os.cpu_count() or 1)
        # the whole bundle, checked here before Ray starts (export.runtime.check_bundle): a bad one is exit 2
        # with its field, never a replica that fails to deploy or answers wrongly. On the CPU, also for cuda:
        # the variant a GPU replica picks, without a CUDA context held by this process while it serves.
        if not (args.config_only or os.environ.get("RAY_ADDRESS")):  # the model runs on this machine
            providers_for(args.device)  # cuda without onnxruntime-gpu: exit 2, saying what to install
        first = "CUDAExecutionProvider" if args.device == "cuda" else "CPUExecutionProvider"
        variant = pick_variant(read_manifest(bundle, verify=False), args.variant, [first])
        Predictor.load(bundle, variant=variant, threads=1)
        if on_ray and args.access_log:
            raise ServeError(Problem("--access-log", "is for the one-box server", "on Ray Serve, -v logs one "
                                        "line per request in the replicas' logs"))
        access = access_logger(args.access_log, args.verbose) if not args.config_only else None
        try:
            opts = ServeOptions(bundle=str(bundle.resolve()), variant=variant, device=args.device,
                                replicas=args.replicas, autoscale=autoscale, threads_per_replica=threads,
                                max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms,
                                max_texts=args.max_texts, max_chars=args.max_chars, max_queue=args.max_queue,
                                access_log=access is not None)
        except ValidationError as exc:
            raise ServeError([Problem("--" + str(e["loc"][0]).replace("_", "-") if e["loc"] else
                                     "--max-queue" if "max_queue" in e["msg"] else "options",
                                         e["msg"]) for e in exc.errors()]) from None
        if args.config_only:
            sys.stdout.write(config_yaml(opts, args.host, args.port))
            return 0
        say = lambda msg: out.print(msg, highlight=False, markup=False)  # noqa: E731
        if not on_ray:
            from export.serve.local import run_local

            return run_local(opts, args.host, args.port, say, access)
        return run_forever(opts, args.host, args.port, lambda msg: out.print(msg, highlight=False, markup=False),
                           warn=lambda msg: console.print(msg, highlight=False, markup=False), verbose=args.verbose)

    return run_cli(go)


def access_logger(path: str | None, verbose: bool):
    """Where request lines go: FILE (new, or an access log this command started: it keeps its header
    line; never a file inside a run folder), and the console with -v. None: nowhere."""
    import logging
    from pathlib import Path

    from export.serve.local import ACCESS_LOG_HEADER
    from launcher.runs.outputs import run_folder_of

    if not path and not verbose:
        return None
    log = logging.getLogger("zeroship.access")
    log.setLevel(logging.INFO)
    log.propagate = False
    for handler in list(log.handlers):
        log.removeHandler(handler)
    if verbose:
        log.addHandler(logging.StreamHandler(sys.stdout))
    if path:
        target = Path(path)
        fix = "give a new file, or an access log of an earlier zeroship serve"
        if run_folder_of(target) is not None or target.is_dir() or target.is_symlink():
            raise ServeError(Problem(f"--access-log {path}", "is a folder, a link or inside a run folder", fix))
        try:
            if target.exists():
                with open(target, encoding="utf-8", errors="replace") as fh:
                    if fh.readline() != ACCESS_LOG_HEADER:
                        raise ServeError(Problem(f"--access-log {path}", "exists and is not a zeroship access log",
                                                    fix))
            else:
                target.write_text(ACCESS_LOG_HEADER, encoding="utf-8")
            log.addHandler(logging.FileHandler(target, encoding="utf-8"))
        except OSError as exc:
            raise ServeError(Problem(f"--access-log {path}", f"cannot be written ({exc.strerror})", fix)) from None
    return log
