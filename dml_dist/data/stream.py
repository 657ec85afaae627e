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

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader

from .. import distributed as D
from ..errors import DMLError
from .memory import EVAL_BATCH, TrainBatches, normalize
from .plan import BatchPlan, shard_range, shard_rows
from .shares import FileImageDataset, Shares, decode_share


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

    def __init__(self, shares: Shares, device: torch.device, part: tuple[int, int], group, num_workers: int):
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
        super().__init__(Shares(dataset, plan, batch_size, part, rows), device, part, group, num_workers)
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
        super().__init__(Shares(dataset, None, batch_size, part, rows), device, part, group, num_workers)
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
