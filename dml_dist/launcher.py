"""Start a local cohort without torchrun: ``dml-train`` run plainly, and ``train_dml`` from a notebook.

The peers are fresh interpreters running ``python -m dml_dist.worker JOB`` under PyTorch's elastic
launcher (what torchrun runs), with a command, not a Python function, as entry point: the caller's
``__main__`` (a notebook, ``python -c``, a script piped on stdin, a script without a main guard) is never
re-imported. The config and any custom datasets travel in ``JOB``, a pickle in a private temporary folder
that is removed afterwards.

Children never outlive the call: the launcher's agent stops every worker when one fails, and on
Ctrl-C/SIGTERM in the caller (its signal handlers turn them into ``SignalException``; they are restored
afterwards, so a notebook's own interrupt handling is left as it was).
"""

from __future__ import annotations

import os
import pickle
import re
import signal
import sys
import tempfile
import threading
import time
import uuid
from typing import TextIO

from .errors import DMLError
from .world import world_size_for


class DMLTrainingError(DMLError):
    """A peer process failed; the message carries that peer's own error."""


def _tail(path: str, start: int, stop: threading.Event, out: TextIO) -> None:
    """Stream rank 0's text log into the caller's stdout (a notebook cell shows it as it comes)."""
    pos = start
    while True:
        done = stop.is_set()
        if os.path.exists(path):
            with open(path) as f:
                f.seek(pos)
                chunk = f.read()
                pos = f.tell()
            for line in chunk.splitlines():
                print(line.split(" ", 2)[-1], file=out, flush=True)  # drop the log file's timestamp
        if done:
            return
        time.sleep(0.5)


def _failure_message(err_dir: str, failures: dict) -> str:
    notes = sorted(os.listdir(err_dir))
    msgs = []
    # The failing peer's own error first; ranks that only lost contact with it are listed when nothing else is.
    for name in [n for n in notes if n.startswith("error")] or notes:
        rank = int(re.search(r"\d+", name).group())
        with open(os.path.join(err_dir, name)) as f:
            msgs.append(f"peer {rank + 1} (rank {rank}): {f.read().strip()}")
    if not msgs:
        msgs = [f"rank {r}: exit code {f.exitcode}" for r, f in sorted(failures.items())]
    return "; ".join(msgs)


def launch_local(cfg: dict, data=None, stream: TextIO | None = None, caller: str = "dml-train") -> dict:
    """Run ``cfg`` (finalized for ``world_size_for(cfg)`` processes) as local peer processes; return rank
    0's summary. ``stream``: None lets the children write to this process's stdout/stderr (the CLI);
    a text stream gets rank 0's log lines while the children's own output goes to files (the API)."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    nproc = world_size_for(cfg)
    # Restarted gloo workers must not read the dead workers' addresses (pytorch/pytorch#135712).
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    log_path = os.path.join(cfg["log_dir"], f"{cfg['experiment_name']}.log")
    summary_path = os.path.join(cfg["log_dir"], f"{cfg['experiment_name']}_summary.json")
    start = os.path.getsize(log_path) if os.path.exists(log_path) else 0
    saved_handlers = (
        {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        if threading.current_thread() is threading.main_thread()
        else {}
    )
    with tempfile.TemporaryDirectory(prefix="dml-launch-") as tmp:
        err_dir = os.path.join(tmp, "errors")
        os.makedirs(err_dir)
        job = os.path.join(tmp, "job.pkl")
        with open(job, "wb") as f:
            # First the caller's import path (so the peers import the caller's own modules, e.g. a dataset
            # defined next to a notebook), then the payload, which may need it to unpickle.
            pickle.dump([p for p in sys.path if p and os.path.isdir(p)], f)
            pickle.dump({"cfg": cfg, "data": data, "error_dir": err_dir}, f)
        redirects = Std.ALL if stream is not None else Std.NONE
        launch = LaunchConfig(
            min_nodes=1,
            max_nodes=1,
            nproc_per_node=nproc,
            run_id=uuid.uuid4().hex,
            rdzv_backend="c10d",
            rdzv_endpoint="localhost:0",
            max_restarts=0,
            monitor_interval=0.1,
            logs_specs=DefaultLogsSpecs(log_dir=os.path.join(tmp, "logs"), redirects=redirects),
        )
        stop = threading.Event()
        tail = None
        if stream is not None:
            tail = threading.Thread(target=_tail, args=(log_path, start, stop, stream), daemon=True)
            tail.start()
        try:
            elastic_launch(launch, sys.executable)("-m", "dml_dist.worker", job)
        except ChildFailedError as e:
            raise DMLTrainingError(f"{caller} failed: " + _failure_message(err_dir, e.failures)) from None
        except SignalException as e:
            # The agent has already stopped every worker.
            if e.sigval == signal.SIGINT:
                raise KeyboardInterrupt from None
            raise DMLError(f"stopped by signal {signal.Signals(e.sigval).name}") from None
        finally:
            stop.set()
            if tail is not None:
                tail.join(timeout=5)
            for s, h in saved_handlers.items():
                signal.signal(s, h)
    import json

    with open(summary_path) as f:
        return json.load(f)
