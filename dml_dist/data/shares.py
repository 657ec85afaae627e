"""What one member of a decode unit decodes: the file dataset, its share of a step's rows (in DataLoader workers),
and the GPU decode of a share's files (``decode_device: cuda``). ``stream.py`` runs the loaders around it."""

from __future__ import annotations

import math
import time

import torch
from torch.utils.data import Dataset

from ..errors import DMLError
from .augment import AUGMENTATIONS, AugParams, augment_one
from .cache import STAND_IN
from .folders import FileList
from .images import RRC_TRIES, center_resize, decode_bytes, jpeg_batchable, load_image, read_file, resized_crop
from .memory import normalize
from .plan import BatchPlan, shard_range


class FileImageDataset(Dataset):
    """An image folder read from its files. ``ds[i]``: file i through the evaluation transform,
    normalised; ``ds[(i, seed)]``: augmented with parameters drawn from ``seed`` (the per-sample path)."""

    def __init__(
        self,
        files: FileList,
        image_size: int,
        crop_fraction: float = 1.0,
        augment=(),
        rrc_scale=(0.08, 1.0),
        rrc_ratio=(3 / 4, 4 / 3),
        decode_device: str = "cpu",
    ):
        self.files, self.image_size, self.crop_fraction = files, image_size, crop_fraction
        self.rrc_scale, self.rrc_ratio = tuple(rrc_scale), tuple(rrc_ratio)
        self.classes = list(files.classes)
        self.labels = torch.from_numpy(files.labels)
        self.augment = tuple(AUGMENTATIONS) if augment is True else tuple(augment or ())
        self.decode_device = decode_device  # "cuda": workers read the bytes, the rank decodes them with nvJPEG
        self.bad_images = "stop"  # or "skip" (build_datasets sets the config's)
        self.decoded: list | None = None  # a list: every index load() decodes is appended (the decode count)

    def __len__(self) -> int:
        return len(self.files)

    def load(self, i: int, rrc: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 [3, S, S]: RandomResizedCrop with uniforms ``rrc``, else the evaluation transform."""
        if self.decoded is not None:
            self.decoded.append(i)
        return load_image(self.files.path(i), lambda img: self.transform(img, rrc))

    def transform(self, img: torch.Tensor, rrc: torch.Tensor | None = None) -> torch.Tensor:
        """A decoded image (any device) -> uint8 [3, S, S] on the same device."""
        if rrc is not None:
            return resized_crop(img, rrc, self.image_size, self.rrc_scale, self.rrc_ratio)
        return center_resize(img, self.image_size, self.crop_fraction)

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, None)
        if seed is None or not self.augment:
            return normalize(self.load(index)), int(self.labels[index])
        g = torch.Generator().manual_seed(int(seed))
        p = AugParams.draw(1, g)
        u = torch.rand(RRC_TRIES, 4, generator=g) if "rrc" in self.augment else None
        img = augment_one(self.load(index, u), p[0], self.augment)
        return normalize(img), int(self.labels[index])

    def subset(self, indices, augment=None) -> FileImageDataset:
        ds = FileImageDataset(
            self.files.subset(indices),
            self.image_size,
            self.crop_fraction,
            self.augment if augment is None else augment,
            self.rrc_scale,
            self.rrc_ratio,
            self.decode_device,
        )
        ds.bad_images = self.bad_images
        return ds


def stand_in(size: int, device="cpu") -> torch.Tensor:
    return torch.full((3, size, size), STAND_IN, dtype=torch.uint8, device=device)


def decode_share(
    raws: list,
    rrc: list | None,
    ds: FileImageDataset,
    device: torch.device,
    k: int,
    skipped: list | None = None,
    counts: dict | None = None,
) -> torch.Tensor:
    """``decode_device: cuda``: a share's files -> uint8 [k, 3, S, S] on ``device``. ``raws``: ``(path,
    bytes)`` of the files the batched call can take (``jpeg_batchable``, decided in the worker from each
    header) and ``(path, uint8 [3, S, S])`` of those the worker decoded itself (CMYK, a PNG named .JPEG), so
    one odd file leaves the others on the batched path: one TorchCodec ``decode_jpeg`` call (nvJPEG on
    CUDA), then each sample's transform on the device. Files the batched call still refuses are decoded one
    by one (the CPU, PIL as the last resort). On ``device=cpu`` this is the CPU twin of the CUDA path: the
    tests hold it to the worker path byte for byte. ``skipped`` (bad_images=skip): a file that cannot be
    read becomes the grey stand-in and ``(path, line)`` is appended there, instead of raising.
    ``counts``: ``batched`` (images the batched call decoded) and ``worker`` (decoded in the worker) grow."""
    from torchcodec.decoders import decode_jpeg

    s = ds.image_size
    out = torch.zeros(k, 3, s, s, dtype=torch.uint8, device=device)
    if not raws:
        return out
    batch = [j for j, (_, data) in enumerate(raws) if isinstance(data, bytes) and data]  # empty: file by file
    tensors = {j: torch.frombuffer(bytearray(raws[j][1]), dtype=torch.uint8) for j in batch}
    imgs: dict = {}
    try:
        if batch:
            imgs = dict(zip(batch, decode_jpeg([tensors[j] for j in batch], mode="RGB", device=device)))
    except Exception:  # noqa: BLE001 - a file the batch call refuses: decode file by file below
        imgs = {}
    if counts is not None:
        counts["batched"] = counts.get("batched", 0) + len(imgs)
        counts["worker"] = counts.get("worker", 0) + sum(isinstance(d, torch.Tensor) for _, d in raws)
    for j, (name, data) in enumerate(raws):
        if isinstance(data, torch.Tensor):  # decoded and transformed in the worker
            out[j] = data.to(device, non_blocking=True)
            continue
        img = imgs.get(j)
        try:
            if img is None:
                try:
                    img = decode_jpeg(tensors[j], mode="RGB", device=device)  # KeyError: an empty file
                except Exception:  # noqa: BLE001 - also an empty file: decode_bytes names it
                    img = decode_bytes(data, name).to(device)
            out[j] = load_image(name, lambda im: ds.transform(im, rrc[j] if rrc is not None else None), img)  # noqa: B023 - called at once
        except DMLError as e:
            if skipped is None:
                raise
            skipped.append((name, str(e)))
            out[j] = stand_in(s, device)
    return out


class Shares(Dataset):
    """Item ``step``: this rank's share of the batch, decoded -> ``(uint8 [k, 3, S, S], cpu_seconds, error,
    indices, skipped)``: ``indices``, the dataset indices this call decoded (``FileImageDataset.load``
    counts them; the device path: the files it read); ``skipped``, ``(path, line)`` of the files replaced by
    the stand-in (``bad_images: skip``). Runs in DataLoader workers (or in the rank itself with 0 workers).

    ``rows=(r, R)``: the rows of each training batch that the rank's decode unit needs (part r of R);
    ``part=(g, G)``: this rank's part of those rows. Evaluation (no plan): ``rows`` of each batch's rows
    (part r of R of a batch that may be shorter), split by part."""

    def __init__(
        self,
        ds: FileImageDataset,
        plan: BatchPlan | None,
        batch_size: int,
        part: tuple[int, int],
        rows: tuple[int, int] = (0, 1),
    ):
        self.ds, self.plan, self.batch_size = ds, plan, batch_size
        self.part, self.rows = part, rows
        width = batch_size // rows[1] if plan is not None else -(-batch_size // rows[1])
        self.k = math.ceil(width / part[1])  # each rank's share of its rows at most (the last may be shorter)
        self.epoch = 0
        self.rrc = plan is not None and "rrc" in ds.augment
        self.skip = getattr(ds, "bad_images", "stop") == "skip"

    def unit_rows(self, step: int) -> tuple[int, int]:
        """``[first, end)``: the positions in batch ``step`` that the decode unit needs (training: part r of
        R of equal width; evaluation: part r of R of the batch's rows, the last batch may be shorter)."""
        r, parts = self.rows
        if self.plan is not None:
            width = self.batch_size // parts
            return r * width, (r + 1) * width
        return shard_range(min(self.batch_size, len(self.ds) - step * self.batch_size), self.rows)

    def share_size(self, step: int) -> int:
        """Rows of each rank's share of step ``step`` (the same on every rank of the decode unit: the
        all-gather's shape). Training: ``k``; evaluation: from this batch's rows, so a small set or the last
        batch is split evenly and nothing gathers padding."""
        if self.plan is not None:
            return self.k
        first, end = self.unit_rows(step)
        return math.ceil((end - first) / self.part[1])

    def share(self, step: int) -> range:
        """Positions of this rank's share in the batch."""
        first, end = self.unit_rows(step)
        k = self.share_size(step)
        lo = first + self.part[0] * k
        return range(min(lo, end), min(lo + k, end))

    def __len__(self) -> int:
        return len(self.plan) if self.plan is not None else math.ceil(len(self.ds) / self.batch_size)

    def __getitem__(self, key):
        """``key``: a step of the current ``epoch``, or ``(epoch, step)`` (persistent workers keep their
        own copy of this object, so the epoch travels with the key)."""
        t0 = time.process_time()
        if isinstance(key, tuple):
            self.epoch, step = key
        else:
            step = key
        if self.plan is not None:
            idx = self.plan.indices(self.epoch, step)
            u = self.plan.params(self.epoch, step, RRC_TRIES)[1] if self.rrc else None
        else:
            idx, u = torch.arange(step * self.batch_size, min(len(self.ds), (step + 1) * self.batch_size)), None
        positions = self.share(step)
        indices = [int(idx[p]) for p in positions]
        if self.ds.decode_device != "cpu":  # read; the rank decodes on its GPU (decode_share)
            read = _read_or_empty if self.skip else read_file
            raws, skipped = [], []
            for pos, path in zip(positions, map(self.ds.files.path, indices)):
                try:
                    data = read(path)
                    if data and not jpeg_batchable(data):  # not for the batched call: decoded here
                        box = u[pos] if u is not None else None
                        data = load_image(path, lambda img: self.ds.transform(img, box), decode_bytes(data, path))  # noqa: B023
                except DMLError as e:
                    if not self.skip:
                        return self.share_size(step), time.process_time() - t0, str(e), indices, []
                    skipped.append((path, str(e)))
                    data = stand_in(self.ds.image_size)
                raws.append((path, data))
            rrc = [u[p] for p in positions] if u is not None else None
            return (raws, rrc, self.share_size(step)), time.process_time() - t0, None, indices, skipped
        s = self.ds.image_size
        out = torch.zeros(self.share_size(step), 3, s, s, dtype=torch.uint8)
        skipped, self.ds.decoded = [], []
        for j, (pos, index) in enumerate(zip(positions, indices)):
            try:
                out[j] = self.ds.load(index, u[pos] if u is not None else None)
            except DMLError as e:
                if not self.skip:
                    return len(out), time.process_time() - t0, str(e), self.ds.decoded, skipped
                skipped.append((self.ds.files.path(index), str(e)))
                out[j] = stand_in(s)
        return out, time.process_time() - t0, None, self.ds.decoded, skipped


def _read_or_empty(path: str) -> bytes:
    """bad_images=skip on the device-decode path: an unreadable file's bytes are empty (decoding them
    fails, and decode_share puts the stand-in there)."""
    try:
        return read_file(path)
    except DMLError:
        return b""
