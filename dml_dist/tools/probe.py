"""Run the training data path alone, without models: what each rank draws, decodes and holds.

    # 2 ranks on this machine: which path, images decoded per rank, batch fingerprints, first-batch time
    torchrun --standalone --nproc_per_node=2 -m dml_dist.tools.probe data_dir=DIR loader=stream steps=20

Takes the trainer's config keys plus ``epoch`` (0-based, default 0), ``start_step`` (0), ``steps`` (10; 0 = to the end
of the epoch), ``eval`` (also one pass over the validation loader, as the trainer builds it: the indices each rank
decoded and scored), ``hash`` (false: no batch fingerprints, so ``images_per_s`` times the loader alone, not a copy to
the host) and ``out`` (append rank 0's JSON line there too). Every rank builds the datasets and the training loader
exactly as the trainer does, draws the steps, and rank 0 prints one JSON line: the data path and why, and per rank its
node, the images it decoded, the CPU seconds its decoding took, the fingerprint of every batch, the seconds from process
start to its first batch, its peak RSS (and that of its loader workers) and what its data setup logged (cache builds).
``dml-bench --data`` and the tests use it.
"""

from __future__ import annotations

import os
import resource
import sys
import time

import torch

from .. import distributed as D
from ..config import build_config, parse_overrides
from ..data import build_datasets, make_eval_loader, make_train_loader
from ..data.fingerprint import batch_fingerprint
from ..errors import DMLError
from ..logger import emit_json_line
from ..world import finalize_config

PROBE_KEYS = {"epoch": 0, "start_step": 0, "steps": 10, "eval": False, "hash": True, "out": None}


def process_age() -> float:
    """Seconds since this process started (from /proc: the interpreter's start-up counts too)."""
    with open("/proc/self/stat") as f:
        start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


def probe(cfg: dict, opts: dict) -> dict | None:
    ctx = D.init_distributed(cfg)
    try:
        cfg = finalize_config(cfg, ctx.world_size)
        log: list = []
        data = build_datasets(cfg, ctx.device, log.append)
        shard, node = (ctx.replica, ctx.replicas), (ctx.local_rank, ctx.local_world_size)
        decode = D.decode_group(ctx) if data.path == "stream" else None
        loader = make_train_loader(
            data.train, cfg["batch_size"], cfg["seed"], cfg["num_workers"], ctx.device, shard, node=node, decode=decode
        )
        loader.set_epoch(opts["epoch"], opts["start_step"])
        loader.record_decodes = True
        last = len(loader) if not opts["steps"] else min(len(loader), opts["start_step"] + opts["steps"])
        fingerprints, first_batch_s, t0 = [], None, None
        for step, (x, y) in zip(range(opts["start_step"], last), loader):
            if first_batch_s is None:
                first_batch_s, t0 = process_age(), time.perf_counter()
            # hash=false: only the step (timing the loader: no copy of the batch to the host)
            fingerprints.append([step, *batch_fingerprint(x, y).tolist()] if opts["hash"] else [step])
        if hasattr(loader, "raise_pending"):
            loader.raise_pending()  # collective: an unreadable file stops every rank with its line
        if ctx.device.type == "cuda":
            torch.cuda.synchronize(ctx.device)  # hash=false: the last batches' transforms may still be queued
        seconds = time.perf_counter() - t0 if t0 is not None else 0.0
        evaluation = {}
        if opts["eval"]:  # the trainer's validation loader (Trainer.__init__), one pass
            val = make_eval_loader(data.val, 2 * cfg["batch_size"], cfg["num_workers"], ctx.device, shard, node, decode)
            val.record_decodes = True
            batches = [len(y) for _, y in val]
            evaluation = {
                "eval_batches": batches,
                "eval_positions": val.positions.tolist(),
                "eval_decoded_indices": getattr(val, "decoded_indices", []),
            }
        mine = {
            "rank": ctx.rank,
            "node": ctx.rank // ctx.local_world_size,
            "peer": ctx.peer,
            "replica": ctx.replica,
            "decoded_indices": getattr(loader, "decoded_indices", []),
            "pinned_copies": getattr(loader, "pinned_copies", 0),
            "device_decodes": getattr(loader, "device_decodes", {}),
            "decoded": getattr(loader, "decoded", 0),
            "decode_cpu_s": round(getattr(loader, "decode_cpu_s", 0.0), 4),
            "first_batch_s": round(first_batch_s or 0.0, 3),
            "images_per_s": round((len(fingerprints) - 1) * cfg["batch_size"] / seconds, 1) if seconds else None,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "worker_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
            "log": log,
            "fingerprints": fingerprints,
            **evaluation,
        }
        ranks = D.gather_objects(mine)
        if not ctx.is_main:
            return None
        return {
            "path": data.path,
            "why": data.why,
            "train_images": len(data.train),
            "batch_size": cfg["batch_size"],
            "image_size": cfg["image_size"],
            "world_size": ctx.world_size,
            "num_workers": cfg["num_workers"],
            "rank_order": ctx.order,
            "rank_order_why": ctx.order_why,
            "ranks": ranks,
        }
    finally:
        D.destroy_distributed()


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        overrides = parse_overrides(argv)
        opts = {k: overrides.pop(k, v) for k, v in PROBE_KEYS.items()}
        cfg = build_config(overrides={"print_freq": 10**6, **overrides})
        result = probe(cfg, opts)
    except DMLError as e:
        print(f"dml-dist: error: {e}", file=sys.stderr, flush=True)
        return 1
    emit_json_line(result, opts["out"])
    return 0


if __name__ == "__main__":
    from dml_dist.errors import end_with

    end_with(main)
