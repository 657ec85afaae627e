"""The stream path: each batch is read and decoded from the files, each sample once per job.

Step ``s`` of epoch ``e``, on every rank:

1. ``BatchPlan`` says which files and which per-sample parameters the batch holds (the shared-seed
   permutation, ``step_generator(seed, e, s)``): the same on every rank without talking.
2. The ranks of a node that train on the same rows of the batch form a decode unit
   (``distributed.decode_group``: with replicas, the node's ranks of one replica index; one replica per
   peer: the whole node). Member ``g`` of G decodes its part of those rows in DataLoader workers that run a
   few steps ahead: TorchCodec decode (PIL where it refuses a file), then RandomResizedCrop (``rrc``: crop
   first, then resize to S) or the evaluation transform -> uint8.
3. One all-gather within the unit assembles its rows, uint8 ``[rows, 3, S, S]`` (on the GPU over NCCL).
   With replica-major ranks (``rank_order``) no two nodes need the same rows, so the job decodes each
   sample once, whatever the number of peers or nodes.
4. Flip and the other augmentations run on the rows on the device (``augment_batch``), as on the memory
   path. Without ``rrc`` the two paths give the same batches, byte for byte.

What a batch holds is a function of (seed, epoch, step) alone: not of the layout, the worker count or a
restart. A rank holds at most ``workers x 2`` prefetched shares, whatever the size of the folder.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from .. import distributed as D
from ..errors import DMLError
from .augment import AUGMENTATIONS, AugParams, augment_one
from .cache import STAND_IN
from .folders import (
    RRC_TRIES,
    FileList,
    center_resize,
    decode_bytes,
    jpeg_batchable,
    load_image,
    read_file,
    resized_crop,
)
from .memory import EVAL_BATCH, TrainBatches, normalize
from .plan import BatchPlan, shard_range, shard_rows


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


class _Shares(Dataset):
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


class _Keys(torch.utils.data.Sampler):
    """The persistent DataLoader's sampler: the ``(epoch, step)`` keys of the next pass, set before each."""

    def __init__(self):
        self.keys: list = []

    def __iter__(self):
        return iter(list(self.keys))

    def __len__(self) -> int:
        return len(self.keys)


class _CooperativeLoader:
    """Shared machinery: iterate steps, decode this rank's share ahead in workers, assemble each batch's
    rows with one all-gather in the decode group (``part=(g, G)``; G = 1: no collective). The gather of
    step s + 1 is started before step s is handed out, so it travels while step s trains.

    A file that cannot be read (``bad_images: stop``) does not cost a world-wide check per step: the rank
    keeps the first line (``error``) and zeros in place of its share, and the job stops at the next check
    (``raise_pending``, or the trainer's meter gather at ``print_freq``, before a checkpoint and at the end
    of the epoch), with the line, on every rank. Alone (world of one) it raises at once."""

    def __init__(self, shares: _Shares, device: torch.device, part: tuple[int, int], group, num_workers: int):
        self.shares, self.device, self.group, self.num_workers = shares, torch.device(device), group, num_workers
        self.part = part
        self.decoded, self.decode_cpu_s = 0, 0.0  # images this rank decoded, CPU seconds spent on it
        self.record_decodes = False  # the probe sets it: keep every decoded dataset index (tests count them)
        self.decoded_indices: list[int] = []
        self.skipped: list = []  # bad_images=skip: (path, line) of the files replaced since the last read
        self.error: str | None = None  # bad_images=stop: the first unreadable file's line, not yet raised
        self._loader, self._keys = None, None  # the persistent DataLoader (num_workers > 0) and its sampler
        self.pinned_copies = 0  # shares copied to the GPU from pinned memory (gpu_check asserts them)
        self.device_decodes: dict = {}  # decode_device=cuda: images the batched call / the workers decoded
        self._stream = None  # decode_device=cuda: the stream nvJPEG decodes on (not the training stream)

    def _items(self, steps: range) -> Iterator:
        """The decoded shares of ``steps`` of the current epoch, in order. Workers persist across epochs and
        evaluations (one DataLoader whose sampler is refilled); on CUDA they hand over pinned memory."""
        keys = [(self.shares.epoch, s) for s in steps]
        if self.num_workers == 0:
            return (self._pin(self.shares[key]) for key in keys)
        if self._loader is None:
            self._keys = _Keys()
            self._loader = DataLoader(
                self.shares,
                batch_size=None,
                sampler=self._keys,
                num_workers=self.num_workers,
                prefetch_factor=2,
                persistent_workers=True,
                pin_memory=self.device.type == "cuda",
            )
        self._keys.keys = keys
        return iter(self._loader)

    def _pin(self, item):
        if self.device.type == "cuda" and isinstance(item[0], torch.Tensor):
            return (item[0].pin_memory(), *item[1:])
        return item

    def _start(self, item):
        """Start assembling one step's rows: a function that waits for them (uint8, on the device) and
        then counts the step's decoding (so a step never handed out is not counted). ``decode_device: cuda``:
        the decode and the gather run on the loader's own stream, a step ahead; the training stream waits
        for them only when the step is handed out."""
        share, cpu_s, error, indices, skipped = item
        stream, counts = None, {}
        if error is None and not isinstance(share, torch.Tensor):  # decode_device: cuda
            raws, rrc, k = share
            if self.device.type == "cuda":
                if self._stream is None:
                    self._stream = torch.cuda.Stream(self.device)
                stream = self._stream
            try:
                # TorchCodec synchronises the current stream around its decode: then this one, not the
                # training stream with a step in flight
                with torch.cuda.stream(stream):
                    share = decode_share(
                        raws, rrc, self.shares.ds, self.device, k, skipped if self.shares.skip else None, counts
                    )
            except DMLError as e:
                error, share = str(e), k
        if error is not None:  # ``share``: the share's row count
            if D.group_size() == 1:
                raise DMLError(error)
            s = self.shares.ds.image_size
            share = torch.zeros(share, 3, s, s, dtype=torch.uint8)
        pinned = share.device.type == "cpu" and self.device.type == "cuda" and share.is_pinned()
        ready = None
        with torch.cuda.stream(stream):  # NCCL orders the gather after the decode on this stream
            share = share.to(self.device, non_blocking=True)  # from pinned memory on CUDA: no host wait
            wait = D.all_gather_start(share, self.group) if self.part[1] > 1 else None  # in flight from here
            if stream is not None:
                ready = torch.cuda.Event()
                ready.record(stream)

        def finish() -> torch.Tensor:
            self.error = self.error or error
            self.decoded += len(indices)
            if self.record_decodes:
                self.decoded_indices += indices
            self.skipped += skipped
            self.decode_cpu_s += cpu_s
            self.pinned_copies += int(pinned)
            for key, n in counts.items():
                self.device_decodes[key] = self.device_decodes.get(key, 0) + n
            rows = share if wait is None else wait().flatten(0, 1)
            if ready is not None:  # the training stream takes the rows once decoded and gathered
                current = torch.cuda.current_stream(self.device)
                current.wait_event(ready)
                rows.record_stream(current)
            return rows

        return finish

    def _assembled(self, steps: range) -> Iterator[tuple[int, torch.Tensor]]:
        """``(step, the unit's rows)`` for ``steps``; step s + 1's gather is under way while s is used."""
        pending = None
        for step, item in zip(steps, self._items(steps)):
            started = (step, self._start(item))
            if pending is not None:
                yield pending[0], pending[1]()
            pending = started
        if pending is not None:
            yield pending[0], pending[1]()

    def raise_pending(self) -> None:
        """Collective over the world: stop every rank with the first line if any rank met an unreadable
        file since the last check."""
        flags = D.all_gather(torch.tensor([self.error is not None]))
        if bool(flags.any()):
            first = next(e for e in D.all_gather_objects(self.error) if e)
            self.error = None
            raise DMLError(first)


class StreamTrainLoader(_CooperativeLoader, TrainBatches):
    """Training batches decoded from the files (see ``TrainBatches``). ``rows``: the rows of each batch that
    this rank's decode unit decodes (the whole batch, or this rank's ``shard``); ``part=(g, G)``: this rank's
    part of them; ``group``: the unit's process group (``distributed.decode_group``)."""

    def __init__(
        self,
        dataset: FileImageDataset,
        batch_size: int,
        seed: int,
        device,
        part=(0, 1),
        group=None,
        num_workers: int = 0,
        shard: tuple[int, int] = (0, 1),
        rows: tuple[int, int] = (0, 1),
    ):
        plan = BatchPlan(len(dataset), batch_size, seed)
        if rows != (0, 1) and rows != shard:
            raise ValueError(f"a decode unit's rows {rows} must be the whole batch or this rank's shard {shard}")
        self.rows = rows
        super().__init__(_Shares(dataset, plan, batch_size, part, rows), device, part, group, num_workers)
        self.batch_size = batch_size
        ops = [o for o in dataset.augment if o != "rrc"]  # rrc is applied while decoding
        self._setup(plan, ops, dataset.labels, device, shard)

    def __iter__(self):
        self.shares.epoch = self.epoch
        for step, x in self._assembled(range(self.start_step, len(self))):
            x = x[: self.batch_size // self.rows[1]]
            x = x if self.rows == self.shard else shard_rows(x, self.shard)
            yield self.finish(self.epoch, step, lambda idx: x)  # noqa: B023 - called at once


class StreamEvalLoader(_CooperativeLoader):
    """Evaluation batches in dataset order, decoded cooperatively (evaluation transform). Every batch is
    split between the replicas by rows: ``shard=(r, R)`` keeps part r of R of each batch's rows, so every
    replica works on every batch. The decode unit (``part=(g, G)`` in ``group``) decodes ``rows`` of each
    batch: the rank's own part (uniform layouts) or the whole batch. ``positions``: the set's indices this
    rank scores, in order (``engine.evaluate`` reassembles the set from them)."""

    def __init__(
        self,
        dataset: FileImageDataset,
        device,
        part=(0, 1),
        group=None,
        num_workers: int = 0,
        batch_size: int = EVAL_BATCH,
        shard: tuple[int, int] = (0, 1),
        rows: tuple[int, int] = (0, 1),
    ):
        if rows != (0, 1) and rows != shard:
            raise ValueError(f"a decode unit's rows {rows} must be the whole batch or this rank's shard {shard}")
        super().__init__(_Shares(dataset, None, batch_size, part, rows), device, part, group, num_workers)
        self.batch_size, self.labels, self.shard, self.rows = batch_size, dataset.labels, shard, rows
        n = len(dataset)
        self.slices = [shard_range(min(batch_size, n - s * batch_size), shard) for s in range(len(self.shares))]
        self.positions = torch.cat(
            [torch.arange(s * batch_size + lo, s * batch_size + hi) for s, (lo, hi) in enumerate(self.slices)]
            or [torch.zeros(0, dtype=torch.long)]
        )

    def __len__(self) -> int:
        return len(self.shares)

    def __iter__(self):
        for step, x in self._assembled(range(len(self.shares))):
            lo, hi = self.slices[step]
            x = x[: hi - lo] if self.rows == self.shard else x[lo:hi]
            if hi > lo:
                first = step * self.batch_size
                yield normalize(x), self.labels[first + lo : first + hi].to(self.device)
        self.raise_pending()
