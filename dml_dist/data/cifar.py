"""CIFAR-10/100 in the original python format, downloaded once per node, split as the config asks."""

from __future__ import annotations

import os
import pickle

import torch
import torch.nn.functional as F

from ..errors import DMLError
from .memory import TensorImageDataset


def load_cifar(data_dir: str, name: str, image_size: int, download: bool):
    """CIFAR-10/100 in the original python format (``cifar-10-batches-py/``, ``cifar-100-python/``)."""
    folder, train_files, test_files, meta, label_key, names_key = {
        "cifar10": (
            "cifar-10-batches-py",
            [f"data_batch_{i}" for i in range(1, 6)],
            ["test_batch"],
            "batches.meta",
            "labels",
            "label_names",
        ),
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
            raise DMLError(
                f"{name} is not in {base} and could not be downloaded ({first}); download it there on "
                f"a machine with network, or train on an image folder instead (dataset=imagefolder "
                f"data_dir=..., e.g. the shared subset ../shared/data/cifar10-small)"
            ) from None
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
            x = (
                F.interpolate(x.float(), size=(image_size, image_size), mode="bilinear", antialias=True)
                .round()
                .clamp(0, 255)
                .to(torch.uint8)
            )
        return TensorImageDataset(x, y, classes)

    return build(train_files), build(test_files)
