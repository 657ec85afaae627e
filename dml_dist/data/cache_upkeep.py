"""Upkeep of the cache's entries on a shared filesystem: one builder per entry under a lock file with a heartbeat
(a dead builder's lock is taken over, whatever its host), the ``last_used`` stamp of every entry a start uses, and
the age cleanup of superseded entries (never by another host's PIDs)."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from collections.abc import Callable

HEARTBEAT_S = 5  # a builder touches its lock this often


STALE_S = 60  # a lock untouched this long belongs to a dead builder (any host): it is taken over


class BuildLock:
    """One builder per entry, across the processes, nodes and jobs that share ``cache_dir``: a lock file
    created with O_EXCL holding a unique token, kept fresh by a heartbeat thread. A waiter takes it over
    when its modification time has not moved for ``STALE_S`` of the waiter's own clock (hosts' clocks may
    disagree): a killed or lost builder, on any host. ``acquire`` returns False when the entry was finished
    by another builder while this one waited."""

    def __init__(self, entry: str, ready: Callable[[], bool], log: Callable[[str], None]):
        self.path, self.ready, self.log = f"{entry}.lock", ready, log
        self.token = f"{socket.gethostname()}:{os.getpid()}:{time.time_ns()}"
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def _read(self, path: str) -> tuple | None:
        try:
            with open(path) as f:
                return f.read(), os.stat(path).st_mtime_ns
        except FileNotFoundError:
            return None

    def acquire(self) -> bool:
        seen, since, waited = None, time.monotonic(), False
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if self.ready():
                    return False
                now = self._read(self.path)
                if now != seen:  # the holder's heartbeat moved (or a new holder): it is alive
                    seen, since = now, time.monotonic()
                elif now is not None and time.monotonic() - since > STALE_S:
                    self._take_over(now[0])
                    seen, since = None, time.monotonic()
                    continue
                if not waited:
                    self.log(f"cache: waiting for the builder that holds {self.path}")
                    waited = True
                time.sleep(0.5)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(self.token)
            self._beat = threading.Thread(target=self._heartbeat, daemon=True)
            self._beat.start()
            return True

    def _take_over(self, stale_token: str) -> None:
        """Move the stale lock aside; if another waiter replaced it in between (the moved file is not the
        one judged stale), put that live lock back, unless a third has meanwhile taken the place."""
        aside = f"{self.path}.dead-{self.token}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        moved = self._read(aside)
        if moved is not None and moved[0] != stale_token:
            try:
                os.link(aside, self.path)  # fails if a lock is there again
            except FileExistsError:
                pass
        else:
            self.log(f"cache: took over {self.path} from a dead builder ({stale_token}), silent for {STALE_S}s")
        os.remove(aside)

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError as e:  # a passing network filesystem error: try again at the next beat
                self.log(f"cache: heartbeat of {self.path} failed ({e}); retrying")

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        if (self._read(self.path) or ("",))[0] == self.token:  # never another builder's lock
            os.remove(self.path)


def remove_dead_builds(entry: str) -> None:
    """Temporary folders of builders of this entry that died (killed, preempted, a lost node): they can be
    tens of GB. Called by the lock's holder, the only live builder, so every other one is dead."""
    folder, prefix = os.path.dirname(entry), f"{os.path.basename(entry)}.tmp-"
    for name in os.listdir(folder):
        if name.startswith(prefix):
            shutil.rmtree(os.path.join(folder, name), ignore_errors=True)


USED = "last_used"  # an entry's stamp, touched by every start that uses it (the age cleanup reads it)


def mark_used(entry: str) -> None:
    """Stamp ``entry`` as in use now (best effort: a read-only prebuilt cache stays usable)."""
    try:
        path = os.path.join(entry, USED)
        with open(path, "a"):
            pass
        os.utime(path)
    except OSError:
        pass


class UseStamp:
    """Keeps the stamps of the entries this process maps fresh while it runs (a daemon thread, hourly), so
    a job longer than ``cache_keep_days`` never has its entry removed under it."""

    entries: set = set()
    thread: threading.Thread | None = None

    @classmethod
    def keep(cls, entry: str) -> None:
        mark_used(entry)
        cls.entries.add(entry)
        if cls.thread is None:
            cls.thread = threading.Thread(target=cls._run, name="dml-cache-stamp", daemon=True)
            cls.thread.start()

    @classmethod
    def _run(cls) -> None:
        while not threading.Event().wait(3600):
            for entry in list(cls.entries):
                mark_used(entry)


def remove_old_entries(entry: str, keep_days: float, log: Callable[[str], None]) -> list[str]:
    """The entries that ``entry`` supersedes (the same split, size, spec and folder, another content key:
    the folder changed since) and that no start has used for ``keep_days`` (0: keep them all): removed,
    renamed aside first (atomic; a node cleaning at the same time skips it). Judged by the stamp's time on
    the shared filesystem, never by PIDs or hosts. Returns the removed paths."""
    if not keep_days:
        return []
    folder, name = os.path.split(entry)
    prefix, cutoff, removed = name[: name.rindex("_") + 1], time.time() - keep_days * 86400, []
    for other in sorted(os.listdir(folder)):
        path = os.path.join(folder, other)
        if not other.startswith(prefix) or other == name or "." in other or not os.path.isdir(path):
            continue  # a lock, a build in progress or another split
        try:
            stamp = os.path.join(path, USED)
            if not os.path.exists(stamp):  # an entry from before the stamps: its age starts now
                mark_used(path)
                continue
            used = os.stat(stamp).st_mtime
            if used >= cutoff:
                continue
            aside = f"{path}.old-{socket.gethostname()}-{os.getpid()}"
            os.rename(path, aside)
            if os.stat(os.path.join(aside, USED)).st_mtime >= cutoff:  # stamped meanwhile: in use again
                os.rename(aside, path)
                continue
        except OSError:  # gone meanwhile: another node cleaned it
            continue
        shutil.rmtree(aside, ignore_errors=True)
        log(
            f"cache: removed {path}, superseded and unused for {(time.time() - used) / 86400:.0f} days "
            f"(cache_keep_days={keep_days:g})"
        )
        removed.append(path)
    return removed
