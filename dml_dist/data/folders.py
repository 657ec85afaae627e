"""Image folders: the file list (scanned once) and the decoder (TorchCodec, PIL where it refuses a file).

A folder is ``root/<class>/<image files>``, classes and files sorted. ``FileList`` holds what defines a
split: relative paths, labels, and each file's size and modification time (the cache key). One rank scans
it and broadcasts it (``scan_shared``), so a million-file folder is listed once per job, not once per rank.

Two deterministic transforms turn a decoded image into ``S x S`` uint8:

- ``center_resize`` (evaluation, and what the memory path caches): shorter side to ``floor(S / crop_fraction)``,
  centre crop S. ``crop_fraction=1`` on square files is a plain resize, the CIFAR behaviour.
- ``resized_crop`` (training on the stream path): the crop box drawn by ``rrc_boxes`` from per-sample
  uniforms (torchvision's RandomResizedCrop rule), crop first, then resize to S.
"""
from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

from .. import distributed as D
from ..errors import DMLError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
RRC_TRIES = 10  # torchvision's RandomResizedCrop: 10 tries, then a centre crop


@dataclass
class FileList:
    """One split of an image folder, in sorted (class, file) order."""
    root: str
    classes: list
    paths: np.ndarray      # relative to root, UTF-8, fixed-width bytes: one buffer, no Python object per
                           # file, so forked DataLoader workers do not copy it page by page (refcounts)
    labels: np.ndarray     # int64
    sizes: np.ndarray      # int64 bytes
    mtimes: np.ndarray     # int64 ns

    def __len__(self) -> int:
        return len(self.paths)

    def path(self, i: int) -> str:
        return os.path.join(self.root, self.paths[i].decode())

    def key(self, *extra) -> str:
        """Hash of everything that defines the decoded set: the files, their sizes and times, ``extra``."""
        h = hashlib.blake2b(digest_size=16)
        h.update(repr((os.path.abspath(self.root), self.classes, extra)).encode())
        h.update(self.paths.tobytes())
        for a in (self.labels, self.sizes, self.mtimes):
            h.update(np.ascontiguousarray(a, dtype=np.int64).tobytes())
        return h.hexdigest()

    def subset(self, indices) -> "FileList":
        idx = np.asarray(indices, dtype=np.int64)
        return FileList(self.root, self.classes, self.paths[idx], self.labels[idx], self.sizes[idx], self.mtimes[idx])


def scan(root: str) -> FileList:
    """List ``root/<class>/*`` with one ``stat`` per file (``os.scandir`` gives it for free on most systems)."""
    if not os.path.isdir(root):
        raise DMLError(f"data folder {root} does not exist; set data_dir to a folder with train/<class>/ images")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DMLError(f"data folder {root} has no class sub-folders; expected {root}/<class>/<image files>")
    paths, labels, sizes, mtimes = [], [], [], []
    for idx, c in enumerate(classes):
        folder = os.path.join(root, c)
        entries = sorted((e for e in os.scandir(folder) if e.name.lower().endswith(IMG_EXTENSIONS)),
                         key=lambda e: e.name)
        if not entries:
            raise DMLError(f"class folder {folder} holds no images ({'/'.join(IMG_EXTENSIONS)}); "
                           f"add images or remove the folder")
        for e in entries:
            st = e.stat()
            paths.append(f"{c}/{e.name}")
            labels.append(idx)
            sizes.append(st.st_size)
            mtimes.append(st.st_mtime_ns)
    as64 = lambda v: np.asarray(v, dtype=np.int64)  # noqa: E731
    return FileList(root, classes, np.array([p.encode() for p in paths], dtype=bytes), as64(labels), as64(sizes),
                    as64(mtimes))


def scan_shared(root: str) -> Optional[FileList]:
    """Collective: rank 0 scans, every rank gets its list (None when ``root`` does not exist). A scan error
    stops every rank with rank 0's line. The others wait without the collective timeout (a cold network
    filesystem can take minutes to list a million files)."""
    result = None
    if not D.is_active() or D.rank() == 0:
        try:
            result = scan(root) if os.path.isdir(root) else None
        except DMLError as e:
            result = e
    result = D.broadcast_object(result, group=D.long_group())  # sync point
    if isinstance(result, DMLError):
        raise DMLError(str(result))
    return result


# --------------------------------------------------------------------------------------------- decoding
_TORCHCODEC = None


def _torchcodec_decode():
    """``torchcodec.decoders.decode_image``, or None where TorchCodec is missing or cannot load its
    libraries (then PIL decodes every file)."""
    global _TORCHCODEC
    if _TORCHCODEC is None:
        try:
            from torchcodec.decoders import decode_image
            _TORCHCODEC = decode_image
        except Exception:  # ImportError, or a torch/torchcodec pairing whose native library fails to load
            _TORCHCODEC = False
    return _TORCHCODEC or None


def _pil_decode(data: bytes) -> torch.Tensor:
    import io
    from PIL import Image
    with Image.open(io.BytesIO(data)) as im:
        im.load()  # raises on a truncated file (PIL would otherwise pad it silently on convert)
        return TF.pil_to_tensor(im.convert("RGB"))


def decode_bytes(data: bytes, name: str = "<bytes>") -> torch.Tensor:
    """Encoded image -> uint8 RGB [3, H, W]. TorchCodec detects the format from the bytes (a PNG saved
    as .JPEG decodes), converts CMYK and greyscale JPEGs to RGB; PIL takes the files TorchCodec refuses.
    A file neither can read raises a DMLError naming it."""
    decode = _torchcodec_decode()
    if decode is not None:
        try:
            img = decode(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode="RGB")
            return img[0] if img.ndim == 4 else img  # an animated GIF/WebP: its first frame
        except Exception:  # noqa: BLE001 - any refusal: try PIL, which reads formats TorchCodec lacks
            pass
    try:
        return _pil_decode(data)
    except Exception as e:  # noqa: BLE001 - OSError, UnidentifiedImageError, ValueError, ...
        raise DMLError(f"cannot read image {name} ({type(e).__name__}: {str(e).strip()[:80]}); "
                       f"delete or replace the file") from None


def read_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise DMLError(f"cannot read image {path} ({e.strerror}); check the file and its permissions") from None


def decode_file(path: str) -> torch.Tensor:
    return decode_bytes(read_file(path), path)


def load_image(path: str, transform: Callable[[torch.Tensor], torch.Tensor],
               img: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``transform(decode_file(path))``, or of ``img`` when it is already decoded: the one rule for every
    path (cache build, stream workers, GPU decoding) that a file that cannot be read or transformed is a
    DMLError naming it."""
    if img is None:
        img = decode_file(path)
    try:
        return transform(img)
    except Exception as e:  # noqa: BLE001 - a decoded image the transform cannot take
        raise DMLError(f"cannot use image {path} ({type(e).__name__}: {str(e)[:80]}); delete or replace it") from None


# ------------------------------------------------------------------------------------------- transforms
def _resize(img: torch.Tensor, h: int, w: int) -> torch.Tensor:
    if img.shape[-2:] == (h, w):
        return img
    return TF.resize(img, [h, w], antialias=True)


def center_resize(img: torch.Tensor, size: int, crop_fraction: float = 1.0) -> torch.Tensor:
    """uint8 [3, H, W] -> [3, size, size]: torchvision's ``Resize(floor(size / crop_fraction))`` (shorter
    side to that, the longer one truncated in proportion) then ``CenterCrop(size)``, with its rounding."""
    _, h, w = img.shape
    short = int(math.floor(size / crop_fraction))
    nh, nw = (int(short * h / w), short) if w <= h else (short, int(short * w / h))
    img = _resize(img, nh, nw)
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    return img[:, top:top + size, left:left + size]


def rrc_boxes(u: torch.Tensor, height: int, width: int, scale: Sequence[float], ratio: Sequence[float]):
    """torchvision's RandomResizedCrop box rule, driven by uniforms ``u`` [RRC_TRIES, 4] (one sample):
    returns ``(top, left, h, w)``. The same uniforms give the same box on every rank and restart."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for a, b, c, d in u.tolist():
        target = area * (scale[0] + a * (scale[1] - scale[0]))
        aspect = math.exp(log_lo + b * (log_hi - log_lo))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return min(int(c * (height - h + 1)), height - h), min(int(d * (width - w + 1)), width - w), h, w
    in_ratio = width / height  # fallback: the whole image, clamped to the ratio range, centred
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resized_crop(img: torch.Tensor, u: torch.Tensor, size: int, scale, ratio) -> torch.Tensor:
    """RandomResizedCrop of one uint8 image with the box from ``rrc_boxes``: crop, then resize to S."""
    top, left, h, w = rrc_boxes(u, img.shape[-2], img.shape[-1], scale, ratio)
    return _resize(img[:, top:top + h, left:left + w], size, size)
