"""What every DataLoader worker this package starts does first."""

from __future__ import annotations

import os
import socket
import stat


def close_inherited_sockets(_worker_id: int = 0) -> None:
    """``worker_init_fn``: close the TCP sockets the worker inherited from its rank when it was forked (gloo's
    connections to the other ranks, the store's client). The worker decodes only; the rank talks. Left open, they
    keep a SIGKILLed rank's connections alive until its workers notice and exit (up to 5 s later), so the other
    ranks learned of the loss only then, after the launcher may already have stopped them."""
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:  # not Linux: nothing to do here
        return
    for fd in fds:
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            probe = socket.socket(fileno=fd)  # reads the family; detached again below, never closed by it
        except OSError:
            continue
        family = probe.family
        probe.detach()
        if family in (socket.AF_INET, socket.AF_INET6):
            os.close(fd)
