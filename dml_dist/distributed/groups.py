"""The process groups this package creates besides the default one, and the timeouts every group gets.

Groups are created on first use, collectively (every rank reaches the creating call), and forgotten by
``destroy_distributed``.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch.distributed as dist

from ..errors import DMLError
from .context import DistContext

DEFAULT_TIMEOUT_S = 600


_GROUPS: dict = {}


def collective_timeout(cfg: dict | None = None) -> timedelta:
    """How long a collective may wait for the slowest rank: config ``timeout``, else the environment's
    ``DML_DIST_TIMEOUT``, else 600 s. Every group this package creates gets it (subgroups do not inherit
    the default group's)."""
    if cfg is not None and cfg.get("timeout") is not None:
        return timedelta(seconds=cfg["timeout"])
    raw = os.environ.get("DML_DIST_TIMEOUT", str(DEFAULT_TIMEOUT_S))
    if not raw.isdigit() or int(raw) < 5:
        raise DMLError(f"DML_DIST_TIMEOUT={raw!r} is not a whole number of seconds >= 5; fix or unset it")
    return timedelta(seconds=int(raw))


def stall_margin(detect: timedelta) -> timedelta:
    """How much longer than the stall detection (``timeout``) a collective may wait: the line that names
    the stalled rank comes from the heartbeats at ``timeout`` (``stall.StepWatch``), before any backend ends
    the wait (NCCL's watchdog aborts the process then, without a word)."""
    return timedelta(seconds=max(10.0, 0.1 * detect.total_seconds()))


def group_timeout() -> timedelta:
    """The timeout the process groups are created with: ``collective_timeout`` plus ``stall_margin``."""
    return _GROUPS.get("timeout") or collective_timeout() + stall_margin(collective_timeout())


def stall_timeout() -> timedelta:
    """How long a step may wait in a collective before rank 0 names the rank that stopped answering."""
    return _GROUPS.get("detect") or collective_timeout()


def is_active() -> bool:
    """A process group exists: run the real collective (also for a world of one)."""
    return dist.is_initialized()


def group_size(group=None) -> int:
    return dist.get_world_size(group) if is_active() else 1


def rank() -> int:
    return dist.get_rank() if is_active() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0")) if is_active() else 0


def long_group():
    """A gloo group over the world without the collective timeout, for waits that legitimately take long
    (a node decoding a large image folder into its cache). Created on first use: collective."""
    if not is_active():
        return None
    if "long" not in _GROUPS:
        _GROUPS["long"] = dist.new_group(backend="gloo", timeout=timedelta(days=7))
    return _GROUPS["long"]


def node_group(local_world_size: int):
    """The group of this node's ranks (torchrun numbers ranks node by node: node ``rank // L``), and this
    rank's index in it. None (the whole world) on a single node. Created on first use: collective (every
    rank creates every node's group, in order)."""
    if not is_active() or local_world_size >= dist.get_world_size():
        return None
    if "node" not in _GROUPS:
        world, me = dist.get_world_size(), dist.get_rank()
        if world % local_world_size:
            raise DMLError(
                f"{world} ranks do not split into nodes of {local_world_size}; start the same "
                f"--nproc_per_node on every node"
            )
        for first in range(0, world, local_world_size):
            g = dist.new_group(list(range(first, first + local_world_size)), timeout=group_timeout())
            if first <= me < first + local_world_size:
                _GROUPS["node"] = g
    return _GROUPS["node"]


def decode_group(ctx: DistContext):
    """The stream path's decode unit for this rank: ``(group, (g, G), rows)``. The ranks of one node that
    train on the same rows of each batch (uniform layouts: the same replica index; ``rows=(r, R)``) split
    those rows between them (``g`` of ``G``) and assemble them with one all-gather in ``group`` (None: the
    whole world; a group of one needs no collective). Uneven layouts: the node's ranks decode the whole
    batch (``rows=(0, 1)``) and each keeps its share. Created on first use: collective (every rank creates
    every group, in the same order)."""
    if "decode" in _GROUPS:
        return _GROUPS["decode"]
    local = max(1, ctx.local_world_size)
    if ctx.world_size % local:
        raise DMLError(
            f"{ctx.world_size} ranks do not split into nodes of {local}; start the same --nproc_per_node on every node"
        )

    def key(rank: int):
        node = rank // local
        return (node, ctx.replica_of(rank)) if ctx.uniform else (node, 0)

    units: dict = {}
    for r in range(ctx.world_size):
        units.setdefault(key(r), []).append(r)
    mine = units[key(ctx.rank)]
    group = None
    if is_active() and len(units) > 1:
        for k in sorted(units):
            g = dist.new_group(units[k], timeout=group_timeout()) if len(units[k]) > 1 else None
            if k == key(ctx.rank):
                group = g
    rows = (ctx.replica, ctx.replicas) if ctx.uniform else (0, 1)
    unit = (group, (mine.index(ctx.rank), len(mine)), rows)
    if is_active():  # destroy_distributed forgets it with the groups
        _GROUPS["decode"] = unit
    return unit


def host_group(group=None):
    """The group for host-side (CPU) collectives: a given ``group`` as it is (this package creates its
    subgroups with the default group's backend string); for a default group without a CPU backend (a user's own
    NCCL-only group around ``train_dml``), a gloo group over the same ranks, created once (collective on first use:
    every rank reaches it through the same call)."""
    if group is not None or "cpu:" in dist.get_backend_config():
        return group
    if "host" not in _GROUPS:
        _GROUPS["host"] = dist.new_group(backend="gloo", timeout=group_timeout())
    return _GROUPS["host"]
