"""The batch check: every rank fingerprints the rows it trains on, and the ranks compare them (a collective).

Every rank must draw the same batch with the same augmentation; a rank with another seed, another folder or other
augmentation settings is caught here, named, and the job stops with one line.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from dataclasses import fields

import torch

from .. import distributed as D
from .. import faults, stall
from ..errors import DMLError
from .plan import shard_rows


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
    fps = D.all_gather(table)  # [world, chunks, 4]
    if bool(fps[:, :, 3].any()):
        raise DMLError(next(e for e in D.all_gather_objects(data_error) if e))
    verdict = mismatch_verdict(fps[:, :, :3])
    if verdict:
        raise DMLError(
            f"batch mismatch at epoch {epoch} step {step}: {verdict}; every rank must use the same seed, "
            f"data and augmentation settings"
        )


def mismatch_verdict(fps: torch.Tensor) -> str | None:
    """Who drew other batches, from the gathered fingerprints ``[world, chunks, 3]`` (per chunk: held, labels
    hash, inputs hash), or None when every chunk looks the same on all its holders. The fingerprint most of a
    chunk's holders share is right; without a majority (e.g. two peers) both sides are named, neither blamed."""
    bad, right, tied, what = set(), set(), set(), set()
    for c in range(fps.shape[1]):
        holders = [k for k in range(fps.shape[0]) if fps[k, c, 0]]
        votes = Counter(tuple(fps[k, c].tolist()) for k in holders)
        if len(votes) == 1:
            continue
        ((majority, count),) = votes.most_common(1)
        what.add("labels" if len({v[1] for v in votes}) > 1 else "augmented inputs")
        if 2 * count <= len(holders):
            tied.update(holders)
            continue
        for k in holders:
            (right if tuple(fps[k, c].tolist()) == majority else bad).add(k)
    if bad:
        return f"rank(s) {sorted(bad)} drew different {' and '.join(sorted(what))} than rank(s) {sorted(right - bad)}"
    if tied:
        return f"rank(s) {sorted(tied)} drew different {' and '.join(sorted(what))} (no majority tells which is right)"
    return None
