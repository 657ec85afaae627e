"""A dataset to a loader: the memory path for decoded sets, the stream path for file sets, the per-sample path
(DataLoader) for any other dataset."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from .. import distributed as D
from ..errors import DMLError
from .memory import EVAL_BATCH, DeviceEvalLoader, DeviceTrainLoader, TensorImageDataset
from .plan import shard_range
from .sampler import SampleLoader, sample_dataloader
from .shares import FileImageDataset
from .stream import StreamEvalLoader, StreamTrainLoader


def _check_decode_device(dataset, device) -> None:
    if getattr(dataset, "decode_device", "cpu") != "cuda":
        return
    if torch.device(device).type != "cuda":
        raise DMLError(
            "decode_device=cuda decodes on the training GPU, but this rank trains on the CPU; "
            "use decode_device=cpu (or train on GPUs)"
        )
    try:
        from torchcodec.decoders import decode_jpeg  # noqa: F401 - importable with its native library
    except Exception as e:  # noqa: BLE001
        raise DMLError(
            f"decode_device=cuda needs TorchCodec ({type(e).__name__}: {str(e)[:80]}); install its CUDA "
            f"build (README, 'Requirements') or use decode_device=cpu"
        ) from None


def make_train_loader(
    dataset: Dataset,
    batch_size: int,
    seed: int,
    num_workers: int = 0,
    device="cpu",
    shard: tuple[int, int] = (0, 1),
    collate_fn=None,
    node=(0, 1),
    decode=None,
):
    """The memory path for decoded sets, the stream path for file sets, the per-sample path (DataLoader)
    for any other dataset or when a custom ``collate_fn`` must see the samples. Stream path: ``decode``,
    this rank's decode unit ``(group, part, rows)`` (``distributed.decode_group``); without it the node
    (``node=(l, L)``: this rank's index in its node and the node's size) decodes each whole batch.
    Collective for file sets (the groups are created on first use)."""
    if isinstance(dataset, TensorImageDataset) and collate_fn is None:
        return DeviceTrainLoader(dataset, batch_size, seed, torch.device(device), shard)
    if isinstance(dataset, FileImageDataset) and collate_fn is None:
        _check_decode_device(dataset, device)
        group, part, rows = decode if decode is not None else (D.node_group(node[1]), node, (0, 1))
        return StreamTrainLoader(dataset, batch_size, seed, device, part, group, num_workers, shard, rows)
    return SampleLoader(
        sample_dataloader(
            dataset, batch_size, seed, num_workers, shard, collate_fn, pin_memory=torch.device(device).type == "cuda"
        ),
        device,
    )


def make_eval_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int = 0,
    device=None,
    shard: tuple[int, int] = (0, 1),
    node=(0, 1),
    decode=None,
):
    """Sequential order: every rank scores the same samples in the same order. With ``device``, decoded
    sets are scored from device-resident tensors (``shard=(r, R)``: contiguous part r of R) and file sets
    decoded by the decode unit (``decode``, as for ``make_train_loader``; each batch split by rows between
    the replicas). ``loader.positions``: the set's indices the loader yields, in order."""
    if device is not None and isinstance(dataset, TensorImageDataset):
        return DeviceEvalLoader(dataset, device, max(EVAL_BATCH, batch_size), shard)
    if device is not None and isinstance(dataset, FileImageDataset):
        _check_decode_device(dataset, device)
        group, part, rows = decode if decode is not None else (D.node_group(node[1]), node, (0, 1))
        return StreamEvalLoader(dataset, device, part, group, num_workers, max(EVAL_BATCH, batch_size), shard, rows)
    lo, hi = shard_range(len(dataset), shard)
    if shard[1] > 1:
        dataset = torch.utils.data.Subset(dataset, range(lo, hi))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    loader.positions = torch.arange(lo, hi)
    return loader
