"""A stalled rank: heartbeats to the process group's store, rank 0's watch over a step that takes far
longer than usual, and the one line that names the rank that stopped answering when a collective times
out (docs/troubleshooting.md).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections import deque
from datetime import timedelta

import torch.distributed as dist

from .distributed import is_active

_PROGRESS: list = [0, 0, "setup", 0.0]  # this rank's last report, kept locally too


def report_progress(epoch: int, step: int, what: str) -> None:
    """Heartbeat: this rank enters collective ``what`` at (epoch, step). Written to the process group's
    key-value store (a one-way host-side TCP write, no device sync), so that when a collective times out
    the ranks still alive can name the one that stopped answering. Skipped in a world of one."""
    _PROGRESS[:] = [epoch, step, what, time.time()]
    store = default_store() if is_active() and dist.get_world_size() > 1 else None
    if store is not None:
        store.set(f"dml_progress/{dist.get_rank()}", json.dumps(_PROGRESS))


def default_store():
    """The default process group's key-value store (None without a group)."""
    if not is_active():
        return None
    try:  # the default group's store (the rendezvous' TCPStore); private in torch, stable since 1.x
        return dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001
        return None


_TIMEOUT_MESSAGES = ("Timed out waiting", "Application timeout")  # gloo's; NCCL's watchdog aborts instead


def is_timeout(e: BaseException) -> bool:
    """A collective that waited longer than the process group's timeout."""
    return isinstance(e, (RuntimeError, dist.DistError)) and any(m in str(e) for m in _TIMEOUT_MESSAGES)


_REPORTED = threading.Event()  # the stall line is out for the step in flight: lost-contact lines stay quiet


def reported() -> bool:
    return _REPORTED.is_set()


def describe_stall(peer_of, timeout: timedelta, error: BaseException | None = None, behind_only: bool = False):
    """One line: the rank(s) behind this one by their last heartbeat (or that no rank is behind), where this
    rank waited, the fix, and the backend's own first line (``error``: the collective that timed out; None:
    rank 0's watch, before any timeout). ``behind_only``: None unless some rank is behind."""
    store, me, world, now = default_store(), dist.get_rank(), dist.get_world_size(), time.time()
    mine, reports, unreachable = list(_PROGRESS), {}, False
    if store is not None:
        before = store.timeout
        store.set_timeout(timedelta(seconds=5))  # the store lives in rank 0's process, which may be the stalled one
        try:
            for r in range(world):
                try:
                    if r != me and store.check([f"dml_progress/{r}"]):
                        reports[r] = json.loads(store.get(f"dml_progress/{r}"))
                except Exception:  # noqa: BLE001
                    unreachable = True
                    break
        finally:
            try:
                store.set_timeout(before)
            except Exception:  # noqa: BLE001 - the store is gone
                pass
    where = f"rank {me} waited {timeout.total_seconds():.0f} s in {mine[2]} at epoch {mine[0]} step {mine[1]}"
    behind = [r for r, v in reports.items() if (v[0], v[1]) < (mine[0], mine[1])]
    if unreachable:
        what = "rank 0 (peer 1, it hosts the job's key-value store) stopped answering"
    elif behind:
        low = min((reports[r][0], reports[r][1]) for r in behind)
        culprit = [r for r in behind if (reports[r][0], reports[r][1]) == low]
        first = reports[culprit[0]]
        what = ", ".join(f"rank {r} (peer {peer_of(r) + 1})" for r in culprit) + " stopped answering"
        where += f"; its last report: epoch {first[0]} step {first[1]} ({first[2]}), {now - first[3]:.0f} s ago"
    else:
        if behind_only:
            return None
        what = "a rank stopped answering inside the collective (no rank is behind this one by its reports)"
    line = (
        f"{what}: {where}. Check that process (stopped, swapped out, a hung GPU, network or filesystem); "
        f"if its steps legitimately take longer, raise timeout= (seconds)"
    )
    if error is None:
        return line
    first_line = str(error).strip().splitlines()[0][:120] if str(error).strip() else type(error).__name__
    return f"{line} [{first_line}]"


class StepWatch:
    """Rank 0's watch over the step in flight (a daemon thread): a step that has taken far longer than
    usual (``factor`` x the median of recent steps, or half of ``timeout_s`` if that comes first, and at least
    ``floor_s``) is logged while it still waits. At ``timeout_s`` (the stall detection: the collectives' own timeout is
    a margin later, see ``distributed.stall_margin``) it reads the heartbeats and, when a rank is behind, prints the one
    line naming it: on every backend, since NCCL's watchdog would abort the process without one. The job then ends when
    the collective times out (the process groups' timeout)."""

    def __init__(self, logger, timeout_s: float, peer_of=lambda r: r, factor: float = 10.0, floor_s: float = 5.0):
        self.logger, self.timeout_s, self.factor, self.floor_s = logger, timeout_s, factor, floor_s
        self.peer_of = peer_of
        self.named: tuple | None = None  # (epoch, step) whose stall line is out
        self._asked = 0.0  # when the heartbeats were last read (at most every few seconds)
        self.durations: deque = deque(maxlen=200)
        self.current: tuple | None = None  # (epoch, step, started)
        self.warned: tuple | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dml-step-watch", daemon=True)
        self._thread.start()

    def start(self, epoch: int, step: int) -> None:
        """Step ``step`` of ``epoch`` begins now (the previous one, if any, ended)."""
        self._recovered()
        now = time.monotonic()
        if self.current is not None:
            self.durations.append(now - self.current[2])
        self.current = (epoch, step, now)

    def pause(self) -> None:
        """Between epochs (evaluation and checkpoints are not steps): the step in flight ends, no new one."""
        self._recovered()
        if self.current is not None:
            self.durations.append(time.monotonic() - self.current[2])
        self.current = None

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            cur, done = self.current, sorted(self.durations)
            if cur is None or len(done) < 3:
                continue
            median, waited = done[len(done) // 2], time.monotonic() - cur[2]
            if waited > self.timeout_s and not reported() and is_active() and time.monotonic() - self._asked > 5:
                self._asked = time.monotonic()
                self._name_the_stalled_rank(cur[:2])
            if self.warned == cur[:2]:
                continue
            # at the latest at half the detection time, however slow the usual step (a loaded machine)
            if waited > max(min(self.factor * median, self.timeout_s / 2), self.floor_s):
                self.warned = cur[:2]
                self.logger.info(
                    f"slow step: epoch {cur[0]} step {cur[1]} has taken {waited:.1f} s, "
                    f"{waited / max(median, 1e-6):.0f}x the median step ({median:.2f} s); a rank may "
                    f"be stalled: the run stops after timeout={self.timeout_s:.0f} s"
                )

    def _name_the_stalled_rank(self, step: tuple) -> None:
        try:
            line = describe_stall(self.peer_of, timedelta(seconds=self.timeout_s), behind_only=True)
        except Exception:  # noqa: BLE001 - the store went away: the collective's timeout reports it
            return
        if line is not None:
            self.named = step
            _REPORTED.set()
            print(f"dml-dist: error: (rank {dist.get_rank()}) {line}", file=sys.stderr, flush=True)

    def _recovered(self) -> None:
        """The step whose stall line is out has finished after all (the rank answered within the margin):
        say so, and let later failures report again."""
        if self.named is not None:
            self.logger.info(
                f"the rank named stalled at epoch {self.named[0]} step {self.named[1]} answered "
                f"within the collectives' margin; the run goes on"
            )
            self.named = None
            _REPORTED.clear()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
