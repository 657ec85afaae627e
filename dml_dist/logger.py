"""Rank-0 side effects: console + text log, TensorBoard scalars and the other trackers (``trackers.py``), progress
bar, summary JSON.

Non-logging ranks get a ``NullLogger`` with the same methods, so call sites never branch on rank.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterable

from .trackers import make_trackers


class NullLogger:
    def info(self, msg: str) -> None: ...
    def start_run(self, config: dict, resolved: dict, resumed: bool = False) -> str | None: ...
    def scalars(self, values: dict, step: int) -> None: ...
    def artifacts(self, paths: list[str]) -> None: ...
    def progress(self, iterable: Iterable, total: int, desc: str):
        return _NullBar(iterable)

    def write_json(self, name: str, data: dict) -> None: ...
    def close(self, failed: bool = False) -> None: ...


class _NullBar:
    def __init__(self, iterable):
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable)

    def set_postfix_str(self, s: str) -> None: ...
    def close(self) -> None: ...


class RunLogger(NullLogger):
    """Writes ``log_dir/<exp>.log``, TensorBoard events under ``log_dir/<exp>/`` (``loggers`` lists tensorboard),
    JSON files, and feeds the other ``loggers`` (MLflow, wandb)."""

    def __init__(self, log_dir: str, experiment: str, progress_bar: bool = True, stream=None, loggers=("tensorboard",)):
        os.makedirs(log_dir, exist_ok=True)
        self.log_dir, self.experiment = log_dir, experiment
        self.stream = stream or sys.stdout
        self.file = open(os.path.join(log_dir, f"{experiment}.log"), "a", buffering=1)
        self.tb = None
        if "tensorboard" in loggers:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(log_dir, experiment))
        self.trackers, self.started = make_trackers(loggers, log_dir, experiment), []
        self.progress_bar = progress_bar

    def start_run(self, config: dict, resolved: dict, resumed: bool = False) -> str | None:
        """The trackers' run: the config as given and as resolved (once, after start-up resolved it and the
        checkpointer resumed, or not) -> None, or the line saying which tracker could not start."""
        for tracker in self.trackers:
            try:
                tracker.start(config, resolved, resumed)
            except Exception as e:  # noqa: BLE001  (a server that does not answer, a login missing, ...)
                return (
                    f"loggers: {tracker.name} could not start a run ({_why(e)}); check its settings "
                    f"(docs/outputs.md, Trackers) or leave {tracker.name} out of loggers"
                )
            self.started.append(tracker)
        return None

    def _each_tracker(self, call) -> None:
        """``call(tracker)`` for every started tracker; one that fails is named once and left out from then on
        (a tracker must not stop training)."""
        for tracker in list(self.started):
            try:
                call(tracker)
            except Exception as e:  # noqa: BLE001
                self.started.remove(tracker)
                self.info(f"loggers: {tracker.name} failed ({_why(e)}); it gets nothing more from this run")

    def artifacts(self, paths: list[str]) -> None:
        self._each_tracker(lambda t: t.artifacts(paths))

    def info(self, msg: str) -> None:
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}"
        print(msg, file=self.stream, flush=True)
        self.file.write(line + "\n")

    def scalars(self, values: dict, step: int) -> None:
        if self.tb is not None:
            for tag, v in values.items():
                self.tb.add_scalar(tag, v, step)
            self.tb.flush()
        self._each_tracker(lambda t: t.metrics(values, step))

    def progress(self, iterable: Iterable, total: int, desc: str):
        # Off a terminal (CI, log files) the progress lines (print_freq) say the same without carriage returns.
        if not self.progress_bar or not sys.stderr.isatty():
            return _NullBar(iterable)
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)

    def write_json(self, name: str, data: dict) -> None:
        path = os.path.join(self.log_dir, name)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2)
        os.replace(tmp, path)

    def close(self, failed: bool = False) -> None:
        """``failed``: the run did not finish (the trackers' run ends FAILED)."""
        self._each_tracker(lambda t: t.close(failed))
        if self.tb is not None:
            self.tb.close()
        self.file.close()


def _why(e: Exception) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"


def make_logger(is_main: bool, cfg: dict, stream=None) -> NullLogger:
    if not is_main:
        return NullLogger()
    return RunLogger(cfg["log_dir"], cfg["experiment_name"], cfg["progress_bar"], stream, cfg["loggers"])


def format_eta(seconds: float | None) -> str:
    s = int(seconds or 0)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def emit_json_line(result: dict | None, out: str | None = None) -> None:
    """The benchmarks' and the probe's result: one JSON line on stdout, appended to ``out`` too."""
    if result is None:  # not rank 0
        return
    line = json.dumps(result)
    print(line, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")
