"""Datasets and the two training data paths. Every rank must see the same batches, byte for byte.

**Device path** (image folders and CIFAR: ``TensorImageDataset``). The set is decoded once into a uint8
tensor (3 KB per 32x32 image) that moves to the peer's device once (CIFAR-10: 150 MB). Per step,
``DeviceTrainLoader`` takes slice ``step`` of the epoch's permutation (a generator seeded with
``(seed, epoch)``) and draws the per-sample augmentation parameters from a generator seeded with
``(seed, epoch, step)``, both on the CPU; the indices and parameters cross to the device (pinned,
non-blocking), and the whole batch is gathered, augmented and normalised there (``augment.py``). No
DataLoader workers, no per-image Python. Evaluation runs from device-resident tensors in large batches.

**Per-sample path** (a notebook user's own datasets, ``SeededDataset``). A DataLoader whose batch sampler
hands out ``(index, sample_seed)`` pairs drawn from ``(seed, epoch)``; the dataset runs its own random
transforms under RNGs seeded with ``sample_seed``.

Either way a batch depends on (seed, epoch, step) alone: not on the rank, the number of workers, or a
restart in the middle of an epoch.
"""
from __future__ import annotations

import functools
import os
import pickle
import random
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms.v2 import functional as TF

from .augment import AUGMENTATIONS, AugParams, augment_batch, augment_one, step_generator
from .errors import DMLError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# CIFAR-10 channel statistics; used for every dataset so a checkpoint always expects the same inputs.
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
EVAL_BATCH = 512  # evaluation batch on the device path (BN is in eval mode: results do not depend on it)


def augment_image(img: torch.Tensor, seed: int, ops=AUGMENTATIONS) -> torch.Tensor:
    """Per-sample path: augment one uint8 CHW image with parameters drawn from ``seed`` alone -> float
    in [0, 1]."""
    return augment_one(img, AugParams.draw(1, torch.Generator().manual_seed(int(seed)))[0], ops)


@functools.lru_cache(maxsize=None)
def _mean_std(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalisation constants on ``device``, copied there once."""
    return torch.tensor(MEAN, device=device).view(3, 1, 1), torch.tensor(STD, device=device).view(3, 1, 1)


def normalize(img: torch.Tensor) -> torch.Tensor:
    """uint8 (0..255) or float (0..1) image(s) -> float32 normalised with the CIFAR-10 statistics."""
    x = img.float().div(255) if img.dtype == torch.uint8 else img
    mean, std = _mean_std(x.device)
    return (x - mean) / std


# --------------------------------------------------------------------------------------------- datasets
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

    def subset(self, indices: torch.Tensor, augment: Optional[bool] = None) -> "TensorImageDataset":
        return TensorImageDataset(self.images[indices], self.labels[indices], self.classes,
                                  self.augment if augment is None else augment)


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


def _scan_image_folder(root: str) -> tuple[list[str], list[tuple[str, int]]]:
    if not os.path.isdir(root):
        raise DMLError(f"data folder {root} does not exist; set data_dir to a folder with train/<class>/ images")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DMLError(f"data folder {root} has no class sub-folders; expected {root}/<class>/<image files>")
    samples = []
    for idx, c in enumerate(classes):
        folder = os.path.join(root, c)
        files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMG_EXTENSIONS))
        if not files:
            raise DMLError(f"class folder {folder} holds no images ({'/'.join(IMG_EXTENSIONS)}); "
                           f"add images or remove the folder")
        samples.extend((os.path.join(folder, f), idx) for f in files)
    return classes, samples


def _decode(path: str, image_size: int) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if im.size != (image_size, image_size):
                im = im.resize((image_size, image_size), Image.BILINEAR)
            return TF.pil_to_tensor(im)
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise DMLError(f"cannot read image {path} ({type(e).__name__}); delete or replace the file") from None


def load_image_folder(root: str, image_size: int = 32, augment=()) -> TensorImageDataset:
    """Decode ``root/<class>/*`` once into a TensorImageDataset (sorted classes, sorted files)."""
    classes, samples = _scan_image_folder(root)
    images = torch.stack([_decode(p, image_size) for p, _ in samples])
    labels = torch.tensor([c for _, c in samples], dtype=torch.int64)
    return TensorImageDataset(images, labels, classes, augment)


def _load_cifar(data_dir: str, name: str, image_size: int, download: bool) -> tuple[TensorImageDataset, TensorImageDataset]:
    """CIFAR-10/100 in the original python format (``cifar-10-batches-py/``, ``cifar-100-python/``)."""
    folder, train_files, test_files, meta, label_key, names_key = {
        "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                    "batches.meta", "labels", "label_names"),
        "cifar100": ("cifar-100-python", ["train"], ["test"], "meta", "fine_labels", "fine_label_names"),
    }[name]
    base = os.path.join(data_dir, folder)
    if not os.path.isdir(base) and download:
        import torchvision
        cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        try:
            cls(data_dir, train=True, download=True)
        except Exception as e:  # no network, disk full, ...
            first = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
            raise DMLError(f"{name} is not in {base} and could not be downloaded ({first}); download it there on "
                           f"a machine with network, or train on an image folder instead (dataset=imagefolder "
                           f"data_dir=..., e.g. the shared subset ../shared/data/cifar10-small)") from None
    if not os.path.isdir(base):
        raise DMLError(f"{name} not found: expected {base}/ in the CIFAR python format")

    def read(fname):
        path = os.path.join(base, fname)
        try:
            with open(path, "rb") as f:
                return pickle.load(f, encoding="latin1")  # the CIFAR format is a pickle by design
        except (OSError, pickle.UnpicklingError, EOFError) as e:
            raise DMLError(f"cannot read {path} ({type(e).__name__}); re-download {name}") from None

    classes = list(read(meta)[names_key])

    def build(files):
        parts = [read(f) for f in files]
        x = torch.cat([torch.as_tensor(p["data"], dtype=torch.uint8).view(-1, 3, 32, 32) for p in parts])
        y = torch.cat([torch.as_tensor(p[label_key], dtype=torch.int64) for p in parts])
        if image_size != 32:
            x = F.interpolate(x.float(), size=(image_size, image_size), mode="bilinear",
                              antialias=True).round().clamp(0, 255).to(torch.uint8)
        return TensorImageDataset(x, y, classes)

    return build(train_files), build(test_files)


@dataclass
class Datasets:
    train: Dataset
    val: Dataset
    test: Optional[Dataset]
    classes: list[str]
    collate_fn: Optional[Callable] = None   # a custom train loader's, kept for the per-sample path

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic (train, val) indices, each sorted: the same (seed, fraction) always holds out the
    same samples."""
    n_val = max(1, int(round(n * val_fraction)))
    if n_val >= n:
        raise DMLError(f"val_fraction={val_fraction} leaves no training images out of {n}; lower it")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def split_train_val(ds: TensorImageDataset, val_fraction: float, seed: int) -> tuple[TensorImageDataset, TensorImageDataset]:
    train, val = split_indices(len(ds), val_fraction, seed)
    return ds.subset(train), ds.subset(val, augment=())


def take_subset(ds: TensorImageDataset, k: int, seed: int) -> TensorImageDataset:
    """A deterministic ``k``-image subset (by ``seed``), in the set's order; the whole set when k == 0."""
    if k <= 0 or k >= len(ds):
        return ds
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed + 7919))
    return ds.subset(perm[:k].sort().values)


def build_datasets(cfg: dict) -> Datasets:
    """train / val / test datasets as the config asks (see README, "Data")."""
    data = _build_datasets(cfg)
    data.train = take_subset(data.train, cfg.get("train_subset", 0), cfg["seed"])
    return data


def _build_datasets(cfg: dict) -> Datasets:
    d, size = cfg["data_dir"], cfg["image_size"]
    if cfg["dataset"] in ("cifar10", "cifar100"):
        train, test = _load_cifar(d, cfg["dataset"], size, download=cfg.get("download", True))
        train.augment = cfg["augment"]
        train, val = split_train_val(train, cfg["val_fraction"], cfg["seed"])
        return Datasets(train, val, test, train.classes)

    if not os.path.isdir(d):
        raise DMLError(f"data_dir {d} does not exist; point data_dir at a folder with train/ (and val/)")
    train = load_image_folder(os.path.join(d, "train"), size, cfg["augment"])
    if os.path.isdir(os.path.join(d, "val")):
        val = load_image_folder(os.path.join(d, "val"), size)
    else:
        train, val = split_train_val(train, cfg["val_fraction"], cfg["seed"])
    test = load_image_folder(os.path.join(d, "test"), size) if os.path.isdir(os.path.join(d, "test")) else None
    for split, ds in (("val", val), ("test", test)):
        if ds is not None and ds.classes != train.classes:
            only_train = sorted(set(train.classes) - set(ds.classes))
            only_split = sorted(set(ds.classes) - set(train.classes))
            raise DMLError(f"class folders of train/ and {split}/ differ (only in train: {only_train}, "
                           f"only in {split}: {only_split}); make both hold the same class folders")
    return Datasets(train, val, test, train.classes)


# ---------------------------------------------------------------------------------------------- sampler
class SharedSeedBatchSampler(Sampler):
    """Yields batches of ``(index, sample_seed)``; identical on every rank for the same (seed, epoch).

    ``set_epoch(e, start_step=s)`` positions it at batch ``s`` of epoch ``e`` (exact mid-epoch resume).
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, drop_last: bool = True):
        if num_samples < batch_size and drop_last:
            raise DMLError(f"batch_size={batch_size} is larger than the training set ({num_samples} images); "
                           f"lower batch_size")
        self.n, self.batch_size, self.seed, self.drop_last = num_samples, batch_size, seed, drop_last
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def __iter__(self) -> Iterator[list]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        seeds = torch.randint(0, 2**62, (self.n,), generator=g).tolist()
        for step in range(self.start_step, len(self)):
            lo = step * self.batch_size
            yield [(perm[k], seeds[k]) for k in range(lo, min(lo + self.batch_size, self.n))]


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> device, pinned and non-blocking on CUDA (the copy overlaps with queued work)."""
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class DeviceTrainLoader:
    """The device path's training batches: ``for x, y in loader`` gives normalised float32 inputs and
    int64 labels on ``device``. ``set_epoch(e, start_step=s)`` positions it at step ``s`` of epoch ``e``.

    ``shard=(r, R)``: yield only part r of R of each batch (data-parallel replicas of one peer); every
    rank still draws the whole batch's indices and parameters, so shard r is the same on every peer.
    """

    def __init__(self, dataset: TensorImageDataset, batch_size: int, seed: int, device: torch.device,
                 shard: tuple[int, int] = (0, 1)):
        if len(dataset) < batch_size:
            raise DMLError(f"batch_size={batch_size} is larger than the training set ({len(dataset)} images); "
                           f"lower batch_size")
        self.batch_size, self.seed, self.device = batch_size, seed, torch.device(device)
        self.ops = dataset.augment
        self.n = len(dataset)
        self.shard = shard
        # Moved once; every step gathers its batch on the device.
        self.images = dataset.images.to(self.device)
        self.labels = dataset.labels.to(self.device)
        self.epoch, self.start_step = 0, 0
        self._perm: Optional[tuple[int, torch.Tensor]] = None

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def __len__(self) -> int:
        return self.n // self.batch_size

    def plan(self, epoch: int, step: int) -> tuple[torch.Tensor, AugParams]:
        """CPU indices [B] and augmentation parameters of one step: a function of (seed, epoch, step)."""
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(self.n, generator=g))
        idx = self._perm[1][step * self.batch_size:(step + 1) * self.batch_size]
        params = AugParams.draw(len(idx), step_generator(self.seed, epoch, step))
        r, replicas = self.shard
        if replicas > 1:
            part = len(idx) // replicas
            idx, params = idx[r * part:(r + 1) * part], params[r * part:(r + 1) * part]
        return idx, params

    def batch(self, epoch: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx, params = self.plan(epoch, step)
        idx = _to_device(idx, self.device)
        x = self.images[idx]
        if self.ops:
            x = augment_batch(x, params.to(self.device, non_blocking=True), self.ops)
        return normalize(x), self.labels[idx]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for step in range(self.start_step, len(self)):
            yield self.batch(self.epoch, step)


class DeviceEvalLoader:
    """Evaluation batches in dataset order from device-resident tensors (large batches)."""

    def __init__(self, dataset: TensorImageDataset, device: torch.device, batch_size: int = EVAL_BATCH,
                 shard: tuple[int, int] = (0, 1)):
        r, parts = shard
        lo, hi = len(dataset) * r // parts, len(dataset) * (r + 1) // parts
        self.device, self.batch_size = torch.device(device), batch_size
        self.images = dataset.images[lo:hi].to(self.device)
        self.labels = dataset.labels[lo:hi].to(self.device)

    def __len__(self) -> int:
        return -(-len(self.labels) // self.batch_size)

    def __iter__(self):
        for lo in range(0, len(self.labels), self.batch_size):
            yield normalize(self.images[lo:lo + self.batch_size]), self.labels[lo:lo + self.batch_size]


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


def make_train_loader(dataset: Dataset, batch_size: int, seed: int, num_workers: int = 0, device="cpu",
                      shard: tuple[int, int] = (0, 1), collate_fn=None):
    """The device path for decoded image sets; the per-sample path (DataLoader) for any other dataset, or
    when a custom ``collate_fn`` must see the samples."""
    if isinstance(dataset, TensorImageDataset) and collate_fn is None:
        return DeviceTrainLoader(dataset, batch_size, seed, torch.device(device), shard)
    return SampleLoader(sample_dataloader(dataset, batch_size, seed, num_workers, shard, collate_fn,
                                          pin_memory=torch.device(device).type == "cuda"), device)


def sample_dataloader(dataset: Dataset, batch_size: int, seed: int, num_workers: int = 0,
                      shard: tuple[int, int] = (0, 1), collate_fn=None, pin_memory: bool = False) -> DataLoader:
    """A plain DataLoader over the shared-seed batch sampler (the per-sample path; what
    ``prepare_dataloaders`` hands to users). Call ``loader.batch_sampler.set_epoch(e)`` between epochs."""
    if not isinstance(dataset, (SeededDataset, TensorImageDataset)):
        dataset = SeededDataset(dataset)
    sampler = SharedSeedBatchSampler(len(dataset), batch_size, seed)
    if shard[1] > 1:
        sampler = _ShardSampler(sampler, *shard)
    kwargs = {"collate_fn": collate_fn} if collate_fn is not None else {}
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, persistent_workers=num_workers > 0,
                      pin_memory=pin_memory, **kwargs)


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
            yield batch[self.r * part:(self.r + 1) * part]


def make_eval_loader(dataset: Dataset, batch_size: int, num_workers: int = 0, device=None,
                     shard: tuple[int, int] = (0, 1)):
    """Sequential order: every rank scores the same samples in the same order. With ``device``, decoded
    image sets are scored from device-resident tensors; ``shard=(r, R)`` scores contiguous part r of R."""
    if device is not None and isinstance(dataset, TensorImageDataset):
        return DeviceEvalLoader(dataset, device, max(EVAL_BATCH, batch_size), shard)
    if shard[1] > 1:
        r, parts = shard
        dataset = torch.utils.data.Subset(dataset, range(len(dataset) * r // parts, len(dataset) * (r + 1) // parts))
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
