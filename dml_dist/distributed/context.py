"""``DistContext``: where this rank stands (its peer, its replica, the layout and rank order, its groups)."""

from __future__ import annotations

import bisect
import itertools
import os
import socket
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
import torch.distributed as dist

from .placement import Placement


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


def ranks_of(layout: tuple, order: str, peer: int) -> list[int]:
    """The ranks of ``peer``'s replicas under rank ``order`` (``peer``- or ``replica``-major), replica 0 first."""
    if order == "replica":
        return [i * len(layout) + peer for i in range(layout[peer])]
    first = sum(layout[:peer])
    return list(range(first, first + layout[peer]))
