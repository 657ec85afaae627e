"""The step's one collective: how the peers' predictions reach every rank (``exchange``).

``all_gather``: every peer's logits; ``all_reduce``: the sum of every peer's softened softmax and negative
entropy (``loss.exchange_payload``, the derivation is in loss.py), whose bytes do not grow with the number of
peers. On a uniform layout the exchange runs over this rank's peer group; on a replica list with different
counts (``replicas: [1, 3]``) over the world, by batch rows. Every function here that communicates is a
collective: call it on every rank.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import distributed as D
from .loss import exchange_payload

EXCHANGE_WAIT = {"all_gather": "the logits all-gather", "all_reduce": "the exchange all-reduce"}


class PeerSums(NamedTuple):
    """What ``exchange: all_reduce`` hands the loss: the [B, C + 1] sum of every peer's
    ``exchange_payload`` (softmax sums S and negative entropies H), the number of peers, and this rank's own
    payload (subtracted from the sum)."""

    summed: torch.Tensor
    peers: int
    own: torch.Tensor | None = None
    rest_weight: float | None = None  # the other peers' mutual_weights summed, when the payloads are weighted


# auto's crossover, measured with ``dml-bench --exchange`` (docs/benchmarks.md, "The exchange"): from 3 peers on, the
# all-reduce moves fewer bytes (2 (N-1)/N x B(C+1) against (N-1) x BC per rank) and the exchange plus its loss
# took less time; with 2 it moves the same bytes in two phases (slower), and all_gather keeps the results of
# earlier releases bit for bit.
ALL_REDUCE_FROM_PEERS = 3


def resolve_exchange(cfg: dict) -> tuple[str, str]:
    """The exchange mode for ``cfg`` (model_num set) and why."""
    if cfg["exchange"] != "auto":
        return cfg["exchange"], "set in the config"
    n, r = cfg["model_num"], cfg["replicas"]
    if isinstance(r, list) and len(set(r)) > 1:
        return "all_reduce", f"auto: replicas {r}: the all-gather by rows would pad every share to the largest"
    if n >= ALL_REDUCE_FROM_PEERS:
        return "all_reduce", f"auto: {n} peers >= {ALL_REDUCE_FROM_PEERS}, the sums' bytes do not grow with N"
    return "all_gather", f"auto: {n} peer(s) < {ALL_REDUCE_FROM_PEERS}, one all-gather of the same bytes"


def exchange(
    logits: torch.Tensor, ctx: D.DistContext, mode: str, temperature: float, weights: list[float] | None = None
):
    """The step's one collective over this rank's peer group (sync point): ``mode`` ``all_gather`` -> the peers'
    logits [N, B, C]; ``all_reduce`` -> ``PeerSums`` (B x (C + 1) numbers whatever N; see loss.py), each peer's
    payload weighted by its entry of ``weights`` (``mutual_weights``) when given."""
    w, rest = (None, None) if weights is None else (weights[ctx.peer], sum(weights) - weights[ctx.peer])
    if ctx.uniform:
        if mode == "all_reduce":
            own = exchange_payload(logits, temperature, w)
            return PeerSums(D.all_reduce_sum(own, ctx.peer_group), D.group_size(ctx.peer_group), own, rest)
        return D.all_gather(logits, ctx.peer_group)
    # A layout that is not a rectangle (replicas: [1, 3]): peers split the batch B into different shares,
    # so the exchange runs over the world by batch rows; each rank keeps exactly its own rows.
    batch = logits.shape[0] * ctx.replicas  # training batches are full (the samplers drop the last)
    lo, hi = ctx.rows(batch)
    if mode == "all_reduce":
        own = exchange_payload(logits, temperature, w)
        full = own.new_zeros(batch, own.shape[1])
        full[lo:hi] = own  # every peer's rows add up once: S and H for the whole batch
        return PeerSums(D.all_reduce_sum(full)[lo:hi], ctx.peers, own, rest)
    width = batch // min(ctx.layout)  # the largest share; gather needs equal shapes
    shares = D.all_gather(F.pad(logits.detach(), (0, 0, 0, width - logits.shape[0])))  # [world, width, C]
    return torch.stack(
        [torch.cat([shares[q, : batch // r] for q in ctx.ranks_of(k)])[lo:hi] for k, r in enumerate(ctx.layout)]
    )
