"""The memory path: the decoded set sits on the training device, every step is sampled and augmented there.

The set (a uint8 tensor, from the on-disk cache or CIFAR's arrays) moves to each peer's device once. Per
step, ``DeviceTrainLoader`` takes slice ``step`` of the epoch's permutation (a generator seeded with
``(seed, epoch)``) and draws the per-sample augmentation parameters from a generator seeded with
``(seed, epoch, step)``, both on the CPU; they cross to the device in one packed copy (``StepUpload``:
a reused pinned buffer, non-blocking, only the fields the active augmentations use) and the whole
batch is gathered, augmented and normalised there (``augment.py``). No DataLoader workers, no per-image
Python. Evaluation runs from device-resident tensors in large batches. A batch depends on
(seed, epoch, step) alone: not on the rank, or a restart in the middle of an epoch.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from dataclasses import fields

import torch
from torch.utils.data import Dataset

from .augment import AUGMENTATIONS, AugParams, augment_batch, augment_one, device_constant
from .plan import BatchPlan, shard_range, shard_rows

# CIFAR-10 channel statistics: every data path normalises with them. A peer whose inputs need others
# (``normalize``, pretrained weights) re-normalises in front of its model (``weights.apply_statistics``).
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
STATISTICS = {"cifar10": (MEAN, STD), "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}  # (mean, std)
EVAL_BATCH = 512  # evaluation batch on the device path (BN is in eval mode: results do not depend on it)


def augment_image(img: torch.Tensor, seed: int, ops=AUGMENTATIONS) -> torch.Tensor:
    """Per-sample path: augment one uint8 CHW image with parameters drawn from ``seed`` alone -> float
    in [0, 1]."""
    return augment_one(img, AugParams.draw(1, torch.Generator().manual_seed(int(seed)))[0], ops)


@functools.cache
def _mean_std(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalisation constants on ``device``, copied there once."""
    return torch.tensor(MEAN, device=device).view(3, 1, 1), torch.tensor(STD, device=device).view(3, 1, 1)


def normalize(img: torch.Tensor) -> torch.Tensor:
    """uint8 (0..255) or float (0..1) image(s) -> float32 normalised with the CIFAR-10 statistics."""
    mean, std = device_constant(_mean_std, img.device)
    if img.dtype == torch.uint8:
        return img.float().div_(255).sub_(mean).div_(std)  # in place on the fresh float copy
    return (img - mean).div_(std)


def batch_transform(x: torch.Tensor, params: AugParams, ops: tuple[str, ...]) -> torch.Tensor:
    """A training step's uint8 batch on the device -> its normalised float32 inputs: the augmentations
    ``ops`` (``augment_batch``), then ``normalize``. One function, so that with ``compile`` on the trainer
    compiles the two together (``TrainBatches.transform``)."""
    return normalize(augment_batch(x, params, ops) if ops else x)


class TensorImageDataset(Dataset):
    """Decoded uint8 images [N, 3, H, W] + int64 labels. ``ds[i]`` gives the plain (normalised) image;
    ``ds[(i, seed)]`` gives it augmented with ``seed`` (per-sample path). ``augment``: the augmentation
    names to apply (``augment.AUGMENTATIONS``); True means all, False none."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: Sequence[str], augment=()):
        self.images, self.labels, self.classes = images, labels, list(classes)
        self.augment = augment

    @property
    def augment(self) -> tuple:
        return self._augment

    @augment.setter
    def augment(self, value) -> None:
        self._augment = tuple(AUGMENTATIONS) if value is True else tuple(value or ())

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, None)
        img = self.images[index]
        if self.augment and seed is not None:
            img = augment_image(img, seed, self.augment)
        return normalize(img), int(self.labels[index])

    def subset(self, indices: torch.Tensor, augment: bool | None = None) -> TensorImageDataset:
        return TensorImageDataset(
            self.images[indices], self.labels[indices], self.classes, self.augment if augment is None else augment
        )


_FIELDS = {
    "crop": ("crop_i", "crop_j"),
    "flip": ("flip",),
    "rotate": ("angle",),
    "jitter": ("brightness", "contrast", "saturation"),
}
_DTYPES = {"crop_i": torch.int64, "crop_j": torch.int64, "flip": torch.bool}  # the rest: float32


class StepUpload:
    """One host-to-device copy per step: the batch's indices and the augmentation parameters that the
    active ``ops`` use, packed into one float64 tensor (exact for indices below 2^53 and for every
    parameter) and, on CUDA, copied non-blocking through one of two reused pinned buffers; a buffer is
    refilled only after its previous copy finished (a CUDA event, normally long done). Parameters of
    inactive ops are never sent (zeros on the device stand in). ``copies`` counts the transfers."""

    def __init__(self, ops, device: torch.device):
        self.names = [n for op in AUGMENTATIONS if op in ops for n in _FIELDS[op]]
        self.device, self.copies = torch.device(device), 0
        self._slots: list = []  # [pinned buffer, event] x 2 on CUDA
        self._turn = 0

    def __call__(self, idx: torch.Tensor, params: AugParams) -> tuple[torch.Tensor, AugParams]:
        host = torch.stack([idx.double()] + [getattr(params, n).double() for n in self.names], 1)
        self.copies += 1
        if self.device.type == "cuda":
            if not self._slots or self._slots[0][0].shape != host.shape:
                self._slots = [[torch.empty_like(host).pin_memory(), None] for _ in range(2)]
            slot = self._slots[self._turn]
            self._turn ^= 1
            if slot[1] is not None and not slot[1].query():  # query: no host sync when (as normally) done
                slot[1].synchronize()  # this buffer's previous copy (two steps ago) has not finished yet
            slot[0].copy_(host)
            dev = slot[0].to(self.device, non_blocking=True)
            slot[1] = torch.cuda.Event()
            slot[1].record()
        else:
            dev = host.to(self.device)
        cols = {n: dev[:, 1 + k].to(_DTYPES.get(n, torch.float32)) for k, n in enumerate(self.names)}
        for f in fields(AugParams):
            if f.name not in cols:
                cols[f.name] = torch.zeros(len(idx), dtype=_DTYPES.get(f.name, torch.float32), device=self.device)
        return dev[:, 0].long(), AugParams(**cols)


class TrainBatches:
    """What both training loaders share (``for x, y in loader``: normalised float32 inputs and int64
    labels on ``device``): the step plan, the position (``set_epoch(e, start_step=s)``: step ``s`` of
    epoch ``e``), the one-copy upload, and a step's tail: the batch augmentations and normalisation on the
    device (``transform``: ``batch_transform`` or its compiled twin), keeping what defines the batch for the
    fingerprint check (``last_source``).

    ``shard=(r, R)``: only part r of R of each batch (data-parallel replicas of one peer); every rank still
    draws the whole batch's indices and parameters, so shard r is the same on every peer."""

    def _setup(self, steps: BatchPlan, ops, labels: torch.Tensor, device, shard: tuple[int, int]) -> None:
        self.steps, self.ops, self.shard, self.device = steps, tuple(ops), shard, torch.device(device)
        self.labels = labels.to(self.device)  # once: each step indexes them on the device
        self.epoch, self.start_step = 0, 0
        self.last_source: tuple | None = None
        self.upload = StepUpload(self.ops, self.device)
        self.transform = batch_transform  # the trainer swaps in a compiled twin when the peer compiles

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def __len__(self) -> int:
        return len(self.steps)

    def plan(self, epoch: int, step: int) -> tuple[torch.Tensor, AugParams]:
        """CPU indices and augmentation parameters of this rank's shard of one step."""
        idx, params = self.steps.indices(epoch, step), self.steps.params(epoch, step)
        return shard_rows(idx, self.shard), shard_rows(params, self.shard)

    def finish(self, epoch: int, step: int, images) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's batch: ``images(device_indices)`` gives its uint8 images on the device."""
        idx, params = self.plan(epoch, step)
        idx, dev_params = self.upload(idx, params)  # one host-to-device copy
        x = images(idx)
        self.last_source = (x, params)  # what defines the batch: the fingerprint check hashes it
        return self.transform(x, dev_params, self.ops), self.labels[idx]


class DeviceTrainLoader(TrainBatches):
    """The memory path's training batches (see ``TrainBatches``), gathered from the device-resident set."""

    def __init__(
        self,
        dataset: TensorImageDataset,
        batch_size: int,
        seed: int,
        device: torch.device,
        shard: tuple[int, int] = (0, 1),
    ):
        self._setup(BatchPlan(len(dataset), batch_size, seed), dataset.augment, dataset.labels, device, shard)
        self.images = dataset.images.to(self.device)  # moved once; every step gathers its batch there

    def batch(self, epoch: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.finish(epoch, step, lambda idx: self.images[idx])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for step in range(self.start_step, len(self)):
            yield self.batch(self.epoch, step)


class DeviceEvalLoader:
    """Evaluation batches in dataset order from device-resident tensors (large batches)."""

    def __init__(
        self,
        dataset: TensorImageDataset,
        device: torch.device,
        batch_size: int = EVAL_BATCH,
        shard: tuple[int, int] = (0, 1),
    ):
        lo, hi = shard_range(len(dataset), shard)
        self.device, self.batch_size = torch.device(device), batch_size
        self.positions = torch.arange(lo, hi)  # the set's indices this loader yields, in order
        self.images = dataset.images[lo:hi].to(self.device)
        self.labels = dataset.labels[lo:hi].to(self.device)

    def __len__(self) -> int:
        return -(-len(self.labels) // self.batch_size)

    def __iter__(self):
        for lo in range(0, len(self.labels), self.batch_size):
            yield normalize(self.images[lo : lo + self.batch_size]), self.labels[lo : lo + self.batch_size]
