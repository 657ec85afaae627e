"""Each peer's running sums over an epoch, kept on the device, and the collective that reads them.

A step never reads a meter back to the host: ``Meters`` accumulates on the device and ``meter_table`` (a collective)
gathers them before a mid-epoch checkpoint and at the end of an epoch (sync points), and at ``print_freq`` boundaries
from a ``snapshot`` copied off the device behind the step's work and read after the next step is queued. Meters stay
per peer: they are gathered and summed over a peer's replicas, never across peers.
"""

from __future__ import annotations

import resource
import time

import torch

from . import distributed as D
from .errors import DMLError


class Meters:
    """One peer's running sums over one epoch, kept on the device so a step never waits for the host:
    ``[loss * n, ce * n, kl * n, correct, n]`` in float64, plus a flag set by any non-finite loss since the
    last check. Read before a checkpoint and at the end of the epoch (a host sync); at a ``print_freq``
    boundary a ``snapshot`` is read one step later, without draining the device's queue."""

    def __init__(self, device="cpu", sums: dict | None = None):
        self.sums = torch.zeros(5, dtype=torch.float64, device=device)
        if sums:
            self.sums.copy_(torch.tensor([sums[k] for k in ("loss", "ce", "kl", "correct", "n")], dtype=torch.float64))
        self.bad = torch.zeros((), dtype=torch.bool, device=device)
        self.unchecked_from: int | None = None  # first step not yet checked for a finite loss
        self.data_time = self.step_time = self.exchange_time = 0.0  # this rank's seconds (host, not saved)
        self.data_error: str | None = None  # the loader's first unreadable file (stream path), checked here
        self._landing = self._copied = None  # a snapshot's host buffer and its copy's event, until ready()

    def add(self, stats: torch.Tensor, finite: torch.Tensor) -> None:
        self.sums += stats
        self.bad |= ~finite

    def snapshot(self) -> Meters:
        """These meters as they stand, copied off the device without waiting: the sums and the flag go to pinned host
        memory behind the work queued so far (``non_blocking``, marked by an event), the host's seconds are copied
        now. Read it only after ``ready()``, which waits for that event alone: the steps queued after it keep the
        device busy. On the CPU the copy is done at once."""
        snap = Meters("cpu")
        cuda = self.sums.device.type == "cuda"
        snap._landing = torch.empty(6, dtype=torch.float64, pin_memory=cuda)  # [the 5 sums, the non-finite flag]
        snap._landing.copy_(torch.cat([self.sums, self.bad.double().view(1)]), non_blocking=cuda)
        snap.unchecked_from, snap.data_error = self.unchecked_from, self.data_error
        snap.data_time, snap.step_time, snap.exchange_time = self.data_time, self.step_time, self.exchange_time
        if cuda:
            snap._copied = torch.cuda.Event(blocking=True)  # its wait sleeps: the host's cores go on decoding
            snap._copied.record()
        else:
            snap.ready()
        return snap

    def ready(self) -> Meters:
        """A ``snapshot`` once its copy has landed (an event's wait; at once on the CPU)."""
        if self._copied is not None:
            self._copied.synchronize()
        if self._landing is not None:
            self.sums, self.bad = self._landing[:5], self._landing[5] != 0
        self._landing = self._copied = None
        return self

    def state_dict(self) -> dict:
        return dict(zip(("loss", "ce", "kl", "correct", "n"), self.sums.cpu().tolist()))


def peak_rss_gb() -> float:
    """This process's peak resident memory (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def idle_line(k: int, step_s: float, wait_s: float) -> str:
    """Peer k's time per step outside and inside the exchange, and the share spent waiting there."""
    return f"p{k + 1} {1000 * (step_s - wait_s):.1f}/{1000 * wait_s:.1f} ({wait_s / max(step_s, 1e-9):.0%})"


def sum_by_peer(per_rank: torch.Tensor, ctx: D.DistContext) -> torch.Tensor:
    """[world, ...] rows of every rank -> [peers, ...]: each peer's rows summed over its replicas."""
    peer = torch.tensor([ctx.peer_of(r) for r in range(per_rank.shape[0])])
    return per_rank.new_zeros(ctx.peers, *per_rank.shape[1:]).index_add_(0, peer, per_rank)


def meter_table(meters: Meters, ctx: D.DistContext, epoch: int, step: int) -> torch.Tensor:
    """Collective over the world (sync point): [peers, 9] float64, each peer's sums over its replicas
    (``[loss * n, ce * n, kl * n, correct, n, non-finite, step s, exchange s, data error]``; never mixed across
    peers). Raises on every rank, naming the peer(s) and the steps, when any loss went non-finite since the
    last check, or with the loader's line when a rank's loader met an unreadable file (``Meters.data_error``)."""
    mine = torch.cat(
        [
            meters.sums.cpu(),
            meters.bad.cpu().double().view(1),
            torch.tensor([meters.step_time, meters.exchange_time, meters.data_error is not None], dtype=torch.float64),
        ]
    )
    table = sum_by_peer(D.all_gather(mine), ctx)
    if bool(table[:, 8].any()):  # a rank's loader met an unreadable file since the last check
        raise DMLError(next(e for e in D.all_gather_objects(meters.data_error) if e))
    first = meters.unchecked_from if meters.unchecked_from is not None else step
    meters.unchecked_from = step + 1
    bad = [k + 1 for k, r in enumerate(table.tolist()) if r[5]]
    if bad:
        where = f"step {step}" if first == step else f"steps {first}-{step}"
        raise DMLError(
            f"peer(s) {bad}: loss is not finite (nan/inf) at epoch {epoch}, {where}; "
            f"lower lr (or use amp=off) and check the data"
        )
    return table


def gather_meters(meters: Meters, ctx: D.DistContext, epoch: int, step: int) -> list[list[float]]:
    """``meter_table`` as one row per peer, on every rank: ``[loss, ce, kl, acc, n]`` averaged over the
    peer's replicas, weighted by samples, then the seconds this epoch in steps and in the exchange, averaged
    over the peer's replicas."""
    table = meter_table(meters, ctx, epoch, step)
    n = table[:, 4:5].clamp_min(1)
    replicas = torch.tensor(ctx.layout, dtype=torch.float64).view(-1, 1)
    return torch.cat([table[:, :4] / n, table[:, 4:5], table[:, 6:8] / replicas], 1).tolist()


class DeviceClock:
    """Time as the device sees it: CUDA events on a GPU (recorded on the compute stream, which waits for
    the collectives; nothing synchronises when marking, ``seconds`` does, so read at sync points only),
    ``perf_counter`` on the CPU (where every collective is synchronous anyway)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, a, b) -> float:
        if not self.cuda:
            return b - a
        b.synchronize()
        return a.elapsed_time(b) / 1000
