"""Process-group setup, device placement and the few collectives DML needs.

Peers are not replicas: peers never share a DDP wrapper (a peer's own replicas do, ``parallel.py``). Ranks talk to
exchange logits (one all-gather, or one all-reduce of their softmax sums, per step), batch fingerprints, meters,
validation logits and checkpoint state. Every function here is a collective: call it on every rank.

The collective rule (one rule, every backend):

- The process group always has a CPU backend. With NCCL it is created as ``"cpu:gloo,cuda:nccl"``
  (``process_group_backend``): small host-side collectives (fingerprints, meters, Python objects) go over
  gloo, CUDA tensors (logits) over NCCL. A CPU or shared-GPU placement uses plain ``"gloo"``.
- A tensor is communicated on its own device when the group has a backend for that device type
  (``_comm_device``); otherwise (CUDA tensors in a gloo-only group: peers sharing a GPU) it is staged
  through host memory and the result is copied back.
- Whenever a process group exists, the real collective runs, also in a world of one (torchrun
  ``--nproc_per_node=1``): a one-GPU machine then exercises the same code paths as a node. Only a plain
  process without torchrun (no group) short-circuits.
"""

from __future__ import annotations

import bisect
import itertools
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from functools import cached_property
from typing import Any

import torch
import torch.distributed as dist

from .errors import DMLError
from .placement import (
    Placement,
    assign_gpus,
    exchange_identities,
    gpu_sharers,
    process_group_backend,
    resolve_placement,
)

DEFAULT_TIMEOUT_S = 600


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


@dataclass(frozen=True)
class DistContext:
    """Where this rank stands. ``layout``: replicas per peer (``(R,) * N`` for ``replicas: R``). ``order``:
    how ranks map to (peer, replica): ``peer``-major (peer k's replicas are the ``layout[k]`` ranks after
    peer k-1's) or, on uniform layouts, ``replica``-major (rank = replica * N + peer: the peers of one
    replica index sit together, so a node needs only its replicas' rows). ``replica_group``: this peer's
    replicas (DDP, SyncBN). ``peer_group``: on a uniform layout, the ranks with this rank's replica index,
    one per peer (the exchange runs there); None means the whole world (one replica per peer, or a layout
    that is not a rectangle: the exchange then runs over the world, by batch rows)."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    placement: Placement
    layout: tuple = (1,)
    peer_group: Any = None
    replica_group: Any = None
    order: str = "peer"
    order_why: str = "one replica per peer"

    def __post_init__(self):
        if sum(self.layout) != self.world_size:  # a world of one without torchrun, or before the config check
            object.__setattr__(self, "layout", (1,) * self.world_size)
        if self.order == "replica" and not self.uniform:
            raise ValueError(f"replica-major ranks need one replica count for every peer, not {self.layout}")

    def ranks_of(self, peer: int) -> list[int]:
        """The ranks of ``peer``'s replicas, replica 0 first."""
        return ranks_of(self.layout, self.order, peer)

    def peer_of(self, rank: int) -> int:
        """The peer that ``rank`` trains."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside the layout {self.layout}")
        if self.order == "replica":
            return rank % self.peers
        return bisect.bisect_right(self.first_ranks, rank) - 1

    def replica_of(self, rank: int) -> int:
        if self.order == "replica":
            return rank // self.peers
        return rank - self.first_ranks[self.peer_of(rank)]

    @cached_property
    def first_ranks(self) -> list[int]:
        """Each peer's replica 0 (derived once: the step reads ``peer`` every time)."""
        if self.order == "replica":
            return list(range(self.peers))
        return list(itertools.accumulate(self.layout[:-1], initial=0))

    @property
    def peers(self) -> int:
        return len(self.layout)

    @property
    def uniform(self) -> bool:
        return len(set(self.layout)) == 1

    @cached_property
    def peer(self) -> int:
        return self.peer_of(self.rank)

    @property
    def replica(self) -> int:
        return self.replica_of(self.rank)

    @property
    def replicas(self) -> int:
        """This peer's number of replicas."""
        return self.layout[self.peer]

    def rows(self, batch: int) -> tuple[int, int]:
        """``[lo, hi)``: this rank's rows of its peer's batch of ``batch`` (contiguous share r of R)."""
        part = batch // self.replicas
        return self.replica * part, (self.replica + 1) * part

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        return torch.device(self.placement.device)

    @property
    def restart_count(self) -> int:
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))

    def describe(self) -> dict:
        group = str(dist.get_backend()) if dist.is_initialized() else "none (single process)"
        return {
            "rank": self.rank,
            "peer": self.peer + 1,
            "replica": self.replica,
            "host": socket.gethostname(),
            "device": self.placement.device,
            "backend": self.placement.backend,
            "group": group,
            "threads": self.placement.threads,
            "rank_order": self.order,
        }


_SHARERS: dict = {}  # "gpu": ranks of the job on this rank's physical GPU (from the identity exchange)


def ranks_on_my_gpu() -> int | None:
    """Ranks of the job that use this rank's physical GPU, as the identity exchange found (None: unknown,
    no launcher or no GPU)."""
    return _SHARERS.get("gpu")


def under_launcher() -> bool:
    """True in a process started by torchrun / the elastic launcher (a rendezvous to join)."""
    return "MASTER_ADDR" in os.environ and "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(cfg: dict) -> DistContext:
    """Read torchrun's environment, place this rank, set threads/device, init the process group (under a
    launcher always, also for a world of one, so the real collectives run)."""
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    num_gpus = torch.cuda.device_count() if cfg["device"] != "cpu" else 0
    _GROUPS["detect"] = collective_timeout(cfg)
    _GROUPS["timeout"] = _GROUPS["detect"] + stall_margin(_GROUPS["detect"])
    store, assignment = None, None
    if under_launcher() and not dist.is_initialized():
        # Which physical GPU each rank gets decides the backend, so ask every rank before the group (on CPU
        # the same exchange checks the node numbering).
        store, rank, world = next(dist.rendezvous("env://", timeout=_GROUPS["timeout"]))
        identities = exchange_identities(store, rank, world)
        assignment = assign_gpus(identities, rank) if num_gpus > 0 else None
        _SHARERS["gpu"] = gpu_sharers(identities, rank) if num_gpus > 0 else None
    placement = resolve_placement(
        local_rank, local_world, num_gpus, cfg["device"], cfg["backend"], assignment=assignment
    )
    torch.set_num_threads(placement.threads)
    if placement.device.startswith("cuda"):
        torch.cuda.set_device(torch.device(placement.device))
    if under_launcher() and not dist.is_initialized():
        kwargs = {"device_id": torch.device(placement.device)} if placement.backend == "nccl" else {}
        if store is not None:  # namespaced as init_process_group's own rendezvous does it
            kwargs.update(store=dist.PrefixStore("default_pg", store), rank=rank, world_size=world)
        dist.init_process_group(process_group_backend(placement), timeout=_GROUPS["timeout"], **kwargs)
    if under_launcher() and dist.is_initialized():
        agree_restart_count()
    layout = _layout(cfg, world)
    if dist.is_initialized() and layout is not None and max(layout) > 1:
        order, why = choose_rank_order(cfg, layout, local_world)
        peer_group, replica_group = layout_groups(layout, order, rank, process_group_backend(placement))
        return DistContext(
            rank, world, local_rank, local_world, placement, layout, peer_group, replica_group, order, why
        )
    return DistContext(rank, world, local_rank, local_world, placement, layout or (1,) * world)


def agree_restart_count() -> int:
    """Collective: the highest torchrun restart count of any rank, written back to this process's
    ``TORCHELASTIC_RESTART_COUNT``. Hack: each node's agent counts its own restarts, and an agent restarted
    because another node re-joined the rendezvous does not count it, so nodes can disagree; every rank must
    take the same resume decision and use the same store keys."""
    mine = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    agreed = int(all_gather_tensor(torch.tensor([mine])).max())
    os.environ["TORCHELASTIC_RESTART_COUNT"] = str(agreed)
    return agreed


def _layout(cfg: dict, world: int) -> tuple | None:
    """Replicas per peer, or None when the config does not fit the world (finalize_config then refuses it
    with a message naming both)."""
    r = cfg.get("replicas", 1)
    if r == "auto":
        peers = cfg.get("model_num") or (len(cfg["model"]) if isinstance(cfg.get("model"), list) else None)
        return (world // peers,) * peers if peers and world % peers == 0 else None
    if isinstance(r, list):
        return tuple(r) if sum(r) == world else None
    return (r,) * (world // r) if world % r == 0 else None


def ranks_of(layout: tuple, order: str, peer: int) -> list[int]:
    """The ranks of ``peer``'s replicas under rank ``order`` (``peer``- or ``replica``-major), replica 0 first."""
    if order == "replica":
        return [i * len(layout) + peer for i in range(layout[peer])]
    first = sum(layout[:peer])
    return list(range(first, first + layout[peer]))


def decodes_per_sample(layout: tuple, order: str, local_world_size: int) -> float:
    """How many times the job decodes each training sample on the stream path: a node decodes the rows of
    every replica index it holds once (its ranks split them), so each replica's rows are decoded once per
    node that holds that replica index. Uneven layouts: each node decodes the whole batch."""
    nodes = max(1, sum(layout) // max(1, local_world_size))
    if len(set(layout)) != 1:
        return float(nodes)
    per_replica = [
        len({r // local_world_size for r in (ranks_of(layout, order, k)[i] for k in range(len(layout)))})
        for i in range(layout[0])
    ]
    return sum(per_replica) / layout[0]


def choose_rank_order(cfg: dict, layout: tuple, local_world_size: int) -> tuple[str, str]:
    """``(peer|replica, why)``. ``auto``: replica-major where it decodes each sample fewer times than
    peer-major (replicas that span nodes, on the stream path); otherwise peer-major, which keeps a peer's
    gradient all-reduce within a node."""
    asked = cfg.get("rank_order", "auto")
    if max(layout) == 1:
        return "peer", "one replica per peer"
    if len(set(layout)) != 1:
        if asked == "replica":
            raise DMLError(
                f"rank_order=replica needs the same replica count for every peer, not {list(layout)}; "
                f"use rank_order=peer (or auto)"
            )
        return "peer", "uneven replica counts"
    if asked != "auto":
        return asked, f"rank_order={asked}"
    peer, replica = (decodes_per_sample(layout, o, local_world_size) for o in ("peer", "replica"))
    augment = cfg.get("augment")
    stream = cfg.get("dataset", "imagefolder") == "imagefolder" and (
        cfg.get("loader") == "stream"
        or (cfg.get("loader", "auto") == "auto" and isinstance(augment, (list, tuple)) and "rrc" in augment)
    )
    if not stream:  # the memory path (or not known yet: loader=auto without rrc): every rank holds the set
        return "peer", (
            "rank_order=auto: not the stream path for sure (loader=stream, or rrc with loader=auto), "
            "where every rank holds the whole set; rank_order=replica forces it"
        )
    if replica < peer:
        return "replica", (
            f"rank_order=auto: replica-major decodes each sample {replica:g}x per job, peer-major "
            f"{peer:g}x (each peer's gradient all-reduce then crosses nodes)"
        )
    return "peer", (
        f"rank_order=auto: peer-major decodes each sample {peer:g}x per job, as replica-major "
        f"would, and keeps each peer's gradient all-reduce within its node"
    )


def layout_groups(layout: tuple, order: str, rank: int, backend: str) -> tuple:
    """This rank's peer group (uniform layouts: the ranks with its replica index, one per peer: the
    exchange runs there; None otherwise) and replica group (its peer's replicas: DDP, SyncBN), built with
    plain ``dist.new_group`` and the process group's backend string, which every supported torch accepts
    (a DeviceMesh over ``"cpu:gloo,cuda:nccl"`` needs a recent ``split_group``, and a layout such as
    [1, 3] is no mesh). Collective: every rank creates every group, in the same order."""
    peers = [ranks_of(layout, order, k) for k in range(len(layout))]
    mine = {"peer": None}
    if len(set(layout)) == 1:
        for i in range(layout[0]):
            members = [ranks[i] for ranks in peers]
            g = dist.new_group(members, timeout=group_timeout(), backend=backend)
            if rank in members:
                mine["peer"] = g
    for members in peers:
        g = dist.new_group(members, timeout=group_timeout(), backend=backend)
        if rank in members:
            mine["replica"] = g
    return mine["peer"], mine["replica"]


# What a rank sees when another rank died mid-collective (gloo's TCP pairs, the c10d store).
_CONNECTION_LOST = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "Connection refused",
    "connection closed",
    "Socket Timeout",
)


def is_peer_loss(e: BaseException) -> bool:
    """An error a rank gets when another rank died mid-collective (the cause is on that other rank):
    a network error of the process group, or a connection failure. Any other backend error is not."""
    if isinstance(e, (dist.DistNetworkError, dist.DistStoreError)):
        return True
    return isinstance(e, (RuntimeError, dist.DistError)) and any(s in str(e) for s in _CONNECTION_LOST)


def destroy_distributed() -> None:
    _GROUPS.clear()
    if dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    """A process group exists: run the real collective (also for a world of one)."""
    return dist.is_initialized()


is_active = _active


def group_size(group=None) -> int:
    return dist.get_world_size(group) if _active() else 1


def rank() -> int:
    return dist.get_rank() if _active() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0")) if _active() else 0


_GROUPS: dict = {}


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


def long_group():
    """A gloo group over the world without the collective timeout, for waits that legitimately take long
    (a node decoding a large image folder into its cache). Created on first use: collective."""
    if not _active():
        return None
    if "long" not in _GROUPS:
        _GROUPS["long"] = dist.new_group(backend="gloo", timeout=timedelta(days=7))
    return _GROUPS["long"]


def node_group(local_world_size: int):
    """The group of this node's ranks (torchrun numbers ranks node by node: node ``rank // L``), and this
    rank's index in it. None (the whole world) on a single node. Created on first use: collective (every
    rank creates every node's group, in order)."""
    if not _active() or local_world_size >= dist.get_world_size():
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
    if _active() and len(units) > 1:
        for k in sorted(units):
            g = dist.new_group(units[k], timeout=group_timeout()) if len(units[k]) > 1 else None
            if k == key(ctx.rank):
                group = g
    rows = (ctx.replica, ctx.replicas) if ctx.uniform else (0, 1)
    unit = (group, (mine.index(ctx.rank), len(mine)), rows)
    if _active():  # destroy_distributed forgets it with the groups
        _GROUPS["decode"] = unit
    return unit


def _host_group(group=None):
    """The group for host-side (CPU) collectives: a given ``group`` as it is (this package creates its
    subgroups with the default group's backend string); for a default group without a CPU backend (a user's own
    NCCL-only group around ``train_dml``), a gloo group over the same ranks, created once (collective on first use:
    every rank reaches it through the same call)."""
    if group is not None or "cpu:" in dist.get_backend_config():
        return group
    if "host" not in _GROUPS:
        _GROUPS["host"] = dist.new_group(backend="gloo", timeout=group_timeout())
    return _GROUPS["host"]


def _comm_device(t: torch.Tensor) -> torch.device:
    """The device a tensor travels on: its own when the group has a backend for it (CPU: always; CUDA:
    when NCCL is in the group), else host memory (CUDA tensors of peers sharing a GPU over gloo)."""
    if t.device.type == "cpu" or "nccl" in str(dist.get_backend()):
        return t.device
    return torch.device("cpu")


# torch >= 2.12 deprecates all_gather_into_tensor in favour of all_gather_single (same semantics).
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def all_gather_logits(logits: torch.Tensor, group=None) -> torch.Tensor:
    """[B, ...] on every rank -> [world, B, ...], the same on every rank of ``group``, on ``logits.device``.

    No gradient flows through the result (peers' predictions are targets); the caller keeps its own
    ``logits`` for the backward pass. Sync point: one all-gather per training step.
    """
    return all_gather_start(logits.detach(), group)()


def all_gather_start(t: torch.Tensor, group=None) -> Callable[[], torch.Tensor]:
    """Start gathering ``t`` ([B, ...], equal shapes) over ``group`` without waiting: returns a function
    that waits and gives [world, B, ...] on ``t.device``. On NCCL the wait only orders the current stream
    after the gather (the host goes on); on gloo the gather runs in the group's thread meanwhile. Every
    rank of ``group`` must start its gathers in the same order."""
    if not _active():
        return lambda: t.unsqueeze(0)
    src = t.contiguous()
    dev = _comm_device(src)
    if dev.type == "cpu":
        group = _host_group(group)
    world = dist.get_world_size(group)
    out = torch.empty((world * src.shape[0], *src.shape[1:]), dtype=src.dtype, device=dev)
    work = _ALL_GATHER(out, src.to(dev), group=group, async_op=True)

    def wait() -> torch.Tensor:
        work.wait()
        return out.view(world, *src.shape).to(t.device)

    return wait


def all_reduce_sum(t: torch.Tensor, group=None) -> torch.Tensor:
    """Elementwise sum of ``t`` over the ranks of ``group``, on every one of them, on ``t.device`` (a new
    tensor; ``t`` is untouched). No gradient flows (the DML exchange's sums are targets). Sync point: with
    ``exchange: all_reduce``, the one collective of a training step."""
    if not _active():
        return t.detach().clone()
    dev = _comm_device(t)
    if dev.type == "cpu":
        group = _host_group(group)
    out = t.detach().to(dev, copy=True).contiguous()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out.to(t.device)


def all_gather_tensor(t: torch.Tensor, group=None) -> torch.Tensor:
    """Small tensor of equal shape on every rank -> [world, ...] on every rank (fingerprints, meters)."""
    return all_gather_logits(t, group)


def gather_to_main(t: torch.Tensor, group=None) -> torch.Tensor | None:
    """Equal-shaped tensors -> [world, ...] (CPU) on the group's first rank, None elsewhere. No gradients."""
    if not _active():
        return t.detach().cpu().unsqueeze(0)
    src = t.detach().contiguous()
    src = src.to(_comm_device(src))
    if src.device.type == "cpu":
        group = _host_group(group)
    first = dist.get_global_rank(group, 0) if group is not None else 0
    parts = [torch.empty_like(src) for _ in range(dist.get_world_size(group))] if dist.get_rank() == first else None
    dist.gather(src, parts, dst=first, group=group)
    return torch.stack(parts).cpu() if parts is not None else None


def gather_objects(obj: Any, group=None) -> list | None:
    """Picklable object from every rank -> list on the group's first rank, None elsewhere. Object
    collectives travel over the group's CPU backend."""
    if not _active():
        return [obj]
    group = _host_group(group)
    first = dist.get_global_rank(group, 0) if group is not None else 0
    out = [None] * dist.get_world_size(group) if dist.get_rank() == first else None
    dist.gather_object(obj, out, dst=first, group=group)
    return out


def all_gather_objects(obj: Any, group=None) -> list:
    """Picklable object from every rank of ``group`` -> the list of all of them, on each of them."""
    if not _active():
        return [obj]
    group = _host_group(group)
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def broadcast_object(obj: Any = None, src: int = 0, group=None) -> Any:
    """``obj`` of global rank ``src`` -> every rank of ``group``."""
    if not _active():
        return obj
    group = _host_group(group)
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def scatter_objects(objs: list | None, group=None) -> Any:
    """The first rank's list -> element ``i`` on the group's i-th rank (restoring peers from rank 0)."""
    if not _active():
        return objs[0]
    group = _host_group(group)
    first = dist.get_global_rank(group, 0) if group is not None else 0
    out = [None]
    dist.scatter_object_list(out, objs if dist.get_rank() == first else None, src=first, group=group)
    return out[0]


def barrier() -> None:
    if _active():
        dist.barrier(group=_host_group())
