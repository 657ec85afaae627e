"""The rank layout: which ranks train which peer's replicas (peer- or replica-major), chosen so that the stream
path decodes each sample as few times as it can, and the peer and replica groups that follow from it."""

from __future__ import annotations

import torch.distributed as dist

from ..errors import DMLError
from .context import ranks_of
from .groups import group_timeout


def replica_layout(cfg: dict, world: int | None = None) -> tuple[int, ...] | None:
    """Replicas per peer. Without ``world``: from the config alone (``model_num`` set): the list as given,
    or the integer for every peer. With ``world``: what the config makes of that many processes
    (``replicas: auto`` = world / peers), or None when it does not fit (``finalize_config`` then refuses it
    with a message naming both)."""
    r = cfg.get("replicas", 1)
    if world is None:
        return tuple(r) if isinstance(r, list) else (r,) * cfg["model_num"]
    if r == "auto":
        peers = cfg.get("model_num") or (len(cfg["model"]) if isinstance(cfg.get("model"), list) else None)
        return (world // peers,) * peers if peers and world % peers == 0 else None
    if isinstance(r, list):
        return tuple(r) if sum(r) == world else None
    return (r,) * (world // r) if world % r == 0 else None


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
