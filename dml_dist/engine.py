"""The training loop: ``train_one_epoch`` and ``evaluate`` (torchvision references style).

Per step, every rank: fingerprint check (some steps) -> forward -> all-gather logits (sync point) ->
DML loss against the detached peers -> backward -> SGD step. Meters stay per rank; they are gathered,
never summed, since each rank is a different peer.
"""
from __future__ import annotations

import hashlib
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from . import distributed as D
from . import faults
from .errors import DMLError
from .logger import NullLogger, format_eta
from .loss import compute_dml_loss


@dataclass
class Meters:
    """Running sums for one peer over one epoch (float64 Python numbers, exact on resume)."""
    loss: float = 0.0
    ce: float = 0.0
    kl: float = 0.0
    correct: float = 0.0
    n: int = 0
    data_time: float = field(default=0.0, compare=False)
    step_time: float = field(default=0.0, compare=False)

    def update(self, loss: float, ce: float, kl: float, correct: float, n: int) -> None:
        self.loss += loss * n
        self.ce += ce * n
        self.kl += kl * n
        self.correct += correct
        self.n += n

    def averages(self) -> list[float]:
        """[loss, ce, kl, acc] averaged over the samples seen."""
        n = max(self.n, 1)
        return [self.loss / n, self.ce / n, self.kl / n, self.correct / n]

    def state_dict(self) -> dict:
        return {"loss": self.loss, "ce": self.ce, "kl": self.kl, "correct": self.correct, "n": self.n}


def batch_fingerprint(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[2] int64: hashes of the labels and of the input bytes (equal only for byte-identical batches)."""
    def h(t: torch.Tensor) -> int:
        digest = hashlib.blake2b(t.detach().cpu().contiguous().numpy().tobytes(), digest_size=8).digest()
        return int.from_bytes(digest, "little", signed=True)
    return torch.tensor([h(y), h(x)], dtype=torch.int64)


def check_batch_consistency(x: torch.Tensor, y: torch.Tensor, epoch: int, step: int, rank: int = 0) -> None:
    """Collective: all ranks compare batch fingerprints; every rank raises on a mismatch."""
    fp = batch_fingerprint(x, y)
    faults.record_fingerprint(rank, epoch, step, fp)
    fps = D.all_gather_tensor(fp)
    bad = [r for r in range(fps.shape[0]) if not torch.equal(fps[r], fps[0])]
    if bad:
        what = "labels" if any(fps[r, 0] != fps[0, 0] for r in bad) else "augmented inputs"
        raise DMLError(f"batch mismatch at epoch {epoch} step {step}: rank(s) {bad} drew different {what} than "
                       f"rank 0; every rank must use the same seed, data and augmentation settings")


def autocast_context(device: torch.device, amp: str):
    if device.type != "cuda" or amp == "off":
        return nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def train_one_epoch(model, optimizer, loader, ctx: D.DistContext, cfg: dict, epoch: int,
                    logger: NullLogger = NullLogger(), start_step: int = 0, meters: Optional[Meters] = None,
                    scaler=None, on_step: Optional[Callable[[int, Meters], None]] = None) -> Meters:
    """One epoch for this rank's peer. ``epoch`` counts from 1; ``start_step`` skips already-done batches
    (the sampler must have been positioned with ``set_epoch(epoch - 1, start_step)``)."""
    model.train()
    meters = meters or Meters()
    device, amp = ctx.device, cfg["amp"]
    steps = len(loader.batch_sampler) if loader.batch_sampler is not None else len(loader)
    check_every = cfg["consistency_check_every"]
    bar = logger.progress(loader, total=steps - start_step, desc=f"epoch {epoch}")
    t_epoch = t_last = time.time()
    for step, (x, y) in enumerate(bar, start=start_step):
        data_time = time.time() - t_last
        faults.at_step(ctx.rank, epoch, step)
        if check_every and (step == start_step or step % check_every == 0):
            check_batch_consistency(x, y, epoch, step, ctx.rank)  # sync point
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if cfg["channels_last"]:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast_context(device, amp):
            logits = model(x)
        logits = logits.float()
        all_logits = D.all_gather_logits(logits)  # sync point: one all-gather per step
        peers = torch.cat([all_logits[:ctx.rank], all_logits[ctx.rank + 1:]])
        loss = compute_dml_loss(logits, peers, y, cfg["temperature"], cfg["kl_weight"])
        loss_value = loss.total.item()
        if not math.isfinite(loss_value):
            raise DMLError(f"peer {ctx.rank + 1}: loss is {loss_value} at epoch {epoch} step {step}; "
                           f"lower lr or check the data", all_ranks=False)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss.total).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.total.backward()
            optimizer.step()
        correct = (logits.argmax(1) == y).sum().item()
        meters.update(loss_value, loss.ce.item(), loss.kl.item(), correct, y.shape[0])
        meters.data_time += data_time
        t_now = time.time()
        meters.step_time += t_now - t_last
        t_last = t_now
        if (step + 1) % cfg["print_freq"] == 0 or step + 1 == steps:
            # Collective on every rank: show all peers, not just rank 0's.
            avgs = D.all_gather_tensor(torch.tensor(meters.averages(), dtype=torch.float64))
            done = step + 1 - start_step
            eta = (t_now - t_epoch) / done * (steps - step - 1)
            peers_txt = " ".join(f"p{k + 1} {a[0]:.3f}/{a[3]:.3f}" for k, a in enumerate(avgs.tolist()))
            bar.set_postfix_str(peers_txt)
            logger.info(f"epoch {epoch} [{step + 1}/{steps}] eta {format_eta(eta)} loss/acc {peers_txt} "
                        f"data {meters.data_time / max(done, 1):.3f}s step {meters.step_time / max(done, 1):.3f}s")
        if on_step is not None:
            on_step(step, meters)
    bar.close()
    return meters


@torch.no_grad()
def predict(model, loader, device: torch.device, amp: str = "off", channels_last: bool = False):
    """Logits [n, C] (float32, CPU) and labels [n] of ``model`` over ``loader`` in loader order."""
    model.eval()
    outs, labels = [], []
    for x, y in loader:
        x = x.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast_context(device, amp):
            outs.append(model(x).float().cpu())
        labels.append(torch.as_tensor(y))
    return torch.cat(outs), torch.cat(labels)


def score_logits(all_logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """[N, n, C] peer logits -> per-peer loss/accuracy and the ensemble (mean of peer softmaxes)."""
    peer_loss = [F.cross_entropy(l, labels).item() for l in all_logits]
    peer_correct = [int((l.argmax(1) == labels).sum()) for l in all_logits]
    probs = all_logits.softmax(-1).mean(0)
    ens_correct = int((probs.argmax(1) == labels).sum())
    ens_loss = F.nll_loss(probs.clamp_min(1e-12).log(), labels).item()
    n = len(labels)
    return {"peer_loss": peer_loss, "peer_acc": [c / n for c in peer_correct], "peer_correct": peer_correct,
            "ensemble_acc": ens_correct / n, "ensemble_loss": ens_loss, "ensemble_correct": ens_correct, "total": n}


def evaluate(model, loader, ctx: D.DistContext, cfg: dict) -> dict:
    """Collective: every rank scores the whole loader in the same order; rank 0 gathers the logits and
    scores each peer and the ensemble; the metrics are broadcast so every rank holds them."""
    logits, labels = predict(model, loader, ctx.device, cfg["amp"], cfg["channels_last"])
    gathered = D.gather_to_main(logits.to(ctx.device))  # sync point
    metrics = score_logits(gathered, labels) if gathered is not None else None
    return D.broadcast_object(metrics)
