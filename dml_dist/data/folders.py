"""Image folders: the file list, scanned once per job (decoding a file: ``images.py``).

A folder is ``root/<class>/<image files>``, classes and files sorted. ``FileList`` holds what defines a
split: relative paths (one buffer with offsets) and labels; sizes and times only where the memory path's
cache key needs them. One rank lists it, with no ``stat`` per file and the class folders in parallel, keeps
a manifest in ``cache_dir`` that a restart reads instead (while the folders' times are unchanged), and
broadcasts it (``scan_shared``), so a million-file folder is listed once per job, not once per rank.

"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from .. import distributed as D
from ..errors import DMLError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass
class FileList:
    """One split of an image folder, in sorted (class, file) order. The relative paths are one UTF-8 buffer
    with offsets (no Python object per file, so forked DataLoader workers do not copy it page by page, and a
    long path costs its own bytes only). Sizes and modification times, which only the memory path's cache
    key needs, are read on first use (``stat``)."""

    root: str
    classes: list
    blob: np.ndarray  # uint8: the relative paths back to back
    offsets: np.ndarray  # int64 [n + 1]: path i is blob[offsets[i]:offsets[i + 1]]
    labels: np.ndarray  # int64
    sizes: np.ndarray | None = None  # int64 bytes (stat)
    mtimes: np.ndarray | None = None  # int64 ns (stat)

    def __len__(self) -> int:
        return len(self.labels)

    def relpath(self, i: int) -> str:
        return self.blob[self.offsets[i] : self.offsets[i + 1]].tobytes().decode()

    def path(self, i: int) -> str:
        return os.path.join(self.root, self.relpath(i))

    def stat(self) -> None:
        """Fill ``sizes`` and ``mtimes`` (one ``stat`` per file, a thread pool: network filesystems)."""
        if self.sizes is not None:
            return
        with ThreadPoolExecutor(LIST_THREADS) as pool:
            stats = list(pool.map(os.stat, (self.path(i) for i in range(len(self))), chunksize=256))
        self.sizes = np.array([st.st_size for st in stats], dtype=np.int64)
        self.mtimes = np.array([st.st_mtime_ns for st in stats], dtype=np.int64)

    def key(self, *extra) -> str:
        """Hash of everything that defines the decoded set: the files, their sizes and times, ``extra``."""
        self.stat()
        h = hashlib.blake2b(digest_size=16)
        h.update(repr((os.path.abspath(self.root), self.classes, extra)).encode())
        h.update(self.blob.tobytes())
        for a in (self.offsets, self.labels, self.sizes, self.mtimes):
            h.update(np.ascontiguousarray(a, dtype=np.int64).tobytes())
        return h.hexdigest()

    def path_hashes(self) -> np.ndarray:
        """int64 per file: a hash of its class and relative path (what a resume compares, see
        ``files_changed``); sorted."""
        out = np.empty(len(self), dtype=np.int64)
        for i in range(len(self)):
            digest = hashlib.blake2b(self.blob[self.offsets[i] : self.offsets[i + 1]].tobytes(), digest_size=8).digest()
            out[i] = int.from_bytes(digest, "little", signed=True)
        return np.sort(out)

    def subset(self, indices) -> FileList:
        idx = np.asarray(indices, dtype=np.int64)
        starts, lengths = self.offsets[idx], self.offsets[idx + 1] - self.offsets[idx]
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        gather = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1], dtype=np.int64)
        pick = lambda a: a[idx] if a is not None else None
        return FileList(
            self.root, self.classes, self.blob[gather], offsets, self.labels[idx], pick(self.sizes), pick(self.mtimes)
        )


def files_changed(before: np.ndarray, after: np.ndarray) -> tuple[int, int]:
    """``(added, removed)`` between two sorted ``path_hashes``."""
    common = np.intersect1d(before, after, assume_unique=True).size
    return after.size - common, before.size - common


LIST_THREADS = 16  # class folders listed at once (a network filesystem answers many requests in parallel)
TIME_SLACK_NS = 2_000_000_000  # a folder time this close to the listing may hide a change (coarse clocks)
MANIFEST = 1  # the manifest format


def _list_class(folder: str) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.name.lower().endswith(IMG_EXTENSIONS))


def _folder_times(root: str, classes: list) -> list[int]:
    """Modification times of ``root`` and of every class folder: they change when an entry is added,
    removed or renamed, so the manifest is reused while they stay."""
    with ThreadPoolExecutor(LIST_THREADS) as pool:
        return [os.stat(root).st_mtime_ns, *pool.map(lambda c: os.stat(os.path.join(root, c)).st_mtime_ns, classes)]


def manifest_path(cache_dir: str, root: str) -> str:
    h = hashlib.blake2b(os.path.abspath(root).encode(), digest_size=8).hexdigest()
    return os.path.join(cache_dir, f"files_{os.path.basename(os.path.normpath(root))}_{h}.npz")


def _read_manifest(path: str, root: str, classes: list, times: list) -> FileList | None:
    try:
        with np.load(path) as m:
            meta = json.loads(bytes(m["meta"]).decode())
            written = meta.pop("written_ns", 0)
            if meta != {"format": MANIFEST, "root": os.path.abspath(root), "classes": classes, "times": times}:
                return None
            if max(times) > written - TIME_SLACK_NS:  # a folder changed within a clock tick of the listing
                return None
            return FileList(root, classes, m["blob"], m["offsets"], m["labels"])
    except (OSError, ValueError, KeyError):  # missing, damaged, another format: list again
        return None


def _write_manifest(path: str, files: FileList, times: list, written_ns: int) -> None:
    """Atomically (temp file, then rename): several nodes may list the same folder at once."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    meta = json.dumps(
        {
            "format": MANIFEST,
            "root": os.path.abspath(files.root),
            "classes": files.classes,
            "times": times,
            "written_ns": written_ns,
        }
    ).encode()
    tmp = f"{path}.tmp-{socket.gethostname()}-{os.getpid()}.npz"
    np.savez(tmp, meta=np.frombuffer(meta, dtype=np.uint8), blob=files.blob, offsets=files.offsets, labels=files.labels)
    os.replace(tmp, path)


def scan(root: str, cache_dir: str | None = None, log: Callable[[str], None] = lambda s: None) -> FileList:
    """List ``root/<class>/*``: class folders listed by a thread pool, no ``stat`` per file. With
    ``cache_dir``, the list is kept there as a manifest and reused while the folders' times are unchanged
    (a restart does not list again)."""
    if not os.path.isdir(root):
        raise DMLError(f"data folder {root} does not exist; set data_dir to a folder with train/<class>/ images")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DMLError(f"data folder {root} has no class sub-folders; expected {root}/<class>/<image files>")
    times = _folder_times(root, classes) if cache_dir else None
    listed_ns = time.time_ns()  # before listing: a file added during the listing makes its folder newer
    if cache_dir:
        found = _read_manifest(manifest_path(cache_dir, root), root, classes, times)
        if found is not None:
            log(f"files: {len(found)} in {root} from the manifest {manifest_path(cache_dir, root)}")
            return found
    with ThreadPoolExecutor(LIST_THREADS) as pool:
        names = list(pool.map(_list_class, (os.path.join(root, c) for c in classes)))
    for c, listed in zip(classes, names):
        if not listed:
            raise DMLError(
                f"class folder {os.path.join(root, c)} holds no images ({'/'.join(IMG_EXTENSIONS)}); "
                f"add images or remove the folder"
            )
    encoded = [f"{c}/{n}".encode() for c, listed in zip(classes, names) for n in listed]
    lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
    files = FileList(
        root,
        classes,
        np.frombuffer(b"".join(encoded), dtype=np.uint8).copy(),
        np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        np.repeat(np.arange(len(classes), dtype=np.int64), [len(n) for n in names]),
    )
    if cache_dir:
        try:
            _write_manifest(manifest_path(cache_dir, root), files, times, listed_ns)
            log(f"files: listed {len(files)} in {root}; manifest {manifest_path(cache_dir, root)}")
        except OSError as e:  # a read-only cache_dir: list again next time
            log(f"files: listed {len(files)} in {root}; no manifest ({e.strerror or e})")
    return files


def scan_shared(
    root: str, cache_dir: str | None = None, log: Callable[[str], None] = lambda s: None
) -> FileList | None:
    """Collective: rank 0 scans (or reads the manifest), every rank gets its list (None when ``root`` does
    not exist). A scan error stops every rank with rank 0's line. The others wait without the collective
    timeout (a cold network filesystem can take minutes to list a million files)."""
    result = None
    if not D.is_active() or D.rank() == 0:
        try:
            result = scan(root, cache_dir, log) if os.path.isdir(root) else None
        except DMLError as e:
            result = e
    result = D.broadcast_object(result, group=D.long_group())  # sync point
    if isinstance(result, DMLError):
        raise DMLError(str(result))
    return result
