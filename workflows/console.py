"""What a person sees: the project's own lines on the console, library chatter in a log file.

A command prints its stages, progress with an ETA, results and where they went to stdout, and its own errors
and warnings to stderr. Everything else -- Ray's, MLflow's, DeepSpeed's and PyTorch's messages and warnings,
from Python or from C++ -- lands in `logs/<command>-<time>.log` ($EVL_LOG_DIR), and Ray's workers keep theirs
in Ray's session logs. `evl <command> --verbose` shows all of it on the console, as the libraries print it.

Progress comes from the MLflow run that rank 0 writes, read back by the driver: the workers' own output never
has to reach the console, on a laptop or through `ray job logs`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

# During a session: copies of the real stdout/stderr for the project's own lines, while fds 1 and 2 are the
# log file. Outside one: None, i.e. whatever sys.stdout / sys.stderr are at the time (a test's capture too).
_streams: dict[str, object] = {"out": None, "err": None}
_session = {"verbose": True, "log": None}


@contextlib.contextmanager
def session(command: str, verbose: bool = False) -> Iterator[Path | None]:
    """Route library output to a log file for one command (nothing changes with verbose). Yields its path.

    The process's own file descriptors 1 and 2 point at the log, so what C++ code, subprocesses and libraries
    print lands there; the project's own lines (`say`, `warn`) go to copies of the real ones. Where stdout or
    stderr is already captured (a test calling main()), it is left as it is.
    """
    _session["verbose"] = verbose
    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        yield None
        return
    log_dir = Path(os.environ.get("EVL_LOG_DIR", "logs"))
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / f"{command}-{datetime.now():%Y%m%d-%H%M%S}.log"
    log_file = open(path, "a", buffering=1)
    saved = {}
    for fd, stream in ((1, sys.stdout), (2, sys.stderr)):
        if _is_fd(stream, fd):
            stream.flush()
            saved[fd] = os.dup(fd)
            os.dup2(log_file.fileno(), fd)
            _streams["out" if fd == 1 else "err"] = os.fdopen(os.dup(saved[fd]), "w", buffering=1)
    root = logging.getLogger()
    handler = logging.StreamHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    own = _WarningHandler(logging.WARNING)  # the project's warnings stay visible
    own.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    logging.getLogger("evl").addHandler(own)
    logging.captureWarnings(True)
    _session["log"] = path
    try:
        yield path
    finally:
        logging.getLogger("evl").removeHandler(own)
        root.removeHandler(handler)
        logging.captureWarnings(False)
        for fd, stream in ((1, sys.stdout), (2, sys.stderr)):
            stream.flush()
            if fd in saved:
                _streams.pop("out" if fd == 1 else "err").close()
                os.dup2(saved[fd], fd)
                os.close(saved[fd])
        _streams.update(out=None, err=None)
        log_file.close()
        _session["log"] = None


def _is_fd(stream, fd: int) -> bool:
    try:
        return stream.fileno() == fd
    except (AttributeError, OSError, ValueError):
        return False


def verbose() -> bool:
    return bool(_session["verbose"])


def log_path() -> Path | None:
    return _session["log"]


def stdout():
    return _streams["out"] or sys.stdout


def stderr():
    return _streams["err"] or sys.stderr


def say(text: str = "", end: str = "\n") -> None:
    """A line of the project's own output."""
    print(text, end=end, file=stdout(), flush=True)


def warn(text: str) -> None:
    """The project's own error or warning, on stderr."""
    print(text, file=stderr(), flush=True)


class _WarningHandler(logging.Handler):
    """The project's logged warnings, on the console's stderr of the moment."""

    def emit(self, record: logging.LogRecord) -> None:
        warn(f"{record.levelname}: {record.getMessage()}")


def duration(seconds: float) -> str:
    """62 -> '1m02s', 3725 -> '1h02m'."""
    if seconds != seconds or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


# --------------------------------------------------------------------------------------------------------------
# Progress, read from MLflow while Ray runs the work


class _Poller:
    """A daemon thread calling `poll()` every `every_s` seconds until stopped (then once more)."""

    every_s = 2.0

    def __init__(self):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.interactive = stdout().isatty()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self.finish()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.poll()
            except Exception as e:  # noqa: BLE001 - a flaky read of the tracking store must not stop the run
                logging.getLogger("evl.console").info(f"progress poll failed: {e}")

    def poll(self) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        with contextlib.suppress(Exception):  # what happened since the last poll (the last trials, the last step)
            self.poll()
        if self.interactive:
            say("\r\033[K", end="")

    def show(self, line: str, keep: bool) -> None:
        """On a terminal, rewrite one status line in place; `keep` lines stay. Elsewhere only `keep` lines."""
        if self.interactive:
            say(f"\r\033[K{line}", end="\n" if keep else "")
        elif keep:
            say(line)


class RunProgress(_Poller):
    """A training run's progress: a line per tenth of the steps (on a terminal, one line kept up to date) and
    one per evaluation, from the metrics rank 0 logs to MLflow."""

    def __init__(self, tracking_uri: str, run_id: str, total_steps: int, indent: str = "  "):
        super().__init__()
        from mlflow.tracking import MlflowClient

        self.client, self.run_id, self.total, self.indent = MlflowClient(tracking_uri), run_id, total_steps, indent
        self.last_step, self.last_tenth, self.evals_seen = 0, 0, 0

    def poll(self) -> None:
        history = self.client.get_metric_history(self.run_id, "loss")
        if history and history[-1].step != self.last_step:
            self.last_step = step = history[-1].step
            metrics = self.client.get_run(self.run_id).data.metrics
            tenth = step * 10 // self.total
            line = (f"{self.indent}step {step:>{len(str(self.total))}}/{self.total}  "
                    f"loss {metrics.get('loss', 0):.3f}  train top-1 {metrics.get('train_top1', 0):.3f}  "
                    f"{metrics.get('system/clips_per_s', 0):.1f} clips/s  "
                    f"data wait {metrics.get('system/data_wait_frac', 0):.0%}  "
                    f"ETA {duration(metrics.get('system/eta_s', float('nan')))}")
            self.show(line, keep=tenth > self.last_tenth)
            self.last_tenth = max(self.last_tenth, tenth)
        evals = self.client.get_metric_history(self.run_id, "val_top1")
        for point in evals[self.evals_seen:]:
            top5 = {m.step: m.value for m in self.client.get_metric_history(self.run_id, "val_top5")}
            self.show(f"{self.indent}step {point.step}: validation top-1 {point.value:.3f}"
                      + (f"  top-5 {top5[point.step]:.3f}" if point.step in top5 else ""), keep=True)
        self.evals_seen = len(evals)


class SweepProgress(_Poller):
    """A sweep's progress: a line per trial that ends (with its result and the sweep's ETA), and on a terminal
    the running trials' steps, from the child runs under the sweep's MLflow parent run."""

    every_s = 3.0

    def __init__(self, tracking_uri: str, parent_run_id: str, total_trials: int, total_steps: int):
        super().__init__()
        from mlflow.tracking import MlflowClient

        self.client, self.parent = MlflowClient(tracking_uri), parent_run_id
        self.total, self.steps = total_trials, total_steps
        self.experiment = self.client.get_run(parent_run_id).info.experiment_id
        self.done: set[str] = set()
        self.start = time.time()

    def poll(self) -> None:
        runs = self.client.search_runs([self.experiment], f"tags.mlflow.parentRunId = '{self.parent}'")
        running = []
        for run in sorted(runs, key=lambda r: r.info.start_time):
            if run.info.status == "RUNNING":
                history = self.client.get_metric_history(run.info.run_id, "loss")
                step = history[-1].step if history else 0
                running.append(f"{run.info.run_name} step {step}/{self.steps}")
            elif run.info.run_id not in self.done:
                self.done.add(run.info.run_id)
                seconds = ((run.info.end_time or 0) - run.info.start_time) / 1000
                top1 = run.data.metrics.get("val_top1")
                elapsed = time.time() - self.start
                eta = elapsed / len(self.done) * (self.total - len(self.done))
                line = f"  trial {len(self.done)}/{self.total}  {run.info.run_name:<28} {run.info.status.lower():<9}"
                line += f" top-1 {top1:.3f}" if top1 is not None else ""
                line += f"  ({duration(seconds)})"
                line += f"  sweep ETA {duration(eta)}" if len(self.done) < self.total else ""
                self.show(line, keep=True)
        if running:
            self.show("  running: " + ", ".join(running), keep=False)
