"""The training loop: ``train_one_epoch`` and ``evaluate`` (torchvision references style).

Per step, every rank: fingerprint check (some steps) -> forward -> the exchange (sync point: all-gather of the logits,
or all-reduce of the softmax sums, ``exchange``) -> DML loss against the detached peers -> backward -> SGD step
(``peer_update``, shared with the single-process API). Nothing in a step reads a value back to the host: meters and the
finiteness flag accumulate on the device and are read at ``print_freq`` boundaries. Meters stay per peer; they are
gathered, never summed, since each rank is a different peer.
"""

from __future__ import annotations

import hashlib
import math
import os
import resource
import time
from collections import Counter
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import fields

import torch
import torch.nn.functional as F

from . import distributed as D
from . import faults, stall
from .data.memory import shard_rows
from .errors import DMLError
from .exchange import EXCHANGE_WAIT, PeerSums, exchange
from .logger import NullLogger, format_eta
from .loss import compute_dml_loss, loss_from_sums


class Meters:
    """One peer's running sums over one epoch, kept on the device so a step never waits for the host:
    ``[loss * n, ce * n, kl * n, correct, n]`` in float64, plus a flag set by any non-finite loss since the
    last check. Read (a host sync) only at ``print_freq`` boundaries, before a checkpoint and at the end
    of the epoch."""

    def __init__(self, device="cpu", sums: dict | None = None):
        self.sums = torch.zeros(5, dtype=torch.float64, device=device)
        if sums:
            self.sums.copy_(torch.tensor([sums[k] for k in ("loss", "ce", "kl", "correct", "n")], dtype=torch.float64))
        self.bad = torch.zeros((), dtype=torch.bool, device=device)
        self.unchecked_from: int | None = None  # first step not yet checked for a finite loss
        self.data_time = self.step_time = self.exchange_time = 0.0  # this rank's seconds (host, not saved)
        self.data_error: str | None = None  # the loader's first unreadable file (stream path), checked here

    def add(self, stats: torch.Tensor, finite: torch.Tensor) -> None:
        self.sums += stats
        self.bad |= ~finite

    def state_dict(self) -> dict:
        return dict(zip(("loss", "ce", "kl", "correct", "n"), self.sums.cpu().tolist()))


def peak_rss_gb() -> float:
    """This process's peak resident memory (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def batch_fingerprint(x: torch.Tensor, y: torch.Tensor, source: tuple | None = None) -> torch.Tensor:
    """[2] int64: hashes of the labels and of what defines the inputs. ``source``: the loader's
    ``(uint8 batch before augmentation, AugParams)`` (memory and stream paths): a quarter of the float
    batch's bytes cross to the host, plus the parameters; without it, the float inputs themselves."""

    def h(*ts: torch.Tensor) -> int:
        digest = hashlib.blake2b(digest_size=8)
        for t in ts:
            digest.update(t.detach().cpu().contiguous().numpy().tobytes())
        return int.from_bytes(digest.digest(), "little", signed=True)

    if source is not None:
        u8, params = source
        return torch.tensor([h(y), h(u8, *(getattr(params, f.name) for f in fields(params)))], dtype=torch.int64)
    return torch.tensor([h(y), h(x)], dtype=torch.int64)


def check_batch_consistency(
    x: torch.Tensor,
    y: torch.Tensor,
    epoch: int,
    step: int,
    ctx: D.DistContext | None = None,
    source: tuple | None = None,
    data_error: str | None = None,
) -> None:
    """Collective: the ranks compare batch fingerprints; every rank raises on a mismatch. A rank whose
    loader met an unreadable file (``data_error``: its rows are zeros) makes every rank raise that line
    first, not a mismatch.

    The batch is cut into L equal chunks of rows, L the least common multiple of the peers' replica
    counts, so every rank's share is whole chunks whatever its peer's number of replicas: every rank
    fingerprints its chunks, and every chunk must look the same on every rank that holds it (the
    fingerprint most of its holders share is taken as right)."""
    rank = ctx.rank if ctx is not None else 0
    stall.report_progress(epoch, step, "the batch fingerprint check")
    # one copy to the host (sync point); the chunks are views of it
    y = y.cpu()
    if source is not None:
        source = (source[0].cpu(), source[1].to(torch.device("cpu")))
    else:
        x = x.cpu()
    faults.record_fingerprint(rank, epoch, step, lambda: batch_fingerprint(x, y, source))
    if ctx is None:
        return
    chunks = math.lcm(*ctx.layout)
    mine = chunks // ctx.replicas
    table = torch.zeros(chunks, 4, dtype=torch.int64)  # per chunk: [held, labels hash, inputs hash, data error]
    table[:, 3] = int(data_error is not None)
    for c in range(mine):
        part = (c, mine)
        src = tuple(shard_rows(t, part) for t in source) if source is not None else None
        table[ctx.replica * mine + c, :3] = torch.cat(
            [torch.ones(1, dtype=torch.int64), batch_fingerprint(shard_rows(x, part), shard_rows(y, part), src)]
        )
    fps = D.all_gather_tensor(table)  # [world, chunks, 4]
    if bool(fps[:, :, 3].any()):
        raise DMLError(next(e for e in D.all_gather_objects(data_error) if e))
    fps = fps[:, :, :3]
    bad, right, tied, what = set(), set(), set(), set()
    for c in range(chunks):
        holders = [k for k in range(fps.shape[0]) if fps[k, c, 0]]
        votes = Counter(tuple(fps[k, c].tolist()) for k in holders)
        if len(votes) == 1:
            continue
        ((majority, count),) = votes.most_common(1)
        what.add("labels" if len({v[1] for v in votes}) > 1 else "augmented inputs")
        if 2 * count <= len(holders):  # no majority (e.g. two peers): name both sides, blame neither
            tied.update(holders)
            continue
        for k in holders:
            (right if tuple(fps[k, c].tolist()) == majority else bad).add(k)
    if bad or tied:
        who = (
            f"rank(s) {sorted(bad)} drew different {' and '.join(sorted(what))} than rank(s) {sorted(right - bad)}"
            if bad
            else f"rank(s) {sorted(tied)} drew different {' and '.join(sorted(what))} (no majority "
            f"tells which is right)"
        )
        raise DMLError(
            f"batch mismatch at epoch {epoch} step {step}: {who}; every rank must use the same seed, "
            f"data and augmentation settings"
        )


def autocast_context(device: torch.device, amp: str):
    if device.type != "cuda" or amp == "off":
        return nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def forward(model, x: torch.Tensor, amp: str = "off", channels_last: bool = False) -> torch.Tensor:
    """Logits in float32 (autocast on CUDA when ``amp`` is on)."""
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast_context(x.device, amp):
        return model(x).float()


def peer_update(
    logits: torch.Tensor,
    all_logits,
    index: int,
    y: torch.Tensor,
    optimizer,
    temperature: float,
    kl_weight: float,
    mutual: str = "dml",
    scaler=None,
):
    """The training step shared by the distributed engine and the single-process ``train_epoch_dml``:
    peer ``index``'s loss against the other rows of ``all_logits`` (detached peers), or against the
    all-reduced ``PeerSums``, backward, optimizer step. Returns ``(stats, finite)`` on the device without a
    host sync: stats = float64 ``[loss * n, ce * n, kl * n, correct, n]``, finite = whether the loss was
    finite."""
    if isinstance(all_logits, PeerSums):
        loss = loss_from_sums(
            logits, all_logits.summed, all_logits.peers, y, temperature, kl_weight, mutual, own=all_logits.own
        )
    else:
        peers = torch.cat([all_logits[:index], all_logits[index + 1 :]])
        loss = compute_dml_loss(logits, peers, y, temperature, kl_weight, mutual=mutual)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss.total).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.total.backward()
        optimizer.step()
    n = y.shape[0]
    parts = torch.stack([loss.total.detach(), loss.ce.detach(), loss.kl.detach()]).double() * n
    correct = (logits.detach().argmax(1) == y).sum().double().view(1)
    stats = torch.cat([parts, correct, correct.new_full((1,), float(n))])
    return stats, torch.isfinite(loss.total.detach())


def _idle(k: int, step_s: float, wait_s: float) -> str:
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
    table = sum_by_peer(D.all_gather_tensor(mine), ctx)
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


def train_one_epoch(
    model,
    optimizer,
    loader,
    ctx: D.DistContext,
    cfg: dict,
    epoch: int,
    logger: NullLogger | None = None,
    start_step: int = 0,
    meters: Meters | None = None,
    scaler=None,
    on_step: Callable[[int, Meters], None] | None = None,
    kl_weight: Callable[[int], float] | None = None,
    watch: stall.StepWatch | None = None,
) -> Meters:
    """One epoch for this rank's peer. ``epoch`` counts from 1; ``start_step`` skips already-done batches
    (the loader must have been positioned with ``set_epoch(epoch - 1, start_step)``). ``kl_weight(step)``
    gives the mutual term's weight per step (warm-up); default: ``cfg['kl_weight']``.

    No host sync inside a step: the meters live on the device and are read at ``print_freq`` boundaries.
    """
    model.train()
    logger = logger or NullLogger()
    meters = meters or Meters(ctx.device)
    meters.unchecked_from = start_step
    steps = len(loader)
    check_every = cfg["consistency_check_every"]
    bar = logger.progress(loader, total=steps - start_step, desc=f"epoch {epoch}")
    t_epoch = t_last = time.time()
    clock, spans = DeviceClock(ctx.device), []  # the exchange's wait, read at the print boundaries
    sync_check, checked = os.environ.get("DML_SYNC_CHECK") == "1" and ctx.device.type == "cuda", 0
    every_save = cfg["save_every_steps"]

    def steady(s: int) -> bool:
        """Step ``s`` has no planned host sync: not the first two, no meter read, check or save after it."""
        return (
            s > start_step + 1
            and (s + 1) % cfg["print_freq"] != 0
            and s + 1 < steps
            and not (check_every and s % check_every == 0)
            and not (every_save and ((epoch - 1) * steps + s + 1) % every_save == 0)
        )

    if watch is not None:
        watch.start(epoch, start_step)
    try:
        for step, (x, y) in enumerate(bar, start=start_step):
            checked += int(sync_check and steady(step))
            data_time = time.time() - t_last
            faults.at_step(ctx.rank, epoch, step)
            if check_every and (step == start_step or step % check_every == 0):
                # sync point: the uint8 batch (or, on the per-sample path, the inputs) crosses to the host
                check_batch_consistency(
                    x,
                    y,
                    epoch,
                    step,
                    ctx,
                    getattr(loader, "last_source", None),
                    meters.data_error or getattr(loader, "error", None),
                )
            logits = forward(model, x, cfg["amp"], cfg["channels_last"])
            stall.report_progress(epoch, step, EXCHANGE_WAIT[cfg["exchange"]])  # heartbeat (host, no device sync)
            c0 = clock.mark()
            all_logits = exchange(logits, ctx, cfg)  # sync point: the step's one collective
            spans.append((c0, clock.mark()))
            w = kl_weight(step) if kl_weight is not None else cfg["kl_weight"]
            stats, finite = peer_update(
                logits, all_logits, ctx.peer, y, optimizer, cfg["temperature"], w, cfg["mutual"], scaler
            )
            meters.add(stats, finite)
            meters.data_error = meters.data_error or getattr(loader, "error", None)
            meters.data_time += data_time
            t_now = time.time()
            meters.step_time += t_now - t_last
            t_last = t_now
            if (step + 1) % cfg["print_freq"] == 0 or step + 1 == steps:
                meters.exchange_time += sum(clock.seconds(a, b) for a, b in spans)
                spans.clear()
                # Collective on every rank (sync point): show all peers, not just rank 0's.
                rows = gather_meters(meters, ctx, epoch, step)
                done = step + 1 - start_step
                eta = (t_now - t_epoch) / done * (steps - step - 1)
                peers_txt = " ".join(f"p{k + 1} {a[0]:.3f}/{a[3]:.3f}" for k, a in enumerate(rows))
                bar.set_postfix_str(peers_txt)
                step_s = meters.step_time / max(done, 1)
                logger.info(
                    f"epoch {epoch} [{step + 1}/{steps}] eta {format_eta(eta)} loss/acc {peers_txt} "
                    f"data {meters.data_time / max(done, 1):.3f}s step {step_s:.3f}s "
                    f"({cfg['batch_size'] / step_s:.0f} img/s per peer, peak RSS {peak_rss_gb():.2f} GB) | "
                    f"compute/exchange ms " + " ".join(_idle(k, a[5] / done, a[6] / done) for k, a in enumerate(rows))
                )
            if on_step is not None:
                on_step(step, meters)
            if watch is not None and step + 1 < steps:
                watch.start(epoch, step + 1)
            if sync_check:  # DML_SYNC_CHECK=1 (gpu_check): any host sync in a steady-state step raises
                torch.cuda.set_sync_debug_mode("error" if steady(step + 1) else "default")
    finally:
        if sync_check:  # an exception must not leave the mode on for what runs after it
            torch.cuda.set_sync_debug_mode("default")
    if sync_check:
        logger.info(
            f"sync check: {checked} steady-state steps of epoch {epoch} ran under "
            f"torch.cuda.set_sync_debug_mode('error')"
        )
    if watch is not None:
        watch.pause()
    bar.close()
    return meters


@torch.no_grad()
def predict_many(models, loader, device: torch.device, amp: str = "off", channels_last: bool = False):
    """One pass over ``loader``, every batch through every model: logits [N, n, C] (float32, on
    ``device``) and labels [n] (on ``device``), in loader order."""
    for m in models:
        m.eval()
    outs, labels = [[] for _ in models], []
    for x, y in loader:
        x = x.to(device, non_blocking=True)
        for k, m in enumerate(models):
            outs[k].append(forward(m, x, amp, channels_last))
        labels.append(torch.as_tensor(y).to(device, non_blocking=True))
    return torch.stack([torch.cat(o) for o in outs]), torch.cat(labels)


def predict(model, loader, device: torch.device, amp: str = "off", channels_last: bool = False):
    """Logits [n, C] and labels [n] of one model, on ``device``."""
    logits, labels = predict_many([model], loader, device, amp, channels_last)
    return logits[0], labels


def score_logits(all_logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """[N, n, C] peer logits -> per-peer loss/accuracy and the ensemble (mean of peer softmaxes)."""
    all_logits, labels = all_logits.float().cpu(), labels.cpu()
    peer_loss = [F.cross_entropy(logits, labels).item() for logits in all_logits]
    peer_correct = [int((logits.argmax(1) == labels).sum()) for logits in all_logits]
    probs = all_logits.softmax(-1).mean(0)
    ens_correct = int((probs.argmax(1) == labels).sum())
    ens_loss = F.nll_loss(probs.clamp_min(1e-12).log(), labels).item()
    n = len(labels)
    return {
        "peer_loss": peer_loss,
        "peer_acc": [c / n for c in peer_correct],
        "peer_correct": peer_correct,
        "ensemble_acc": ens_correct / n,
        "ensemble_loss": ens_loss,
        "ensemble_correct": ens_correct,
        "total": n,
    }


def evaluate(model, loader, ctx: D.DistContext, cfg: dict) -> dict:
    """Collective: each rank scores its loader (replica r of a peer: its part r of the set, the indices
    ``loader.positions``); rank 0 gathers every rank's logits, labels and positions, puts each peer's logits
    back in dataset order, scores every peer and the ensemble, and broadcasts the metrics to every rank."""
    logits, labels = predict(model, loader, ctx.device, cfg["amp"], cfg["channels_last"])
    positions = torch.as_tensor(loader.positions, device=labels.device)[: len(labels)]
    sizes = [int(v) for v in D.all_gather_tensor(torch.tensor([len(labels)])).flatten()]
    pad = max(sizes) - len(labels)  # gather needs equal shapes: pad every share to the largest
    all_logits = D.gather_to_main(F.pad(logits, (0, 0, 0, pad)))  # sync point
    all_labels = D.gather_to_main(F.pad(labels, (0, pad)))
    all_positions = D.gather_to_main(F.pad(positions, (0, pad)))
    metrics, error = None, None
    if all_logits is not None:
        n = sum(sizes[q] for q in ctx.ranks_of(0))
        for k in range(ctx.peers):  # each peer's ranks scored every sample once
            seen = torch.cat([all_positions[q, : sizes[q]] for q in ctx.ranks_of(k)]).sort().values
            if not torch.equal(seen.cpu(), torch.arange(n)):
                error = f"evaluation: peer {k + 1}'s ranks scored {len(seen)} samples, not each of {n} once"

        def in_order(rows: torch.Tensor, ranks: list[int]) -> torch.Tensor:
            out = rows.new_zeros(n, *rows.shape[2:])
            for q in ranks:
                out[all_positions[q, : sizes[q]]] = rows[q, : sizes[q]]
            return out

        if error is None:
            peers = torch.stack([in_order(all_logits, ctx.ranks_of(k)) for k in range(ctx.peers)])
            metrics = score_logits(peers, in_order(all_labels, ctx.ranks_of(0)))
    metrics, error = D.broadcast_object((metrics, error))
    if error is not None:
        raise DMLError(error)
    return metrics
