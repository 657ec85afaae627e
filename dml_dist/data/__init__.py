"""Datasets and the training data paths (docs/data.md). Every rank must see the same batches, byte for byte.

- ``plan``: the batch plan (what each step holds, from ``(seed, epoch, step)``) and row shards.
- ``augment``: the batch augmentations, on the device.
- ``fingerprint``: the cross-rank batch check.
- ``folders``: the file list of an image folder, scanned once per job.
- ``images``: decoding a file (TorchCodec, PIL fallback) and the resize and crop transforms.
- ``cache``: the memory path's on-disk cache, decoded once per node, mapped read-only.
- ``memory``: the decoded set on the device, batches sampled and augmented there.
- ``stream``: batches decoded from the files, each node decoding each batch once.
- ``sampler``: the shared-seed sampler and the per-sample path for custom datasets.
- ``build``: config -> datasets (which path, which splits); ``cifar``: CIFAR's python format.
- ``loaders``: a dataset -> its loader (memory, stream or per-sample path).
- ``shares``: the file dataset and what one member of a decode unit decodes.
- ``cache_upkeep``: the cache's builder lock, use stamps and age cleanup.
"""

from .build import (
    Datasets,
    build_datasets,
    choose_path,
    load_image_folder,
    split_indices,
    split_train_val,
    subset_indices,
    take_subset,
)
from .folders import IMG_EXTENSIONS, FileList, scan
from .images import decode_file
from .loaders import make_eval_loader, make_train_loader
from .memory import (
    EVAL_BATCH,
    MEAN,
    STD,
    DeviceEvalLoader,
    DeviceTrainLoader,
    TensorImageDataset,
    augment_image,
    batch_transform,
    normalize,
)
from .plan import BatchPlan
from .sampler import SampleLoader, SeededDataset, SharedSeedBatchSampler, sample_dataloader
from .shares import FileImageDataset
from .stream import StreamEvalLoader, StreamTrainLoader

__all__ = [
    "BatchPlan",
    "Datasets",
    "DeviceEvalLoader",
    "DeviceTrainLoader",
    "EVAL_BATCH",
    "FileImageDataset",
    "FileList",
    "IMG_EXTENSIONS",
    "MEAN",
    "STD",
    "SampleLoader",
    "SeededDataset",
    "SharedSeedBatchSampler",
    "StreamEvalLoader",
    "StreamTrainLoader",
    "TensorImageDataset",
    "augment_image",
    "batch_transform",
    "build_datasets",
    "choose_path",
    "decode_file",
    "load_image_folder",
    "make_eval_loader",
    "make_train_loader",
    "normalize",
    "sample_dataloader",
    "scan",
    "split_indices",
    "split_train_val",
    "subset_indices",
    "take_subset",
]
