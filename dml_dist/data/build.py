"""From a config to datasets and loaders: which data path, which splits.

``loader: memory`` decodes each split once per node into the on-disk cache and trains from the decoded
set on the device; ``loader: stream`` decodes every batch from the files; ``auto`` takes memory when the
decoded splits at ``image_size`` fit ``memory_budget_gb`` (default: a quarter of the GPU's memory, or of
the host's on CPU, where the node's ranks share one mapped copy) and stream otherwise, and stream whenever
``augment`` has ``rrc`` (RandomResizedCrop needs the original files). The log says which and why.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.utils.data import Dataset

from .. import distributed as D
from ..errors import DMLError
from .cache import cached_images, default_cache_dir
from .cifar import load_cifar
from .folders import FileList, scan, scan_shared
from .images import center_resize, decode_file
from .memory import TensorImageDataset
from .shares import FileImageDataset

DEFAULTS = {
    "loader": "auto",
    "memory_budget_gb": None,
    "cache_dir": None,
    "crop_fraction": 1.0,
    "rrc_scale": [0.08, 1.0],
    "rrc_ratio": [3 / 4, 4 / 3],
    "decode_device": "cpu",
}


@dataclass
class Datasets:
    train: Dataset
    val: Dataset
    test: Dataset | None
    classes: list
    collate_fn: Callable | None = None  # a custom train loader's, kept for the per-sample path
    path: str = "memory"  # the training data path: memory | stream | custom
    why: str = ""  # why that path (logged)
    train_files: FileList | None = None  # image folders: train/'s file list (a resume checks it)
    skipped: list = field(default_factory=list)  # bad_images=skip: (path, line) replaced in the cache

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


def subset_indices(n: int, k: int, seed: int) -> torch.Tensor | None:
    """A deterministic ``k``-of-``n`` subset (by ``seed``), in order; None for the whole set (k == 0)."""
    if k <= 0 or k >= n:
        return None
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919))
    return perm[:k].sort().values


def split_train_val(ds, val_fraction: float, seed: int):
    train, val = split_indices(len(ds), val_fraction, seed)
    return ds.subset(train), ds.subset(val, augment=())


def take_subset(ds, k: int, seed: int):
    idx = subset_indices(len(ds), k, seed)
    return ds if idx is None else ds.subset(idx)


def load_image_folder(root: str, image_size: int = 32, augment=(), crop_fraction: float = 1.0) -> TensorImageDataset:
    """Decode ``root/<class>/*`` in this process (no cache) into a TensorImageDataset."""
    files = scan(root)
    images = torch.stack(
        [center_resize(decode_file(files.path(i)), image_size, crop_fraction) for i in range(len(files))]
    )
    return TensorImageDataset(images, torch.from_numpy(files.labels), files.classes, augment)


def memory_budget(cfg: dict, device: torch.device | None) -> tuple[float, str]:
    """Bytes the decoded set may take on the training device, and where the number comes from."""
    if cfg.get("memory_budget_gb") is not None:
        return cfg["memory_budget_gb"] * 1e9, "memory_budget_gb"
    if device is not None and device.type == "cuda":
        # Peers sharing one GPU each hold a copy: the quarter is split between them. Who shares it comes from
        # the GPUs' identities (per-task isolation shows each process one GPU); without them, from the counts.
        sharing = D.ranks_on_my_gpu() or max(
            1, -(-int(os.environ.get("LOCAL_WORLD_SIZE", "1")) // max(1, torch.cuda.device_count()))
        )
        return (
            torch.cuda.get_device_properties(device).total_memory / 4 / sharing,
            "a quarter of the GPU's memory"
            + (f", split between the {sharing} ranks that share it" if sharing > 1 else ""),
        )
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 4, "a quarter of the host's memory"


def choose_path(cfg: dict, n_images: int, device: torch.device | None) -> tuple[str, str]:
    """``(memory|stream, why)`` for an image folder of ``n_images`` (all splits) at ``image_size``."""
    s = cfg["image_size"]
    need = n_images * 3 * s * s
    rrc = isinstance(cfg["augment"], (list, tuple)) and "rrc" in cfg["augment"]
    choice = cfg.get("loader", "auto")
    if choice == "memory" and rrc:
        raise DMLError(
            "loader=memory cannot apply rrc: RandomResizedCrop crops the original files, and the "
            "memory path holds them resized; use loader=stream (or auto), or drop rrc from augment"
        )
    if choice != "auto":
        return choice, f"loader={choice}"
    if rrc:
        return "stream", "augment has rrc (RandomResizedCrop reads the original files)"
    budget, source = memory_budget(cfg, device)
    fits = need <= budget
    return ("memory" if fits else "stream"), (
        f"loader=auto: the decoded set ({need / 1e9:.2f} GB at {s} px) "
        f"{'fits' if fits else 'exceeds'} the budget of {budget / 1e9:.2f} GB "
        f"({source})"
    )


def _folder_datasets(cfg: dict, device, log) -> Datasets:
    d, size, seed = cfg["data_dir"], cfg["image_size"], cfg["seed"]
    if not os.path.isdir(d):
        raise DMLError(f"data_dir {d} does not exist; point data_dir at a folder with train/ (and val/)")
    cache_dir = cfg.get("cache_dir") or default_cache_dir(d)
    lists = {split: scan_shared(os.path.join(d, split), cache_dir, log) for split in ("train", "val", "test")}
    train = lists["train"]
    if train is None:
        raise DMLError(
            f"data folder {os.path.join(d, 'train')} does not exist; set data_dir to a folder with "
            f"train/<class>/ images"
        )
    for split in ("val", "test"):
        ds = lists[split]
        if ds is not None and ds.classes != train.classes:
            only_train = sorted(set(train.classes) - set(ds.classes))
            only_split = sorted(set(ds.classes) - set(train.classes))
            raise DMLError(
                f"class folders of train/ and {split}/ differ (only in train: {only_train}, "
                f"only in {split}: {only_split}); make both hold the same class folders"
            )
    specs = {"train": "train/", "val": "val/", "test": "test/"}
    if lists["val"] is None:  # hold val_fraction of train/ out, by seed
        tr, va = split_indices(len(train), cfg["val_fraction"], seed)
        lists["train"], lists["val"] = train.subset(tr), train.subset(va)
        specs["train"] = specs["val"] = f"train/ val_fraction={cfg['val_fraction']} seed={seed}"
    sub = subset_indices(len(lists["train"]), cfg.get("train_subset", 0), seed)
    if sub is not None:
        lists["train"] = lists["train"].subset(sub)
        specs["train"] += f" train_subset={cfg['train_subset']} seed={seed}"
    n_all = sum(len(f) for f in lists.values() if f is not None)
    # Rank 0 decides for all (nodes may differ in memory); every rank computes it, so a config error
    # stops them all alike.
    path, why = D.broadcast_object(choose_path(cfg, n_all, device))  # sync point
    eval_cached = (
        path == "stream"
        and cfg.get("cache_eval", True)
        and D.broadcast_object(
            sum(len(lists[k]) for k in ("val", "test") if lists[k] is not None) * 3 * size * size
            <= memory_budget(cfg, device)[0]
        )
    )
    if eval_cached:  # their transform is fixed: decoded once into the cache, not at every evaluation
        why += "; val/test from the cache (cache_eval)"
    out, skipped = {}, []
    for split, files in lists.items():
        augment = cfg["augment"] if split == "train" else ()
        if files is None:
            out[split] = None
        elif path == "stream" and not (eval_cached and split != "train"):
            out[split] = FileImageDataset(
                files, size, cfg["crop_fraction"], augment, cfg["rrc_scale"], cfg["rrc_ratio"], cfg["decode_device"]
            )
            out[split].bad_images = cfg.get("bad_images", "stop")
        else:
            images, labels = cached_images(
                files,
                cache_dir,
                split,
                specs[split],
                size,
                cfg["crop_fraction"],
                log,
                cfg.get("bad_images", "stop"),
                skipped,
                cfg.get("cache_keep_days", 14),
            )
            out[split] = TensorImageDataset(images, labels, files.classes, augment)
    return Datasets(
        out["train"],
        out["val"],
        out["test"],
        list(train.classes),
        path=path,
        why=why,
        train_files=train,
        skipped=skipped,
    )


def build_datasets(
    cfg: dict, device: torch.device | None = None, log: Callable[[str], None] = lambda s: None
) -> Datasets:
    """train / val / test datasets as the config asks (docs/data.md). Collective under torchrun (the file
    list is scanned by rank 0, the cache built or CIFAR downloaded by one rank per node). ``device``: the
    training device, for the memory budget."""
    cfg = {**DEFAULTS, **cfg}
    if cfg["dataset"] in ("cifar10", "cifar100"):
        if cfg["loader"] == "stream":
            raise DMLError(
                f"loader=stream reads image folders; {cfg['dataset']} is decoded from its python "
                f"arrays into memory: use loader=auto or memory"
            )
        if "rrc" in cfg["augment"]:
            raise DMLError(
                f"augment rrc (RandomResizedCrop) crops original image files; {cfg['dataset']} holds "
                f"32x32 arrays: use crop and flip instead"
            )
        return _cifar_datasets(cfg)
    return _folder_datasets(cfg, device, log)


def _cifar_datasets(cfg: dict) -> Datasets:
    """CIFAR's splits. A download happens once per node (local rank 0, which keeps what it built); the
    node's other ranks read the files after it. Collective under torchrun: a failed download stops every
    rank with its one line (none waits, none reports "lost contact")."""

    def build() -> Datasets:
        train, test = load_cifar(cfg["data_dir"], cfg["dataset"], cfg["image_size"], cfg.get("download", True))
        train.augment = cfg["augment"]
        train, val = split_train_val(train, cfg["val_fraction"], cfg["seed"])
        train = take_subset(train, cfg.get("train_subset", 0), cfg["seed"])
        return Datasets(train, val, test, train.classes, why=f"{cfg['dataset']}: decoded arrays")

    data, error = None, None
    if D.local_rank() == 0 and cfg.get("download", True):
        try:
            data = build()
        except DMLError as e:
            error = str(e)
    failed = [e for e in D.all_gather_objects(error) if e]  # sync point: the others wait for the download
    if failed:
        raise DMLError(failed[0])
    return data if data is not None else build()
