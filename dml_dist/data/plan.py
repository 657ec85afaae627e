"""The batch plan: what every step holds, a function of ``(seed, epoch, step)`` alone, and the row shards of a batch.

One definition for every data path (memory, stream, per-sample): the epoch's order, each step's indices and
augmentation parameters, and which rows of a batch a data-parallel replica trains on.
"""

from __future__ import annotations

import torch

from ..errors import DMLError
from .augment import AugParams, step_generator


class BatchPlan:
    """What step ``step`` of epoch ``epoch`` holds, a function of (seed, epoch, step) alone: slice ``step``
    of the epoch's permutation (a generator seeded with ``(seed, epoch)``) and per-sample parameters from
    ``step_generator(seed, epoch, step)``: ``AugParams``, then (``rrc``) RandomResizedCrop uniforms."""

    def __init__(self, n: int, batch_size: int, seed: int):
        if n < batch_size:
            raise DMLError(f"batch_size={batch_size} is larger than the training set ({n} images); lower batch_size")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self._perm: tuple[int, torch.Tensor] | None = None

    def __len__(self) -> int:
        return self.n // self.batch_size

    def indices(self, epoch: int, step: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, epoch_permutation(self.n, self.seed, epoch))
        return self._perm[1][step * self.batch_size : (step + 1) * self.batch_size]

    def params(self, epoch: int, step: int, rrc_tries: int = 0):
        """``AugParams`` of the whole batch; with ``rrc_tries``, also uniforms [B, rrc_tries, 4]."""
        g = step_generator(self.seed, epoch, step)
        params = AugParams.draw(self.batch_size, g)
        return (params, torch.rand(self.batch_size, rrc_tries, 4, generator=g)) if rrc_tries else params


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The CPU generator of epoch ``epoch``, the same on every rank: its first draw is the epoch's order."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of epoch ``epoch``: the same on every rank (every shared-seed sampler draws it first)."""
    return torch.randperm(n, generator=epoch_generator(seed, epoch))


def shard_range(n: int, shard: tuple[int, int]) -> tuple[int, int]:
    """``[lo, hi)`` of contiguous part r of R of ``n`` samples (a replica's share of an evaluation set)."""
    r, parts = shard
    return n * r // parts, n * (r + 1) // parts


def shard_rows(t, shard: tuple[int, int]):
    """Part r of R of a batch's rows (a tensor or ``AugParams``): a data-parallel replica's share."""
    r, replicas = shard
    if replicas == 1:
        return t
    part = len(t) // replicas
    return t[r * part : (r + 1) * part]
