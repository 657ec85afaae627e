"""The training loop: ``train_one_epoch`` and ``evaluate`` (torchvision references style).

Per step, every rank: fingerprint check (some steps) -> forward -> the exchange (sync point: all-gather of the logits,
or all-reduce of the softmax sums, ``exchange``) -> DML loss against the detached peers -> backward -> SGD step
(``peer_update``, shared with the single-process API). Nothing in a step reads a value back to the host: meters and the
finiteness flag accumulate on the device; a ``print_freq`` boundary's line is read from a snapshot one step later, a
checkpoint's and the epoch's end at once. Meters stay per peer; they are gathered, never summed, since each rank is a
different peer.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import distributed as D
from . import faults, stall
from .data import batch_transform
from .data.fingerprint import check_batch_consistency
from .errors import DMLError
from .exchange import EXCHANGE_WAIT, PeerSums, exchange
from .logger import NullLogger, format_eta
from .loss import compute_dml_loss, kl_ramp, loss_from_sums
from .meters import DeviceClock, Meters, gather_meters, idle_line, peak_rss_gb
from .parallel import CompiledPart


def resolve_amp(amp: str, device: torch.device) -> str:
    """Mixed precision applies on GPUs only; CPU runs stay in fp32 so their results never change."""
    if device.type != "cuda":
        return "off"
    if amp == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "off"
    return amp


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


def score_step(
    logits: torch.Tensor,
    all_logits,
    index: int,
    y: torch.Tensor,
    temperature: float,
    kl_weight: float,
    mutual: str = "dml",
    weights: list[float] | None = None,
):
    """Peer ``index``'s DML loss against the other rows of ``all_logits`` (detached peers, weighted by
    ``weights``, every peer's ``mutual_weights``, when given) or against the all-reduced ``PeerSums``, with the
    step's meter statistics. One function, so that with ``compile`` on the trainer compiles the loss and the
    meters together (``Peer.score``). Returns ``(total, stats, finite)`` on the device: stats = float64
    ``[loss * n, ce * n, kl * n, correct, n]``, finite = whether the loss was finite."""
    if isinstance(all_logits, PeerSums):
        loss = loss_from_sums(
            logits, all_logits.summed, all_logits.peers, y, temperature, kl_weight, mutual,
            own=all_logits.own, rest_weight=all_logits.rest_weight,
        )  # fmt: skip
    else:
        peers = torch.cat([all_logits[:index], all_logits[index + 1 :]])
        others = None if weights is None else weights[:index] + weights[index + 1 :]
        loss = compute_dml_loss(logits, peers, y, temperature, kl_weight, mutual=mutual, weights=others)
    n = y.shape[0]
    parts = torch.stack([loss.total.detach(), loss.ce.detach(), loss.kl.detach()]).double() * n
    correct = (logits.detach().argmax(1) == y).sum().double().view(1)
    stats = torch.cat([parts, correct, correct.new_full((1,), float(n))])
    return loss.total, stats, torch.isfinite(loss.total.detach())


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
    weights: list[float] | None = None,
    score=score_step,
):
    """The training step shared by the distributed engine and the single-process ``train_epoch_dml``: the loss
    and the meters' statistics (``score``: ``score_step`` or its compiled twin), backward, optimizer step. A
    frozen peer (``optimizer`` None) only scores its prediction. Returns ``(stats, finite)`` on the device
    without a host sync (``score_step``)."""
    total, stats, finite = score(logits, all_logits, index, y, temperature, kl_weight, mutual, weights)
    if optimizer is not None:  # a frozen peer only scores
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(total).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            total.backward()
            optimizer.step()
    return stats, finite


def compile_step_parts(mode: str | None, loader) -> tuple[Callable, tuple[CompiledPart, ...]]:
    """With the peer compiled in ``mode`` (None: eager), the step's work around the model compiles too: the
    loader's ``transform``, the augmentation with the normalisation (the batched paths; the per-sample path has
    none), and the loss with the meters' statistics. Returns the loss to call (``Peer.score``) and the compiled
    parts, in the compile report's order."""
    if mode is None:
        return score_step, ()
    parts = []
    if hasattr(loader, "transform"):
        loader.transform = CompiledPart(batch_transform, mode, "batch transform")
        parts.append(loader.transform)
    score = CompiledPart(score_step, mode, "loss and meters")
    return score, (*parts, score)


class Peer(NamedTuple):
    """What a training step updates: the model it calls (DDP over the peer's replicas and/or compiled), its
    optimizer (None: a frozen peer, which predicts in eval mode under ``inference_mode`` and never steps) and,
    with fp16, the GradScaler; how its forward runs, and its loss (``score_step``, or its compiled twin)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer | None
    scaler: torch.amp.GradScaler | None = None
    amp: str = "off"  # as resolved (``Resolved.amp``)
    channels_last: bool = False  # this peer's memory format, as resolved
    cudagraphs: bool = False  # compiled in a CUDA-graph mode: each step begins a new CUDA-graph iteration
    score: Callable = score_step  # the loss with the meters' statistics: compiled when the peer compiles


def train_one_epoch(
    peer: Peer,
    loader,
    ctx: D.DistContext,
    cfg: dict,
    exchange_mode: str,
    epoch: int,
    *,
    start_step: int = 0,
    meters: Meters | None = None,
    logger: NullLogger | None = None,
    checkpointer=None,
    watch: stall.StepWatch | None = None,
) -> Meters:
    """One epoch for this rank's peer. ``epoch`` counts from 1; ``start_step`` skips already-done batches
    (the loader must have been positioned with ``set_epoch(epoch - 1, start_step)``). After each step the
    ``checkpointer`` is told the position (it decides whether to write); ``watch`` is rank 0's stall watch.

    No host sync inside a step: the meters live on the device. At a ``print_freq`` boundary they are copied off
    it behind the step's work and logged once the next step is queued (the host waits for that step alone, not for
    the work queued after it); before a checkpoint and at the epoch's end they are read at once.
    """
    frozen = peer.optimizer is None
    peer.model.train(not frozen)
    weights = cfg.get("mutual_weights")
    logger = logger or NullLogger()
    meters = meters or Meters(ctx.device)
    meters.unchecked_from = start_step
    steps = len(loader)
    check_every = cfg["consistency_check_every"]
    bar = logger.progress(loader, total=steps - start_step, desc=f"epoch {epoch}")
    t_epoch = t_last = time.time()
    clock, spans = DeviceClock(ctx.device), []  # the exchange's wait, read at the print boundaries
    pending = None  # a print boundary's (snapshot, step, time, spans), reported after the next step is queued
    sync_check, checked = os.environ.get("DML_SYNC_CHECK") == "1" and ctx.device.type == "cuda", 0

    def steady(s: int) -> bool:
        """Step ``s`` has no planned host sync: not the first two, no batch check, no save or end of epoch after
        it (a ``print_freq`` boundary is not one: its meters are read from a snapshot, one step later)."""
        return s > start_step + 1 and not (check_every and s % check_every == 0) and not holds_up(s)

    def holds_up(s: int) -> bool:
        """After step ``s`` the meters are read at once (a sync point): the epoch's end or a checkpoint."""
        return s + 1 == steps or (checkpointer is not None and checkpointer.due(epoch, s + 1))

    def report(snap: Meters, step: int, t_at: float, step_spans: list) -> None:
        """The log line of the ``print_freq`` boundary after ``step``, from ``snap``: the meters as they stood then.
        Collective on every rank (all peers shown, not just rank 0's); it waits only for that step's work."""
        snap.ready()
        secs = sum(clock.seconds(a, b) for a, b in step_spans)  # events of steps up to ``step``: done by now
        meters.exchange_time += secs
        snap.exchange_time += secs
        rows = gather_meters(snap, ctx, epoch, step)
        meters.unchecked_from = max(meters.unchecked_from, snap.unchecked_from)
        done = step + 1 - start_step
        eta = (t_at - t_epoch) / done * (steps - step - 1)
        peers_txt = " ".join(f"p{k + 1} {a[0]:.3f}/{a[3]:.3f}" for k, a in enumerate(rows))
        bar.set_postfix_str(peers_txt)
        step_s = snap.step_time / max(done, 1)
        logger.info(
            f"epoch {epoch} [{step + 1}/{steps}] eta {format_eta(eta)} loss/acc {peers_txt} "
            f"data {snap.data_time / max(done, 1):.3f}s step {step_s:.3f}s "
            f"({cfg['batch_size'] / step_s:.0f} img/s per peer, peak RSS {peak_rss_gb():.2f} GB) | "
            f"compute/exchange ms " + " ".join(idle_line(k, a[5] / done, a[6] / done) for k, a in enumerate(rows))
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
            if peer.cudagraphs:  # a new CUDA-graph iteration: nothing reads the last step's logits any more
                torch.compiler.cudagraph_mark_step_begin()
            with torch.inference_mode() if frozen else nullcontext():
                logits = forward(peer.model, x, peer.amp, peer.channels_last)
                stall.report_progress(epoch, step, EXCHANGE_WAIT[exchange_mode])  # heartbeat (host, no device sync)
                c0 = clock.mark()
                all_logits = exchange(
                    logits, ctx, exchange_mode, cfg["temperature"], weights
                )  # sync point: the step's one collective
                spans.append((c0, clock.mark()))
                w = kl_ramp(cfg["kl_weight"], cfg["kl_warmup_epochs"], steps, epoch, step)  # the warm-up, per step
                stats, finite = peer_update(
                    logits, all_logits, ctx.peer, y, peer.optimizer, cfg["temperature"], w, cfg["mutual"],
                    peer.scaler, weights, peer.score,
                )  # fmt: skip
            meters.add(stats, finite)
            meters.data_error = meters.data_error or getattr(loader, "error", None)
            meters.data_time += data_time
            t_now = time.time()
            meters.step_time += t_now - t_last
            t_last = t_now
            if pending is not None:  # the last boundary's line, now that this step's work is queued behind it
                report(*pending)
                pending = None
            if (step + 1) % cfg["print_freq"] == 0 or step + 1 == steps:
                boundary = (meters.snapshot(), step, t_now, spans[:])
                spans.clear()
                if holds_up(step):  # the meters are read now anyway (the epoch's end, a checkpoint)
                    report(*boundary)
                else:
                    pending = boundary
            if checkpointer is not None:
                checkpointer.save(epoch, step + 1, meters=meters)
            if watch is not None and step + 1 < steps:
                watch.start(epoch, step + 1)
            if sync_check:  # DML_SYNC_CHECK=1 (gpu_check): any host sync in a steady-state step raises
                torch.cuda.set_sync_debug_mode("error" if steady(step + 1) else "default")
        if pending is not None:  # a loader that gave fewer batches than its length: the line is still due
            report(*pending)
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


def agreement(all_logits: torch.Tensor) -> dict:
    """What the cohort agrees on, from [N, n, C] peer logits: ``agreement``, the share of samples on which every
    peer predicts the same class, and ``pairwise_kl``, the mean of KL(p_j || p_i) over ordered peer pairs
    (softmax at T = 1, nats per sample); 1 and 0 for one peer."""
    preds = all_logits.argmax(-1)  # [N, n]
    agree = (preds == preds[:1]).all(0).double().mean().item()
    n = all_logits.shape[0]
    if n < 2:
        return {"agreement": agree, "pairwise_kl": 0.0}
    # per sample, sum_{i,j} KL(p_j || p_i) = N sum_j sum_c p_j log p_j - sum_c (sum_j p_j)(sum_i log p_i);
    # the pairs i == j add zero, so the mean over ordered pairs divides by N (N - 1). In float64, by chunks
    # of samples (an ImageNet validation set of N peers would otherwise take N x 50,000 x 1,000 x 8 bytes).
    total = 0.0
    for chunk in all_logits.split(4096, dim=1):
        log_p = chunk.double().log_softmax(-1)
        p = log_p.exp()
        total += float((n * (p * log_p).sum((0, 2)) - (p.sum(0) * log_p.sum(0)).sum(-1)).sum())
    return {"agreement": agree, "pairwise_kl": total / all_logits.shape[1] / (n * (n - 1))}


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
        **agreement(all_logits),
        "ensemble_gain": ens_correct / n - max(peer_correct) / n,
        "predictions": torch.cat([all_logits.argmax(-1), probs.argmax(1)[None]]).int(),  # [N + 1, n]: the classes
        "peer_loss": peer_loss,
        "peer_acc": [c / n for c in peer_correct],
        "peer_correct": peer_correct,
        "ensemble_acc": ens_correct / n,
        "ensemble_loss": ens_loss,
        "ensemble_correct": ens_correct,
        "total": n,
    }


def evaluate(
    model, loader, ctx: D.DistContext, amp: str = "off", channels_last: bool = False, memo: dict | None = None
) -> dict:
    """Collective: each rank scores its loader (replica r of a peer: its part r of the set, the indices
    ``loader.positions``); rank 0 gathers every rank's logits, labels and positions, puts each peer's logits
    back in dataset order, scores every peer and the ensemble, and broadcasts the metrics to every rank.
    ``memo``: where a frozen peer keeps its first prediction (it cannot change)."""
    if memo is not None and "predicted" in memo:
        logits, labels = memo["predicted"]
    else:
        logits, labels = predict(model, loader, ctx.device, amp, channels_last)
        if memo is not None:
            memo["predicted"] = logits, labels
    positions = torch.as_tensor(loader.positions, device=labels.device)[: len(labels)]
    sizes = [int(v) for v in D.all_gather(torch.tensor([len(labels)])).flatten()]
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
