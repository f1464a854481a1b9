"""Command line: `launch` and `zeroship runs` (the umbrella `zeroship` lives in export.cli, the top
of the dependency graph, so that launcher never imports export).

Exit codes: 0 ok, 2 user error (bad recipe, data, arguments, run id), 1 unexpected failure
(a bug: printed with its traceback), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from zeroship.cli import Parser, out, process_defaults, run_cli
from zeroship.errors import Problem, ZeroshipError


def launch_parser(prog: str = "launch") -> argparse.ArgumentParser:
    p = Parser(prog=prog, description="Validate a recipe and run its fine-tuning on Ray Train + DeepSpeed.")
    p.add_argument("recipe", nargs="?", help="path to a recipe YAML")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-5 scaling.workers=4")
    p.add_argument("--resume", metavar="RUN", help="continue RUN (its driver died) from its latest checkpoint")
    p.add_argument("--check", action="store_true", help="validate and print the plan; start nothing")
    p.add_argument("--runs", metavar="DIR", help="storage root for runs (default: the recipe's run.storage)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="also stream worker and library logs to the console (always kept in runs/RUN/logs)")
    return p


def launch(argv: list[str] | None = None, prog: str = "launch") -> int:
    args = launch_parser(prog).parse_intermixed_args(argv)  # options may come after the overrides

    def go() -> int:
        from launcher.driver.plan import build_plan, print_plan
        from launcher.recipe.schema import load_recipe

        if args.resume:
            return resume(args)
        if not args.recipe:
            raise ZeroshipError(Problem(prog, "no recipe given", f"{prog} recipes/quickstart_ner.yaml"))
        recipe = load_recipe(args.recipe, args.overrides)
        if args.runs:
            recipe = recipe.updated({"run.storage": args.runs})
        plan = build_plan(recipe, args.recipe, check=args.check)
        print_plan(plan, out)
        if args.check:
            if os.environ.get("RAY_ADDRESS"):  # on a cluster: joining starts nothing, and lets us check it
                import ray

                from launcher.driver.cluster import connect_ray

                where = connect_ray(recipe, recipe.run.storage)
                nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
                out.print(f"[green]cluster OK[/]: {where}, {nodes} node(s): resources suffice and every node sees "
                          f"{recipe.run.storage}", highlight=False)
            out.print("[green]recipe OK[/] (--check: nothing started)")
            return 0
        from launcher.driver.launch import launch_run

        return launch_run(plan, recipe_path=args.recipe, overrides=args.overrides, verbose=args.verbose)

    return run_cli(go)


def resume(args) -> int:
    from launcher.driver.launch import execute, resume_run
    from launcher.driver.plan import build_plan, print_plan
    from launcher.runs.registry import Registry

    if args.recipe or args.overrides:
        raise ZeroshipError(Problem("--resume", "takes no recipe or overrides: the run's recipe.yaml is used"))
    run = Registry(args.runs or "runs").get(args.resume)
    plan = build_plan(resume_run(run), str(run.dir / "recipe.yaml"))
    print_plan(plan, out)
    out.print(f"[bold]{run.id}[/] resuming → {run.dir}")
    return execute(run, plan, args.verbose)


# ------------------------------------------------------------------ runs
def runs_command(argv: list[str]) -> int:
    p = Parser(prog="zeroship runs", description="List runs, or show one.")
    p.add_argument("action", nargs="?", default="list", choices=["list", "show"])
    p.add_argument("run", nargs="?", help="run id for `show` (run-42, 42, latest)")
    p.add_argument("--runs", metavar="DIR", default="runs", help="storage root (default: runs)")
    args = p.parse_args(argv)

    def go() -> int:
        from launcher.runs.registry import Registry

        reg = Registry(args.runs)
        if args.action == "show":
            if not args.run:
                raise ZeroshipError(Problem("zeroship runs show", "which run?", "e.g. zeroship runs show latest"))
            return show_run(reg.get(args.run))
        table = Table(title=f"runs in {reg.root}")
        for col in ("id", "state", "task", "winner", "parent", "created"):
            table.add_column(col)
        for run in reg.runs():
            try:
                st = run.status()
            except ZeroshipError as exc:  # one damaged run must not hide the others
                table.add_row(run.id, "[red]unreadable[/]", escape(exc.problems[0].what), "", "", "")
                continue
            win = st.get("winner") or {}
            metric = f"{win['metric']}={win['value']:.4f}" if win.get("value") is not None else ""
            color = {"succeeded": "green", "failed": "red", "running": "yellow"}.get(st.get("state"), "")
            table.add_row(run.id, f"[{color}]{st.get('state')}[/]" if color else str(st.get("state")),
                          str(st.get("task", "")), metric, escape(_short_parent(st.get("parent"))),
                          str(st.get("created", "")))
        out.print(table)
        ignored = reg.not_runs()
        if ignored:
            out.print(f"[dim]not runs, ignored: {escape(', '.join(ignored[:10]))}"
                      f"{f' and {len(ignored) - 10} more' if len(ignored) > 10 else ''}[/]", highlight=False)
        return 0

    return run_cli(go)


def _short_parent(parent: str | None) -> str:
    """`/shared/runs/run-41/best` → `run-41`; a run id or other folder as it is."""
    if not parent:
        return ""
    path = Path(parent)
    return path.parent.name if path.name == "best" and path.parent.name.startswith("run-") else parent


def recipe_diff(run) -> tuple[str, list[tuple[str, str, str]]]:
    """The run's recorded recipe against its base file as it reads now: (base, [(key, base, run)]).
    Shows the command-line overrides, `--runs`, and any edit made to the file since the launch."""
    import yaml

    from launcher.recipe.schema import load_recipe
    from launcher.runs.observe import flatten

    st = run.status()
    base = st.get("recipe")
    recorded = run.dir / "recipe.yaml"
    if not base or not recorded.is_file():
        return str(base), []
    if not Path(base).is_file():
        raise FileNotFoundError(base)
    now = load_recipe(base).as_dict()
    try:  # through the same schema, so fields added to it since the launch do not show as changes
        then = load_recipe(recorded).as_dict()
    except ZeroshipError:
        then = yaml.safe_load(recorded.read_text())
    a, b = flatten(now), flatten(then)
    return base, [(k, json.dumps(a.get(k, "<absent>")), json.dumps(b.get(k, "<absent>")))
                  for k in sorted(set(a) | set(b)) if a.get(k, "<absent>") != b.get(k, "<absent>")]


def show_run(run) -> int:
    st = run.status()
    out.print(f"[bold]{run.id}[/] {st.get('state')}  ({run.dir})")
    if st.get("error"):
        out.print(f"[red]error:[/] {escape(str(st['error']))}", highlight=False)
    if st.get("parent"):
        out.print(f"started from: {escape(st['parent'])}")
    try:
        base, diff = recipe_diff(run)
        if diff:
            table = Table(title=f"recipe: differences from {base}")
            for col in ("key", "base file", "this run"):
                table.add_column(col)
            for row in diff:
                table.add_row(*map(escape, row))
            out.print(table)
        else:
            out.print(f"recipe: {escape(base)} as it is, no overrides", highlight=False)
    except FileNotFoundError as exc:
        out.print(f"recipe: base file {escape(str(exc))} is gone; the run's own copy is {run.dir / 'recipe.yaml'}")
    except ZeroshipError as exc:
        out.print(f"recipe: base file no longer loads ({escape(exc.title)}); the run's own copy is "
                  f"{run.dir / 'recipe.yaml'}", highlight=False)
    if st.get("winner"):
        out.print("winner: " + json.dumps(st["winner"]), highlight=False)
    if st.get("stop_reason") or st.get("wall_seconds"):
        out.print(f"stopped: {st.get('stop_reason')}; wall time {st.get('wall_seconds')} s", highlight=False)
    rows = [m for m in run.metrics() if m.get("kind", "eval") == "eval"]
    if rows:
        keys = [k for k in rows[0] if k.startswith("eval_")]
        table = Table(title="evaluations")
        for col in ["trial", "epoch", "step", *keys]:
            table.add_column(col)
        for m in rows:
            table.add_row(str(m.get("trial", "")), str(m.get("epoch")), str(m.get("step")),
                          *[f"{m[k]:.4f}" if isinstance(m.get(k), float) else str(m.get(k)) for k in keys])
        out.print(table)
    report_file = run.best_dir / "report.json"
    if report_file.is_file():
        from launcher.eval.report import print_report

        for split, report in json.loads(report_file.read_text()).items():
            print_report(report, f"{run.id} {split}: per-label report", out)
    return 0


def launch_entry() -> None:
    process_defaults()
    sys.exit(launch())


if __name__ == "__main__":
    launch_entry()
