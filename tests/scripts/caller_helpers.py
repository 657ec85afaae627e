"""Importable helpers for tests/test_callers.py (peer processes are fresh interpreters: what they run
must come from a module, never from the caller's __main__)."""

import os

from torch.utils.data import default_collate


def marking_collate(batch):
    """The default collate, leaving a mark that a peer process really used this custom collate_fn."""
    marker = os.environ.get("DML_TEST_COLLATE_MARK")
    if marker:
        with open(f"{marker}.{os.getpid()}", "w"):
            pass
    return default_collate(batch)


def random_imagefolder(root: str, size: int):
    """A user's own torchvision ImageFolder with its own random transforms."""
    import torch
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import v2 as T

    tf = T.Compose(
        [
            T.RandomResizedCrop(size, scale=(0.5, 1.0)),
            T.RandomHorizontalFlip(),
            T.ToImage(),
            T.ToDtype(torch.float32, scale=True),
        ]
    )
    return ImageFolder(root, tf)
