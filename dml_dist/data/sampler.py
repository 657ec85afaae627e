"""The per-sample path (a notebook user's own datasets) and the shared-seed batch sampler.

A DataLoader whose batch sampler hands out ``(index, sample_seed)`` pairs drawn from ``(seed, epoch)``;
the dataset runs its own random transforms under RNGs seeded with ``sample_seed`` (``SeededDataset``), so
every rank gets the same batch whatever the number of workers, also after a restart mid-epoch.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import DMLError
from .memory import TensorImageDataset
from .plan import epoch_generator
from .shares import FileImageDataset


class SeededDataset(Dataset):
    """Wraps any map-style dataset (a notebook user's own, with its own random transforms) so that
    ``ds[(i, seed)]`` runs its transforms under torch/python RNGs seeded with ``seed``: every rank then
    gets the same augmentation for the same sample."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset
        self.classes = getattr(dataset, "classes", None)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, None)
        if seed is None:
            return self.dataset[index]
        py_state = random.getstate()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(seed))
                random.seed(int(seed))
                return self.dataset[index]
        finally:
            random.setstate(py_state)


class SharedSeedBatchSampler(Sampler):
    """Yields batches of ``(index, sample_seed)``; identical on every rank for the same (seed, epoch).

    ``set_epoch(e, start_step=s)`` positions it at batch ``s`` of epoch ``e`` (exact mid-epoch resume).
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, drop_last: bool = True):
        if num_samples < batch_size and drop_last:
            raise DMLError(
                f"batch_size={batch_size} is larger than the training set ({num_samples} images); lower batch_size"
            )
        self.n, self.batch_size, self.seed, self.drop_last = num_samples, batch_size, seed, drop_last
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def __iter__(self) -> Iterator[list]:
        g = epoch_generator(self.seed, self.epoch)
        perm = torch.randperm(self.n, generator=g).tolist()  # = epoch_permutation, then the per-sample seeds
        seeds = torch.randint(0, 2**62, (self.n,), generator=g).tolist()
        for step in range(self.start_step, len(self)):
            lo = step * self.batch_size
            yield [(perm[k], seeds[k]) for k in range(lo, min(lo + self.batch_size, self.n))]


class SampleLoader:
    """The per-sample path as a loader with the device loader's interface: a DataLoader over the
    shared-seed batch sampler whose batches are moved to ``device`` (pinned, non-blocking on CUDA)."""

    def __init__(self, loader: DataLoader, device: torch.device):
        self.loader, self.device = loader, torch.device(device)
        self.batch_sampler = loader.batch_sampler

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.batch_sampler.set_epoch(epoch, start_step)

    def __len__(self) -> int:
        return len(self.loader.batch_sampler) if self.loader.batch_sampler is not None else len(self.loader)

    def __iter__(self):
        for x, y in self.loader:
            yield x.to(self.device, non_blocking=True), torch.as_tensor(y).to(self.device, non_blocking=True)


def sample_dataloader(
    dataset: Dataset,
    batch_size: int,
    seed: int,
    num_workers: int = 0,
    shard: tuple[int, int] = (0, 1),
    collate_fn=None,
    pin_memory: bool = False,
) -> DataLoader:
    """A plain DataLoader over the shared-seed batch sampler (the per-sample path; what
    ``prepare_dataloaders`` hands to users). Call ``loader.batch_sampler.set_epoch(e)`` between epochs."""
    if not isinstance(dataset, (SeededDataset, TensorImageDataset, FileImageDataset)):
        dataset = SeededDataset(dataset)
    sampler = SharedSeedBatchSampler(len(dataset), batch_size, seed)
    if shard[1] > 1:
        sampler = _ShardSampler(sampler, *shard)
    kwargs = {"collate_fn": collate_fn} if collate_fn is not None else {}
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=pin_memory,
        **kwargs,
    )


class _ShardSampler(Sampler):
    """Part r of R of every batch of a SharedSeedBatchSampler."""

    def __init__(self, sampler: SharedSeedBatchSampler, r: int, replicas: int):
        self.sampler, self.r, self.replicas = sampler, r, replicas

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.sampler.set_epoch(epoch, start_step)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        for batch in self.sampler:
            part = len(batch) // self.replicas
            yield batch[self.r * part : (self.r + 1) * part]
