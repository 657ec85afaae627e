"""One line on stderr for an error, printed once for the whole job (``dml-dist: error: ...``)."""

from __future__ import annotations

import os
import sys
import threading
from datetime import timedelta

from . import faults, stall
from .errors import DMLError

ERROR_PREFIX = "dml-dist: error:"
REPORT_WAIT_S = 30  # how long a rank waits for rank 0 to print an error every rank hit (normally < 1 s)


def report_error(e: DMLError) -> None:
    """One line on stderr, once per error: rank 0 speaks for an error every rank hits, a rank-specific one
    names its rank. The other ranks wait (at most ``REPORT_WAIT_S``) for rank 0's key in the group's store
    (``e.store``) before they exit, since an exit makes the launcher stop rank 0 too; when rank 0 is stuck,
    the first rank to notice prints the line itself. Without a group yet (a config error) the others wait for the
    launcher, which stops them once rank 0 has exited with its line."""
    if getattr(e, "reported", False):
        return
    e.reported = True
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if rank == 0 or not e.all_ranks:
        faults.before_error_report(rank)
        where = f" (rank {rank})" if world > 1 and not e.all_ranks else ""
        print(f"{ERROR_PREFIX}{where} {e}", file=sys.stderr, flush=True)
    if world == 1 or not e.all_ranks:
        return
    # one count on every rank: init_distributed agrees on it (a shared store outlives restarts)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    key = f"dml_error_reported/{attempt}"
    store, e.store = e.store, None
    if store is None:
        if rank != 0:
            threading.Event().wait(REPORT_WAIT_S)  # normally ended by the launcher's SIGTERM
            if int(os.environ.get("LOCAL_RANK", "0")) == 0:  # one line per node at most
                print(f"{ERROR_PREFIX} (rank {rank}) {e}", file=sys.stderr, flush=True)
        return
    try:
        if rank == 0:
            store.set(key, "1")
            return
        store.wait([key], timedelta(seconds=REPORT_WAIT_S))
        return
    except Exception:  # noqa: BLE001  timed out, or the store's host (rank 0) has exited: its line is out
        pass
    try:
        store.set_timeout(timedelta(seconds=5))
        if store.check([key]):
            return
        # rank 0 is alive (its store answers) but has not printed: the first rank here speaks for it
        first = store.compare_set(f"dml_error_fallback/{attempt}", "", str(rank))
    except Exception:  # noqa: BLE001  rank 0's store is gone: its line is out
        return
    if first.decode() == str(rank):
        print(f"{ERROR_PREFIX} (rank {rank}) {e}", file=sys.stderr, flush=True)


def report_lost_contact(e: BaseException) -> None:
    """Another rank died mid-collective: one line from this rank (its own error, or torchrun's report,
    says why). Reports ``e`` once."""
    if getattr(e, "dml_reported", False) or stall.reported():  # the stall line said why already
        return
    e.dml_reported = True
    first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    print(
        f"{ERROR_PREFIX} (rank {os.environ.get('RANK', '0')}) lost contact with another rank ({first}); "
        f"see that rank's error",
        file=sys.stderr,
        flush=True,
    )
