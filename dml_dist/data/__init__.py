"""Datasets and the training data paths (README, "Data"). Every rank must see the same batches, byte for byte.

- ``folders``: the file list of an image folder (scanned once) and the decoder (TorchCodec, PIL fallback).
- ``cache``: the memory path's on-disk cache, decoded once per node, mapped read-only.
- ``memory``: the decoded set on the device, batches sampled and augmented there.
- ``stream``: batches decoded from the files, each node decoding each batch once.
- ``sampler``: the shared-seed sampler and the per-sample path for custom datasets.
- ``build``: config -> datasets and loaders (which path, which splits).
"""
from .build import (Datasets, build_datasets, choose_path, load_image_folder, make_eval_loader,  # noqa: F401
                    make_train_loader, split_indices, split_train_val, subset_indices, take_subset)
from .folders import IMG_EXTENSIONS, FileList, decode_file, scan  # noqa: F401
from .memory import (EVAL_BATCH, MEAN, STD, BatchPlan, DeviceEvalLoader, DeviceTrainLoader,  # noqa: F401
                     TensorImageDataset, augment_image, normalize)
from .sampler import SampleLoader, SeededDataset, SharedSeedBatchSampler, sample_dataloader  # noqa: F401
from .stream import FileImageDataset, StreamEvalLoader, StreamTrainLoader  # noqa: F401
