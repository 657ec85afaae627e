"""Decoding one image file (TorchCodec, PIL where it refuses a file) and the deterministic transforms to S x S uint8.

- ``center_resize`` (evaluation, and what the memory path caches): shorter side to ``floor(S / crop_fraction)``,
  centre crop S. ``crop_fraction=1`` on square files is a plain resize, the CIFAR behaviour.
- ``resized_crop`` (training on the stream path): the crop box drawn by ``rrc_boxes`` from per-sample
  uniforms (torchvision's RandomResizedCrop rule), crop first, then resize to S.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from ..errors import DMLError

RRC_TRIES = 10  # torchvision's RandomResizedCrop: 10 tries, then a centre crop


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
        return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).contiguous()


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
        raise DMLError(
            f"cannot read image {name} ({type(e).__name__}: {str(e).strip()[:80]}); "
            f"delete or replace the file, or set bad_images=skip"
        ) from None


_NVJPEG_FRAMES = (0xC0, 0xC1, 0xC2)  # baseline, extended and progressive Huffman frames


def jpeg_batchable(data: bytes) -> bool:
    """Whether a file can join the batched GPU decode (``decode_device: cuda``), read from its header
    alone: a JPEG whose frame is 8-bit baseline, extended or progressive Huffman with 1 (grey) or 3 (YCbCr)
    components. CMYK, 12-bit, arithmetic or lossless JPEGs and other formats under a .JPEG name are not."""
    if data[:2] != b"\xff\xd8":
        return False
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return False
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # the frame header
            return marker in _NVJPEG_FRAMES and i + 9 < n and data[i + 4] == 8 and data[i + 9] in (1, 3)
        if marker == 0xDA:  # a scan before any frame header
            return False
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return False


def read_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise DMLError(
            f"cannot read image {path} ({e.strerror}); check the file and its permissions, or set bad_images=skip"
        ) from None


def decode_file(path: str) -> torch.Tensor:
    return decode_bytes(read_file(path), path)


def load_image(
    path: str, transform: Callable[[torch.Tensor], torch.Tensor], img: torch.Tensor | None = None
) -> torch.Tensor:
    """``transform(decode_file(path))``, or of ``img`` when it is already decoded: the one rule for every
    path (cache build, stream workers, GPU decoding) that a file that cannot be read or transformed is a
    DMLError naming it."""
    if img is None:
        img = decode_file(path)
    try:
        return transform(img)
    except Exception as e:  # noqa: BLE001 - a decoded image the transform cannot take
        raise DMLError(
            f"cannot use image {path} ({type(e).__name__}: {str(e)[:80]}); delete or replace it, or set bad_images=skip"
        ) from None


# ------------------------------------------------------------------------------------------- transforms
def _resize(img: torch.Tensor, h: int, w: int) -> torch.Tensor:
    if img.shape[-2:] == (h, w):
        return img
    from torchvision.transforms.v2 import functional as TF  # here: importing torchvision takes seconds

    return TF.resize(img, [h, w], antialias=True)


def center_resize(img: torch.Tensor, size: int, crop_fraction: float = 1.0) -> torch.Tensor:
    """uint8 [3, H, W] -> [3, size, size]: torchvision's ``Resize(floor(size / crop_fraction))`` (shorter
    side to that, the longer one truncated in proportion) then ``CenterCrop(size)``, with its rounding."""
    _, h, w = img.shape
    short = int(math.floor(size / crop_fraction))
    nh, nw = (int(short * h / w), short) if w <= h else (short, int(short * w / h))
    img = _resize(img, nh, nw)
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    return img[:, top : top + size, left : left + size]


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
    return _resize(img[:, top : top + h, left : left + w], size, size)
