"""Datasets, per-sample augmentation and the shared-seed sampler.

Every rank must see the same batches with byte-identical augmentation. Instead of relying on each
DataLoader worker's RNG, the sampler hands out ``(index, sample_seed)`` pairs drawn from a generator
seeded with ``(seed, epoch)``; the dataset augments sample ``index`` with a generator seeded by
``sample_seed``. The result depends only on (seed, epoch, position), never on the rank, the number of
workers or which worker served the sample, and a run can restart at any step of an epoch.

Image folders are decoded once into a uint8 tensor (airbench style): 3 KB per 32x32 image, so
CIFAR-sized sets stay small in memory and no worker re-decodes JPEGs every epoch.
"""
from __future__ import annotations

import os
import pickle
import random
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms.v2 import functional as TF

from .errors import DMLError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# CIFAR-10 channel statistics; used for every dataset so a checkpoint always expects the same inputs.
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
ROTATION_DEGREES = 10.0
JITTER = 0.2  # brightness / contrast / saturation factors drawn from [1 - JITTER, 1 + JITTER]


# ----------------------------------------------------------------------------------------- augmentation
def augment_image(img: torch.Tensor, seed: int) -> torch.Tensor:
    """Augment one uint8 CHW image with parameters drawn from ``seed`` alone (deterministic, rank-free):
    random crop with 4-pixel zero padding, horizontal flip, rotation within +-10 degrees, colour jitter."""
    g = torch.Generator().manual_seed(int(seed))
    u = torch.rand(7, generator=g).tolist()
    _, h, w = img.shape
    i, j = int(u[0] * 9), int(u[1] * 9)  # crop offset in [0, 8] after padding by 4
    img = F.pad(img, (4, 4, 4, 4))[:, i:i + h, j:j + w]
    if u[2] < 0.5:
        img = img.flip(-1)
    img = TF.rotate(img, (2 * u[3] - 1) * ROTATION_DEGREES)
    img = TF.adjust_brightness(img, 1 + (2 * u[4] - 1) * JITTER)
    img = TF.adjust_contrast(img, 1 + (2 * u[5] - 1) * JITTER)
    img = TF.adjust_saturation(img, 1 + (2 * u[6] - 1) * JITTER)
    return img


_MEAN = torch.tensor(MEAN).view(3, 1, 1)
_STD = torch.tensor(STD).view(3, 1, 1)


def normalize(img: torch.Tensor) -> torch.Tensor:
    return (img.float().div_(255) - _MEAN) / _STD


# --------------------------------------------------------------------------------------------- datasets
class TensorImageDataset(Dataset):
    """Decoded uint8 images [N, 3, H, W] + int64 labels. ``ds[i]`` gives the plain (normalised) image;
    ``ds[(i, seed)]`` gives it augmented with ``seed`` when ``augment`` is on."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: Sequence[str], augment: bool = False):
        self.images, self.labels, self.classes, self.augment = images, labels, list(classes), augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, None)
        img = self.images[index]
        if self.augment and seed is not None:
            img = augment_image(img, seed)
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


def load_image_folder(root: str, image_size: int = 32, augment: bool = False) -> TensorImageDataset:
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
            raise DMLError(f"{name} is not in {base} and could not be downloaded ({e}); "
                           f"download it there by hand or use dataset=imagefolder") from None
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

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def split_train_val(ds: TensorImageDataset, val_fraction: float, seed: int) -> tuple[TensorImageDataset, TensorImageDataset]:
    """Deterministic split: the same (seed, fraction) always holds out the same images."""
    n_val = max(1, int(round(len(ds) * val_fraction)))
    if n_val >= len(ds):
        raise DMLError(f"val_fraction={val_fraction} leaves no training images out of {len(ds)}; lower it")
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))
    return ds.subset(perm[n_val:].sort().values), ds.subset(perm[:n_val].sort().values, augment=False)


def build_datasets(cfg: dict) -> Datasets:
    """train / val / test datasets as the config asks (see README, "Data")."""
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


def make_train_loader(dataset: Dataset, batch_size: int, seed: int, num_workers: int) -> DataLoader:
    if not isinstance(dataset, (TensorImageDataset, SeededDataset)):
        dataset = SeededDataset(dataset)
    sampler = SharedSeedBatchSampler(len(dataset), batch_size, seed)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                      persistent_workers=num_workers > 0)


def make_eval_loader(dataset: Dataset, batch_size: int, num_workers: int = 0) -> DataLoader:
    """Sequential order: every rank scores the same samples in the same order."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
