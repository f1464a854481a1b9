"""Where a run's logs go: `runs/run-N/logs/`, not the console.

By default the console carries what `launch` itself says (plan, progress bar, one line per evaluation,
results, errors). Everything else — Ray's own messages, the Ray Train workers' stdout/stderr (model
loading bars, DeepSpeed build messages, `TrainingReport(...)` dumps), DeepSpeed's and transformers'
messages in the driver — goes to files in the run's `logs/` folder:

- `driver.log`: the driver's Python loggers (ray, DeepSpeed, transformers, warnings) and the output of
  library calls run under `RunLogs.quiet()` (DeepSpeed's ZeRO merge prints to stdout);
- `workers/`: each Ray worker process's `.out`/`.err` of this job, copied from Ray's session folder when
  the run ends (Ray writes them there whether or not it streams them).

`launch -v` streams them all to the console as well (Ray's `log_to_driver`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import warnings
from pathlib import Path

LIBRARY_LOGGERS = ("ray", "ray.data", "DeepSpeed", "deepspeed", "transformers", "mlflow", "py.warnings", "filelock")


class RunLogs:
    def __init__(self, run_dir: Path, verbose: bool = False):
        self.dir = Path(run_dir) / "logs"
        self.verbose = verbose
        self.driver_log = self.dir / "driver.log"
        self._handler: logging.Handler | None = None

    def start(self) -> None:
        """Send the library loggers of this process to driver.log (and, unless verbose, only there)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self._handler = logging.FileHandler(self.driver_log, encoding="utf-8")
        self._handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self._handler.setLevel(logging.INFO)  # Ray Data's logger passes DEBUG records on
        logging.captureWarnings(True)
        import ray  # noqa: F401  (Ray sets its loggers' handlers up on import: take them over after that)

        self.reroute()
        if not self.verbose:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()

    def reroute(self) -> None:
        """Attach driver.log to each library logger and (unless verbose) take its console handlers away;
        called again after library calls, since a library may create its logger's handler on import."""
        for name in LIBRARY_LOGGERS:
            logger = logging.getLogger(name)
            if self._handler not in logger.handlers:  # levels stay the libraries' own
                logger.addHandler(self._handler)
            if not self.verbose:
                for handler in list(logger.handlers):
                    if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                        logger.removeHandler(handler)
                logger.propagate = False

    @contextlib.contextmanager
    def quiet(self):
        """Run a library call whose prints and progress bars belong in driver.log, not on the console."""
        if self.verbose or self._handler is None:
            yield
            return
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                yield
            finally:
                self.reroute()
                self._append(buffer.getvalue())

    def _append(self, text: str) -> None:
        if text.strip():
            with open(self.driver_log, "a", encoding="utf-8") as fh:
                fh.write(text if text.endswith("\n") else text + "\n")

    def collect_workers(self) -> int:
        """Copy this job's worker logs from Ray's session folder (this node's) into logs/workers/;
        returns how many files were copied. Workers on other nodes: `ray logs` on the cluster."""
        try:
            import ray

            node = ray._private.worker.global_worker.node  # Ray has no public API for the local log folder
            source = Path(node.get_logs_dir_path())
            job = ray.get_runtime_context().get_job_id()
        except Exception:  # not connected, or Ray's internals moved: nothing to copy
            return 0
        target = self.dir / "workers"
        copied = 0
        for path in sorted(source.glob(f"worker-*-{job}-*.*")):
            if path.suffix in (".out", ".err") and path.stat().st_size > 0:
                target.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target / path.name)
                copied += 1
        return copied

    def error_tail(self, lines: int = 25) -> str:
        """The end of the worker stderr that holds a traceback (the likeliest cause of a failure)."""
        candidates = sorted((self.dir / "workers").glob("*.err"), key=lambda p: p.stat().st_mtime)
        for path in reversed(candidates):
            text = path.read_text(encoding="utf-8", errors="replace")
            if "Traceback" in text or "Error" in text:
                return f"{path}:\n" + "\n".join(text.rstrip().splitlines()[-lines:])
        return ""
