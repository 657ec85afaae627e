"""Augmentation of whole batches on the training device, and its per-sample reference.

One step's augmentation is fully described by ``AugParams``: per sample a crop offset, a flip bit, a
rotation angle and three colour-jitter factors. They are drawn on the CPU from a generator seeded by
``(seed, epoch, step)`` (``step_generator``), so every rank draws the same numbers without talking to
the others, and any step of any epoch can be re-drawn on its own (exact mid-epoch resume).

``augment_batch`` applies them to a uint8 batch that already lives on the device (airbench style: the decoded training
set sits on the GPU, a step is a few batched kernels): crop with 4-pixel zero padding by batched indexing, flip by
``torch.where`` (or, with rotation, flip + rotation as one bilinear ``grid_sample`` over a grid built by broadcasting);
colour jitter by per-sample blend factors (``lerp``). ``augment_one`` does the same to one image with torchvision's
functional ops; the tests hold the two to each other.

Augmentation names (config key ``augment``): ``crop``, ``flip``, ``rotate`` (within +-10 degrees),
``jitter`` (brightness, contrast, saturation within +-20%).
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

AUGMENTATIONS = ("crop", "flip", "rotate", "jitter")
PAD = 4  # crop: zero padding on each side, offsets in [0, 2 * PAD]
ROTATION_DEGREES = 10.0
JITTER = 0.2  # brightness / contrast / saturation factors in [1 - JITTER, 1 + JITTER]
_GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


def step_generator(seed: int, epoch: int, step: int) -> torch.Generator:
    """A CPU generator that depends on (seed, epoch, step) alone: the same on every rank and restart."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{step}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


@dataclass
class AugParams:
    """Per-sample parameters of one batch (all tensors of length B, on one device)."""

    crop_i: torch.Tensor  # int64, row offset in [0, 2 * PAD]
    crop_j: torch.Tensor  # int64, column offset
    flip: torch.Tensor  # bool
    angle: torch.Tensor  # float32, degrees (counter-clockwise, torchvision's convention)
    brightness: torch.Tensor  # float32 factors
    contrast: torch.Tensor
    saturation: torch.Tensor

    @staticmethod
    def draw(n: int, g: torch.Generator) -> AugParams:
        """Every parameter is drawn whatever the enabled augmentations, so turning one off leaves the
        others' values unchanged."""
        u = torch.rand(n, 7, generator=g)
        return AugParams(
            crop_i=(u[:, 0] * (2 * PAD + 1)).long().clamp_max(2 * PAD),
            crop_j=(u[:, 1] * (2 * PAD + 1)).long().clamp_max(2 * PAD),
            flip=u[:, 2] < 0.5,
            angle=(2 * u[:, 3] - 1) * ROTATION_DEGREES,
            brightness=1 + (2 * u[:, 4] - 1) * JITTER,
            contrast=1 + (2 * u[:, 5] - 1) * JITTER,
            saturation=1 + (2 * u[:, 6] - 1) * JITTER,
        )

    def to(self, device: torch.device, non_blocking: bool = False) -> AugParams:
        """Host -> device; pinned first on CUDA so the copy can overlap with queued work."""

        def move(t: torch.Tensor) -> torch.Tensor:
            if device.type == "cuda":
                t = t.pin_memory()
            return t.to(device, non_blocking=non_blocking)

        return AugParams(**{f.name: move(getattr(self, f.name)) for f in fields(self)})

    def __len__(self) -> int:
        return len(self.flip)

    def __getitem__(self, k) -> AugParams:
        return AugParams(**{f.name: getattr(self, f.name)[k] for f in fields(self)})


# ---------------------------------------------------------------------------------------------- batched
def _crop(x: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """Per-sample crop of the zero-padded batch: pick window (i, j) of each sample from an ``unfold``
    view of all (2 * PAD + 1)^2 windows (exact, any dtype, one gather)."""
    b, _, h, w = x.shape
    windows = F.pad(x, (PAD, PAD, PAD, PAD)).unfold(2, h, 1).unfold(3, w, 1)  # [B, C, 9, 9, H, W] view
    return windows[torch.arange(b, device=x.device), :, i, j]


def device_constant(cached, *args):
    """``cached(*args)``, a constant built once per device by a ``functools`` cache, in eager code; under
    torch.compile the function it wraps, traced into the graph (small tables become constants of the graph, the
    rotation grid's ``arange`` is fused into the kernel that uses it; dynamo would trace through the cache anyway,
    with a warning each time)."""
    return cached.__wrapped__(*args) if torch.compiler.is_compiling() else cached(*args)


@functools.lru_cache(maxsize=16)
def _base_grid(h: int, w: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel centres in normalised coordinates (``align_corners=False``), as ``affine_grid`` lays them.
    Built once per (size, device) and only read afterwards: six fewer launches per step."""
    xs = (torch.arange(w, device=device, dtype=torch.float32) * 2 + 1) / w - 1
    ys = (torch.arange(h, device=device, dtype=torch.float32) * 2 + 1) / h - 1
    return xs.view(1, 1, w), ys.view(1, h, 1)


def _flip_rotate(x: torch.Tensor, p: AugParams, flip: bool) -> torch.Tensor:
    """Flip and bilinear rotation about the centre (zero fill) in one ``grid_sample``: torchvision's
    horizontal_flip -> rotate composed into one map. Output pixel o -> rotated back: r = R o ->
    unflipped: (s * r_x, r_y), s = -1 when flipped. The grid is built by broadcasting (``affine_grid``
    does the same work as a batched matmul, several times slower on CPU)."""
    b, _, h, w = x.shape
    a = p.angle.to(torch.float32) * (math.pi / 180)
    cos, sin = a.cos().view(b, 1, 1), a.sin().view(b, 1, 1)
    s = torch.where(p.flip, -1.0, 1.0).view(b, 1, 1) if flip else torch.ones_like(cos)
    gx, gy = device_constant(_base_grid, h, w, x.device)
    grid = torch.stack([s * (cos * gx - sin * (h / w) * gy), sin * (w / h) * gx + cos * gy], -1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


@functools.cache
def _gray_weights(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """torchvision's greyscale weights on ``device``, copied there once (not twice per step)."""
    return torch.tensor(_GRAY, device=device, dtype=dtype).view(1, 3, 1, 1)


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (x * device_constant(_gray_weights, x.device, x.dtype)).sum(1, keepdim=True)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``clamp(f * x + (1 - f) * other, 0, 1)`` with one factor per sample (torchvision's blend)."""
    return torch.lerp(other, x, factor.to(x.dtype).view(-1, 1, 1, 1)).clamp_(0, 1)


def augment_batch(x: torch.Tensor, p: AugParams, ops: Sequence[str]) -> torch.Tensor:
    """uint8 [B, 3, H, W] on any device -> float32 in [0, 1], each sample with its own parameters.
    Crop and flip move bytes exactly (an ``unfold`` window, ``torch.where``); with rotation, flip and
    rotation are one bilinear ``grid_sample``."""
    if "crop" in ops:
        x = _crop(x, p.crop_i, p.crop_j)
    if "rotate" in ops:
        x = _flip_rotate(x.float().div_(255), p, "flip" in ops)
    else:
        if "flip" in ops:
            x = torch.where(p.flip.view(-1, 1, 1, 1), x.flip(-1), x)
        x = x.float().div_(255)
    if "jitter" in ops:
        x = x.mul_(p.brightness.to(x.dtype).view(-1, 1, 1, 1)).clamp_(0, 1)
        x = _blend(x, _gray(x).mean((1, 2, 3), keepdim=True), p.contrast)
        x = _blend(x, _gray(x), p.saturation)
    return x


# ------------------------------------------------------------------------------------------- per sample
def augment_one(img: torch.Tensor, p: AugParams, ops: Sequence[str]) -> torch.Tensor:
    """The reference: one uint8 CHW image, one sample's parameters (``params[k]``), torchvision ops."""
    from torchvision.transforms.v2 import InterpolationMode  # here: importing torchvision takes seconds
    from torchvision.transforms.v2 import functional as TF

    _, h, w = img.shape
    if "crop" in ops:
        i, j = int(p.crop_i), int(p.crop_j)
        img = F.pad(img, (PAD, PAD, PAD, PAD))[:, i : i + h, j : j + w]
    if "flip" in ops and bool(p.flip):
        img = TF.horizontal_flip(img)
    img = img.float().div(255)
    if "rotate" in ops:
        img = TF.rotate(img, float(p.angle), interpolation=InterpolationMode.BILINEAR)
    if "jitter" in ops:
        img = TF.adjust_brightness(img, float(p.brightness))
        img = TF.adjust_contrast(img, float(p.contrast))
        img = TF.adjust_saturation(img, float(p.saturation))
    return img
