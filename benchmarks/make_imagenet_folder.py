"""Write an ImageNet-shaped image folder: JPEGs of 400-600 x 300-450 pixels (ImageNet's typical sizes),
quality 90, about 75 KB each, in ``train/<class>/`` (and ``val/<class>/``), with every core.

    python benchmarks/make_imagenet_folder.py /tmp/imagenet20k --train 20000 --val 1000 --classes 100

Content: a smooth random colour field per image (a 1/16-size random image upscaled) plus pixel noise, so
JPEG sizes and decode costs are those of photographs, not of flat images. The same arguments give the
same files.
"""

from __future__ import annotations

import argparse
import io
import os
from multiprocessing import Pool

import numpy as np
from PIL import Image


def _write(job) -> int:
    path, seed = job
    rng = np.random.default_rng(seed)
    w, h = int(rng.integers(400, 601)), int(rng.integers(300, 451))
    small = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
    field = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), dtype=np.int16)
    noisy = (field + rng.integers(-20, 21, (h, w, 3), dtype=np.int16)).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noisy).save(buf, "JPEG", quality=90)
    with open(path, "wb") as f:
        f.write(buf.getvalue())
    return len(buf.getvalue())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out")
    p.add_argument("--train", type=int, default=20000, help="training images (default 20000)")
    p.add_argument("--val", type=int, default=0, help="validation images (default 0: none)")
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    jobs = []
    for split, n in (("train", args.train), ("val", args.val)):
        for i in range(n):
            c = i % args.classes
            folder = os.path.join(args.out, split, f"n{c:08d}")
            os.makedirs(folder, exist_ok=True)
            jobs.append((os.path.join(folder, f"{split}_{i:08d}.JPEG"), (args.seed, 0 if split == "train" else 1, i)))
    with Pool() as pool:
        sizes = pool.map(_write, jobs, chunksize=64)
    print(
        f"{args.out}: {args.train} train + {args.val} val JPEGs in {args.classes} classes, "
        f"{sum(sizes) / max(1, len(sizes)) / 1024:.0f} KB on average"
    )


if __name__ == "__main__":
    main()
