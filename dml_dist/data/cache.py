"""The memory path's on-disk cache: a split is decoded once, then mapped read-only by every process.

An entry is a folder ``<cache_dir>/<split>_<S>px_<spec>_<key>/`` (``spec``: a hash of the folder, the
split's definition, ``image_size`` and ``crop_fraction``; ``key``: the content key, every file's path, size
and modification time, ``FileList.key``) holding ``images.u8`` (raw uint8 ``[N, 3, S, S]``), ``labels.npy``
and ``index.json``. The index is written last (the commit point) and records the key and hashes of up to 256
evenly spaced 1 MiB blocks of ``images.u8`` (all of it up to 256 MiB). An entry is used only when the key,
the size and every recorded block hash match; a damaged one is rebuilt, never used. A changed folder gets
an entry of its own, so an entry that another job has mapped is never replaced under it.

Several nodes and jobs can share ``cache_dir`` (a network filesystem): one builder per entry under a lock
file with a heartbeat (``BuildLock``; a dead builder's lock is taken over, whatever its host), the others
wait for it. On each node one process (local rank 0) checks and builds; the build decodes with every core
of the node (DataLoader workers writing into the memory-mapped file). The node's other ranks wait in a
collective, then map the finished file copy-on-write: the pages are shared through the page cache, so L
ranks of a node hold one copy, and a second start or an elastic restart reads the cache instead of decoding.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import socket
import time
from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .. import distributed as D
from ..distributed.placement import host_cpus
from ..errors import DMLError
from .cache_upkeep import BuildLock, UseStamp, mark_used, remove_dead_builds, remove_old_entries
from .folders import FileList
from .images import center_resize, load_image

STAND_IN = 128  # bad_images=skip: an unreadable file's image is uniform grey (the stream path's stand-in too)

FORMAT = 1
BLOCK = 1 << 20
MAX_BLOCKS = 256
CHUNK = 64  # images per work item of the build


def default_cache_dir(data_dir: str) -> str:
    """``<data_dir>/.dml-cache`` when ``data_dir`` is writable, else ``$XDG_CACHE_HOME/dml-dist`` (a
    read-only dataset mount). A folder without write bits counts as read-only for root too."""
    if os.access(data_dir, os.W_OK) and os.stat(data_dir).st_mode & 0o222:
        return os.path.join(data_dir, ".dml-cache")
    return os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "dml-dist")


def entry_path(
    cache_dir: str, files: FileList, split: str, spec: str, size: int, crop_fraction: float, key: str
) -> str:
    """The entry's folder: its name holds the content ``key``, so a changed folder gets a new entry and
    an entry another job has mapped is never replaced under it."""
    h = hashlib.blake2b(repr((os.path.abspath(files.root), spec, size, crop_fraction)).encode(), digest_size=6)
    return os.path.join(cache_dir, f"{split}_{size}px_{h.hexdigest()}_{key[:12]}")


def _block_offsets(nbytes: int) -> list[int]:
    blocks = max(1, math.ceil(nbytes / BLOCK))
    if blocks <= MAX_BLOCKS:
        return [k * BLOCK for k in range(blocks)]
    return sorted({(k * (blocks - 1) // (MAX_BLOCKS - 1)) * BLOCK for k in range(MAX_BLOCKS)})


def _block_hashes(path: str, offsets: list[int]) -> list[str]:
    out = []
    with open(path, "rb") as f:
        for off in offsets:
            f.seek(off)
            out.append(hashlib.blake2b(f.read(BLOCK), digest_size=8).hexdigest())
    return out


def check_entry(entry: str, key: str, n: int, size: int) -> str | None:
    """Why ``entry`` cannot be used ("missing", "stale: ...", "damaged: ..."), or None when it can."""
    index_path = os.path.join(entry, "index.json")
    if not os.path.exists(index_path):
        return "missing"
    try:
        with open(index_path) as f:
            index = json.load(f)
        if index.get("format") != FORMAT:
            return f"stale: format {index.get('format')}, this version writes {FORMAT}"
        if index["key"] != key:
            return "stale: files were added, removed or changed since it was built"
        images = os.path.join(entry, "images.u8")
        nbytes = n * 3 * size * size
        if index["n"] != n or os.path.getsize(images) != nbytes:
            return f"damaged: images.u8 has {os.path.getsize(images)} bytes, expected {nbytes}"
        if np.load(os.path.join(entry, "labels.npy")).shape != (n,):
            return "damaged: labels.npy does not hold one label per image"
        if _block_hashes(images, index["offsets"]) != index["hashes"]:
            return "damaged: images.u8 does not match its recorded checksums"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"damaged: {type(e).__name__}: {str(e)[:80]}"
    return None


def open_entry(entry: str, n: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The images as a copy-on-write memory map (page cache shared by every process of the node; a write,
    which the trainer never does, would stay private) and the labels."""
    images = np.memmap(os.path.join(entry, "images.u8"), dtype=np.uint8, mode="c", shape=(n, 3, size, size))
    labels = np.load(os.path.join(entry, "labels.npy"))
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))


class _DecodeInto(Dataset):
    """Work item c: decode images [c * CHUNK, ...) into the memory-mapped output (in a DataLoader worker).
    Returns ``(error, skipped)``: the line of the first unreadable file (``skip=False``), else None and the
    lines of the files replaced by the grey stand-in."""

    def __init__(self, files: FileList, path: str, size: int, crop_fraction: float, skip: bool = False):
        self.files, self.path, self.size, self.crop_fraction, self.skip = files, path, size, crop_fraction, skip
        self.out = None

    def __len__(self) -> int:
        return math.ceil(len(self.files) / CHUNK)

    def __getitem__(self, c: int):
        if self.out is None:  # opened once per worker process
            self.out = np.memmap(self.path, dtype=np.uint8, mode="r+", shape=(len(self.files), 3, self.size, self.size))
        skipped = []
        for i in range(c * CHUNK, min((c + 1) * CHUNK, len(self.files))):
            try:
                self.out[i] = load_image(
                    self.files.path(i), lambda img: center_resize(img, self.size, self.crop_fraction)
                ).numpy()
            except DMLError as e:
                if not self.skip:
                    return str(e), skipped
                skipped.append((self.files.path(i), str(e)))
                self.out[i] = STAND_IN
        return None, skipped


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def build_entry(
    entry: str,
    files: FileList,
    key: str,
    size: int,
    crop_fraction: float,
    log: Callable[[str], None],
    skip: bool = False,
) -> None:
    """Decode ``files`` with every core into a temporary folder, then rename it into place (atomic; a
    concurrent builder on another node that finished first wins, ours is discarded)."""
    n = len(files)
    remove_dead_builds(entry)
    tmp = f"{entry}.tmp-{socket.gethostname()}-{os.getpid()}"
    os.makedirs(tmp)
    try:
        images = os.path.join(tmp, "images.u8")
        with open(images, "wb") as f:  # reserve the space now: a full disk fails here, not in a worker
            os.posix_fallocate(f.fileno(), 0, n * 3 * size * size)
        workers = host_cpus()
        loader = DataLoader(
            _DecodeInto(files, images, size, crop_fraction, skip),
            batch_size=None,
            num_workers=workers if workers > 1 else 0,
        )
        t0 = last = time.time()
        skipped = []
        for c, (error, bad) in enumerate(loader):
            if error:
                raise DMLError(error)
            for _, line in bad:
                log(f"cache: bad_images=skip, a grey stand-in for: {line}")
            skipped += bad
            if time.time() - last > 30:
                last = time.time()
                done = min((c + 1) * CHUNK, n)
                log(f"cache: decoded {done}/{n} images ({done / (last - t0):.0f}/s, {workers} processes)")
        np.save(os.path.join(tmp, "labels.npy"), files.labels.astype(np.int64))
        offsets = _block_offsets(n * 3 * size * size)
        index = {
            "format": FORMAT,
            "key": key,
            "n": n,
            "image_size": size,
            "crop_fraction": crop_fraction,
            "root": os.path.abspath(files.root),
            "classes": files.classes,
            "offsets": offsets,
            "hashes": _block_hashes(images, offsets),
            "built_by": f"{socket.gethostname()}:{os.getpid()}",
            "skipped": skipped,
            "seconds": round(time.time() - t0, 3),
        }
        _fsync(images)  # the data is on disk before the index that commits it (and visible to other nodes)
        with open(os.path.join(tmp, "index.json"), "w") as f:
            json.dump(index, f)
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(entry):
            if check_entry(entry, key, n, size) is None:  # a builder that raced past the lock finished first
                log(f"cache: {entry} was built by another process meanwhile; using it")
                return
            aside = f"{entry}.old-{socket.gethostname()}-{os.getpid()}"  # a damaged entry
            os.rename(entry, aside)
            shutil.rmtree(aside, ignore_errors=True)
        try:
            os.rename(tmp, entry)
        except OSError:
            if check_entry(entry, key, n, size) is not None:  # not a concurrent builder's good entry
                raise
        log(f"cache: decoded {n} images into {entry} in {time.time() - t0:.1f}s ({workers} processes)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cached_images(
    files: FileList,
    cache_dir: str,
    split: str,
    spec: str,
    size: int,
    crop_fraction: float,
    log: Callable[[str], None] = lambda s: None,
    bad_images: str = "stop",
    skipped: list | None = None,
    keep_days: float = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Collective: the decoded split, built once per node by local rank 0 (the other local ranks wait),
    then mapped by every rank. An unreadable file stops every rank with the builder's line; with
    ``bad_images: skip`` (an entry of its own: its images hold stand-ins) each node's local rank 0 appends
    the entry's replaced files, ``(path, line)``, to ``skipped``, built now or earlier. Local rank 0 stamps
    the entry as used and removes the entries it supersedes that are unused for ``keep_days``."""
    if bad_images == "skip":
        spec += " bad_images=skip"
    error, entry = None, None
    if D.local_rank() == 0:
        try:
            key = files.key(size, crop_fraction)  # stats every file of the split: the builder alone
            entry = entry_path(cache_dir, files, split, spec, size, crop_fraction, key)
            os.makedirs(cache_dir, exist_ok=True)
            if os.path.isdir(entry):
                mark_used(entry)  # first: a node cleaning up meanwhile sees it fresh
            why = check_entry(entry, key, len(files), size)
            if why is None:
                log(f"cache: {split} read from {entry}")
            else:
                if why != "missing":
                    log(f"cache: {entry} is {why}; rebuilding it")
                lock = BuildLock(entry, lambda: check_entry(entry, key, len(files), size) is None, log)
                if not lock.acquire():
                    log(f"cache: {entry} was built by another process meanwhile; using it")
                else:
                    try:
                        if check_entry(entry, key, len(files), size) is None:
                            log(f"cache: {entry} was built by another process meanwhile; using it")
                        else:
                            build_entry(entry, files, key, size, crop_fraction, log, bad_images == "skip")
                    finally:
                        lock.release()
            UseStamp.keep(entry)
            remove_old_entries(entry, keep_days, log)
        except DMLError as e:
            error = str(e)
        except OSError as e:  # read-only, disk full, quota
            error = (
                f"cannot write the decoded-image cache in {cache_dir} ({e.strerror or e}); set cache_dir to "
                f"a writable folder with room for {len(files) * 3 * size * size / 1e9:.1f} GB, or use loader=stream"
            )
        except RuntimeError as e:  # a decoding worker was killed (out of memory, bus error)
            error = (
                f"building the decoded-image cache in {cache_dir} failed ({str(e).splitlines()[0][:120]}); "
                f"free memory or disk, or use loader=stream"
            )
    # Sync point: the node's other ranks wait here for the build (a group without the 10-minute timeout).
    if error is None and entry is not None and skipped is not None:
        try:
            with open(os.path.join(entry, "index.json")) as f:
                skipped += [tuple(item) for item in json.load(f).get("skipped", [])]
        except (OSError, ValueError) as e:
            error = f"cannot read {entry}/index.json ({e}); delete the entry"
    answers = D.all_gather_objects((error, entry), group=D.long_group())
    failed = [e for e, _ in answers if e]
    if failed:
        raise DMLError(failed[0])
    return open_entry(answers[D.rank() - D.local_rank()][1], len(files), size)  # the node's builder's entry
