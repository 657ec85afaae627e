"""Benchmark of the data path at ImageNet shape, in one invocation (``dml-bench --data``).

    python benchmarks/make_imagenet_folder.py /tmp/in20k --train 20000 --classes 100
    python benchmarks/make_imagenet_folder.py /tmp/in10k --train 10000 --classes 100
    python benchmarks/make_imagenet_folder.py /tmp/in40k --train 40000 --classes 100
    dml-bench --data data_dir=/tmp/in20k rss_dirs=[/tmp/in10k,/tmp/in40k]

Keys: ``data_dir`` (the folder), ``image_size`` (128), ``batch_size`` (64), ``steps`` (16 steps per
cohort run), ``cohorts`` ([1, 2, 4] ranks on one node), ``anchor_images`` (512), ``rss_dirs`` (folders
whose stream-path peak RSS to compare; [] skips), ``first_step`` (true: time the memory path's first step
with a cold and a warm cache), ``out`` (append the JSON line there). It prints one JSON line:

- ``decode``: CPU-seconds of decoding per batch for a cohort of N peers on one node (the stream path, every
  rank's loader workers added up), and its ratio to one model alone. Decoding per peer, as before this
  path, would give N.
- ``per_core``: images/s on one core, one process: the stream loader (TorchCodec decode, RandomResizedCrop,
  flip, normalise) against the anchor pipeline (torchvision ``ImageFolder`` + ``RandomResizedCrop`` +
  ``RandomHorizontalFlip`` + ``PILToTensor`` + ``ToDtype`` + ``Normalize`` in a ``DataLoader``: the
  training preset of torchvision's reference scripts), both to normalised float batches.
- ``first_step``: seconds from process start to the first batch, 2 ranks, memory path, cold cache (decode
  the folder) and warm (map the cache).
- ``rss``: peak RSS per rank (and per loader worker) on the stream path for each of ``rss_dirs``.
- ``job_cpu``: the data path's CPU time per step of the whole job (every process: torchrun, ranks, loader
  workers, exited ones too), long runs (``job_steps[1]``) minus short ones (``job_steps[0]``), the median of
  ``job_repeats``, for one model
  alone, 1 node with 2 peers, and 2 localhost nodes x 2 ranks with 2 peers x 2 replicas, and its ratio to
  one model alone (a cohort can decode each sample once per job: 1.0 is the floor).
- ``eval_decode``: validation images decoded at the first start and at a restart (stream path, cache_eval),
  and per evaluation.
- ``startup``: process start to the first batch on a folder of ``startup_files`` files, 2 ranks, stream
  path: the first start (lists the folder) and a restart (reads the manifest). 0 skips it.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import torch

from ..checkpoint import versions
from ..config import build_config, parse_tool_keys
from ..distributed.placement import host_cpus
from ..errors import DMLError
from ..logger import emit_json_line
from .bench_job import eval_decode, job_cpu, probe_run, startup

KEYS = {
    "data_dir": None,
    "image_size": 128,
    "batch_size": 64,
    "steps": 16,
    "cohorts": [1, 2, 4],
    "anchor_images": 512,
    "rss_dirs": [],
    "first_step": True,
    "job_steps": [4, 100],
    "job_repeats": 5,
    "startup_files": 100000,
    "out": None,
}


def decode_work(b: dict, cache_dir: str) -> dict:
    """Decode CPU-seconds per batch, whole node, for each cohort size (stream path, rrc + flip)."""
    rows = {}
    for n in b["cohorts"]:
        res = probe_run(
            n,
            data_dir=b["data_dir"],
            loader="stream",
            image_size=b["image_size"],
            batch_size=b["batch_size"],
            augment="[rrc,flip]",
            num_workers=1,
            steps=b["steps"],
            cache_dir=cache_dir,
        )
        cpu = sum(r["decode_cpu_s"] for r in res["ranks"])
        rows[n] = {
            "decode_cpu_s_per_batch": round(cpu / b["steps"], 4),
            "images_decoded_per_batch": sum(r["decoded"] for r in res["ranks"]) / b["steps"],
        }
    alone = rows[min(rows)]["decode_cpu_s_per_batch"]
    for row in rows.values():
        row["vs_one_model"] = round(row["decode_cpu_s_per_batch"] / alone, 3)
    return rows


def per_core(b: dict) -> dict:
    """Images/s on one core: the stream loader against torchvision's ImageFolder pipeline."""
    from torchvision import datasets
    from torchvision.transforms import v2

    from ..data import MEAN, STD, build_datasets, make_train_loader

    torch.set_num_threads(1)
    s, bs = b["image_size"], b["batch_size"]
    steps = max(2, b["anchor_images"] // bs)
    cfg = build_config(
        overrides={
            "data_dir": b["data_dir"],
            "loader": "stream",
            "image_size": s,
            "augment": ["rrc", "flip"],
            "val_fraction": 0.01,
        }
    )
    loader = make_train_loader(build_datasets(cfg).train, bs, 0, num_workers=0)
    it = iter(loader)
    next(it)
    t0 = time.perf_counter()
    for _ in range(steps):
        next(it)
    ours = steps * bs / (time.perf_counter() - t0)
    # torchvision references/classification's training preset, to the same float output as ours
    anchor_ds = datasets.ImageFolder(
        os.path.join(b["data_dir"], "train"),
        transform=v2.Compose(
            [
                v2.RandomResizedCrop(s, antialias=True),
                v2.RandomHorizontalFlip(),
                v2.PILToTensor(),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(MEAN, STD),
            ]
        ),
    )
    it = iter(torch.utils.data.DataLoader(anchor_ds, batch_size=bs, shuffle=True, num_workers=0))
    next(it)
    t0 = time.perf_counter()
    for _ in range(steps):
        next(it)
    anchor = steps * bs / (time.perf_counter() - t0)
    return {
        "stream_images_per_s": round(ours, 1),
        "anchor_images_per_s": round(anchor, 1),
        "stream_vs_anchor": round(ours / anchor, 2),
        "images": steps * bs,
    }


def first_step(b: dict) -> dict:
    """Process start to first batch, 2 ranks, memory path: a cold cache, then the same again (warm)."""
    with tempfile.TemporaryDirectory() as cache:
        out = {}
        for kind in ("cold", "warm"):
            res = probe_run(
                2,
                data_dir=b["data_dir"],
                loader="memory",
                image_size=b["image_size"],
                batch_size=b["batch_size"],
                augment="[crop,flip]",
                steps=2,
                cache_dir=cache,
            )
            out[f"{kind}_s"] = max(r["first_batch_s"] for r in res["ranks"])
        out["images"] = res["train_images"]
        return out


def rss(b: dict, cache_dir: str) -> dict:
    rows = {}
    for d in b["rss_dirs"]:
        res = probe_run(
            2,
            data_dir=d,
            loader="stream",
            image_size=b["image_size"],
            batch_size=b["batch_size"],
            augment="[rrc,flip]",
            num_workers=2,
            steps=b["steps"],
            cache_dir=cache_dir,
        )
        rows[d] = {
            "files": res["train_images"],
            "rank_peak_rss_mb": max(r["peak_rss_mb"] for r in res["ranks"]),
            "worker_peak_rss_mb": max(r["worker_peak_rss_mb"] for r in res["ranks"]),
        }
    if len(rows) >= 2:
        first, last = list(rows.values())[0], list(rows.values())[-1]
        rows["growth"] = round(last["rank_peak_rss_mb"] / first["rank_peak_rss_mb"] - 1, 3)
    return rows


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        b = parse_tool_keys(argv, KEYS, "dml-bench --data")
        if not b["data_dir"] or not os.path.isdir(os.path.join(str(b["data_dir"]), "train")):
            raise DMLError(
                "dml-bench --data needs data_dir=<folder with train/>; make one with "
                "python benchmarks/make_imagenet_folder.py DIR --train 20000"
            )
        with tempfile.TemporaryDirectory() as cache:
            result = {
                "data_dir": b["data_dir"],
                "image_size": b["image_size"],
                "batch_size": b["batch_size"],
                "cores": host_cpus(),
                "decode": decode_work(b, cache),
                "per_core": per_core(b),
                "first_step": first_step(b) if b["first_step"] else None,
                "rss": rss(b, cache) if b["rss_dirs"] else None,
                "job_cpu": job_cpu(b, cache) if b["job_steps"] else None,
                "eval_decode": eval_decode(b),
                "startup": startup(b) if b["startup_files"] else None,
                "versions": versions(),
            }
    except DMLError as e:
        print(f"dml-bench: error: {e}", file=sys.stderr)
        return 1
    emit_json_line(result, b["out"])
    return 0


if __name__ == "__main__":
    from dml_dist.errors import end_with

    end_with(main)
