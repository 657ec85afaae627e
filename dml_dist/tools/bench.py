"""Throughput of the whole training loop: sampling, augmentation, forward, exchange, loss, backward, step.

    # 2 peers on this machine (CPU/gloo, or one GPU each), the real data path on the shared subset
    torchrun --standalone --nproc_per_node=2 -m dml_dist.tools.bench data_dir=../shared/data/cifar10-small model=resnet20
    # 2 peers x 2 replicas
    torchrun --standalone --nproc_per_node=4 -m dml_dist.tools.bench replicas=2 model_num=2
    # a mixed pair: how long the small peer waits for the wide one, and with a second replica for it
    torchrun --standalone --nproc_per_node=2 -m dml_dist.tools.bench model=[resnet20,wrn16_4]
    torchrun --standalone --nproc_per_node=3 -m dml_dist.tools.bench model=[resnet20,wrn16_4] replicas=[1,2]
    dml-bench model=resnet56 batch_size=512 amp=bf16     # one process: a world of one

Takes the trainer's config keys plus ``steps`` (timed steps per round, 10), ``rounds`` (3), ``warmup`` (5),
``loader_images`` (images timed per loader measurement, 2048) and ``out`` (append the JSON line to this file). Without a
readable ``data_dir`` it builds a synthetic set of random images of ``image_size`` (same code path).

Every rank runs, in lock-step (no evaluation, no checkpoints):
1. ``alone``: its peer trained without the mutual term: no exchange, no KL (the same peer trained alone);
2. ``dml``: the DML step, with the exchange (``exchange``: all-gather or all-reduce) timed separately; both phases are
   timed alike, with CUDA events on a GPU (the timing adds no synchronisation; what training itself does stays, e.g.
   fp16's GradScaler check) and ``perf_counter`` on the CPU; ``rounds`` alternating rounds of both, the median round
   of each counts;
3. rank 0 alone, the others waiting: the loader by itself, the batched device path and the per-sample
   path (DataLoader, one image at a time) with the same augmentations, and crop+flip batched.
Rank 0 prints one JSON line: images/s per peer, the DML tax (dml step time / alone step time), the
exchange's share of the step, per peer its compute and exchange time and idle share (``per_peer``), the
ATen operations of one step (``ops_per_step``: the step, the model's forward and backward alone, and the
difference: what the step launches around the model), the loaders' images/s and their ratio, placement,
versions and commit.
"""  # noqa: E501 - command lines

from __future__ import annotations

import os
import sys
import time

import torch

from .. import distributed as D
from ..checkpoint import versions
from ..config import build_config, parse_overrides
from ..data import DeviceTrainLoader, TensorImageDataset, load_image_folder, sample_dataloader
from ..engine import Peer, compile_step_parts, forward, peer_update, resolve_amp
from ..errors import DMLError
from ..exchange import exchange, resolve_exchange
from ..logger import emit_json_line
from ..meters import DeviceClock
from ..models import build_model, channels_last_choice
from ..parallel import CUDA_GRAPH_MODES, compile_choice, wrap_replicas
from ..world import finalize_config, peer_model_name
from .ops import ops_per_step

BENCH_KEYS = {"steps": 10, "rounds": 3, "warmup": 5, "loader_images": 2048, "out": None}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _dataset(cfg: dict) -> tuple[TensorImageDataset, str]:
    train = os.path.join(cfg["data_dir"], "train")
    if os.path.isdir(train):
        return load_image_folder(train, cfg["image_size"], cfg["augment"]), train
    n, s = 5000, cfg["image_size"]
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, s, s), dtype=torch.uint8, generator=g)
    return TensorImageDataset(
        images, torch.arange(n) % 10, [str(c) for c in range(10)], cfg["augment"]
    ), f"synthetic {n} images {s}x{s}"


def _batches(loader: DeviceTrainLoader):
    """Endless training batches, epoch after epoch."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def _time_steps(peer: Peer, batches, ctx, cfg, mode: str, n: int, mutual: bool) -> tuple[float, float]:
    """Seconds per step and the seconds per step spent in the exchange, over ``n`` steps."""
    clock, gathers = DeviceClock(ctx.device), []
    D.barrier()
    _sync(ctx.device)  # outside the timed stretch: both phases start from an idle device
    start = clock.mark()
    for _ in range(n):
        x, y = next(batches)
        if peer.cudagraphs:  # as the training step
            torch.compiler.cudagraph_mark_step_begin()
        logits = forward(peer.model, x, peer.amp, peer.channels_last)
        if mutual:
            g0 = clock.mark()
            all_logits = exchange(logits, ctx, mode, cfg["temperature"])  # sync point, as in training
            gathers.append((g0, clock.mark()))
            index = ctx.peer
        else:
            all_logits, index = logits.detach().unsqueeze(0), 0  # no peers: plain cross-entropy
        peer_update(
            logits,
            all_logits,
            index,
            y,
            peer.optimizer,
            cfg["temperature"],
            cfg["kl_weight"],
            cfg["mutual"],
            peer.scaler,
            score=peer.score,
        )
    elapsed = clock.seconds(start, clock.mark())
    return elapsed / n, sum(clock.seconds(a, b) for a, b in gathers) / n


def _loader_rates(ds: TensorImageDataset, cfg: dict, device: torch.device, n_images: int) -> dict:
    """Images/s of the loaders alone (rank 0): batched device path vs the per-sample DataLoader path."""
    bs = cfg["batch_size"]
    steps = max(1, n_images // bs)

    def batched(ops) -> float:
        ds.augment = ops
        loader = DeviceTrainLoader(ds, bs, cfg["seed"], device)
        it = _batches(loader)
        next(it)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            next(it)
        _sync(device)
        return steps * bs / (time.perf_counter() - t0)

    def per_sample(ops) -> float:
        ds.augment = ops
        loader = sample_dataloader(ds, bs, cfg["seed"], num_workers=0)
        it = iter(loader)
        n = max(1, steps // 4)  # ~10x slower: time fewer batches
        t0 = time.perf_counter()
        for _ in range(n):
            x, _ = next(it)
            x.to(device)
        _sync(device)
        return n * bs / (time.perf_counter() - t0)

    ops = list(cfg["augment"])
    fast, slow = batched(ops), per_sample(ops)
    return {
        "augment": ops,
        "batched_images_per_s": round(fast),
        "per_sample_images_per_s": round(slow),
        "batched_vs_per_sample": round(fast / slow, 1),
        "crop_flip_batched_images_per_s": round(batched(["crop", "flip"])),
    }


def _per_peer(per_rank: list[dict], cfg: dict, ctx) -> list[dict]:
    """Each peer's DML step, its time in the exchange (waiting for slower peers, on CPU also the transfer)
    and that idle share, averaged over its replicas: how to balance ``replicas: [..]`` in a mixed cohort."""
    out = []
    for k, r in enumerate(ctx.layout):
        mine = [per_rank[q] for q in ctx.ranks_of(k)]
        step = sum(x["dml_ms"] for x in mine) / r
        wait = sum(x["exchange_ms"] for x in mine) / r
        out.append(
            {
                "peer": k + 1,
                "model": peer_model_name(cfg, k),
                "replicas": r,
                "step_ms": round(step, 2),
                "compute_ms": round(step - wait, 2),
                "exchange_ms": round(wait, 2),
                "idle_share": round(wait / step, 3),
            }
        )
    return out


def run(cfg: dict, bench: dict) -> dict | None:
    ctx = D.init_distributed(cfg)
    try:
        cfg = finalize_config(cfg, ctx.world_size)
        mode, amp = resolve_exchange(cfg)[0], resolve_amp(cfg["amp"], ctx.device)  # as the trainer resolves them
        if ctx.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # as the trainer: the fastest algorithms for the fixed shapes
        ds, source = _dataset(cfg)
        torch.manual_seed(cfg["seed"] + ctx.peer)
        model = build_model(peer_model_name(cfg, ctx.peer), len(ds.classes), image_size=cfg["image_size"])
        channels_last = channels_last_choice(cfg["channels_last"], model, ctx.device, amp)[0]
        model = model.to(ctx.device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        model, train_model = wrap_replicas(model, ctx, cfg["sync_bn"])
        compile_mode = compile_choice(cfg["compile"], ctx.device, ctx.replicas)[0]  # as the trainer
        if compile_mode is not None:
            train_model = torch.compile(train_model, mode=compile_mode)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, fused=True)  # as the trainer
        scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None  # as the trainer does
        loader = DeviceTrainLoader(ds, cfg["batch_size"], cfg["seed"], ctx.device, (ctx.replica, ctx.replicas))
        score = compile_step_parts(compile_mode, loader)[0]  # as the trainer: the step's parts around the model too
        cudagraphs = compile_mode in CUDA_GRAPH_MODES
        peer = Peer(train_model, optimizer, scaler, amp, channels_last, cudagraphs, score)
        batches = _batches(loader)
        n, warm = bench["steps"], bench["warmup"]
        _time_steps(peer, batches, ctx, cfg, mode, warm, True)  # warm-up (and compile)
        if compile_mode is not None:  # the alone phase's loss has other inputs (no peers): its graphs compile here too
            _time_steps(peer, batches, ctx, cfg, mode, warm, False)
        # Alternating rounds, median of each phase: a noisy neighbour hits both phases alike.
        alone, dml = [], []
        for _ in range(bench["rounds"]):
            alone.append(_time_steps(peer, batches, ctx, cfg, mode, n, False))
            dml.append(_time_steps(peer, batches, ctx, cfg, mode, n, True))
        ops = ops_per_step(peer, model, batches, ctx, cfg, mode)  # collective (the exchange)
        alone_s = sorted(a[0] for a in alone)[len(alone) // 2]
        dml_s, gather_s = sorted(dml)[len(dml) // 2]
        per_rank = D.gather_objects(
            {
                "alone_ms": round(1000 * alone_s, 2),
                "dml_ms": round(1000 * dml_s, 2),
                "exchange_ms": round(1000 * gather_s, 2),
                **ctx.describe(),
            }
        )
        loaders = _loader_rates(ds, cfg, ctx.device, bench["loader_images"]) if ctx.is_main else None
        D.barrier()  # the other ranks wait while rank 0 times the loaders alone
        if not ctx.is_main:
            return None
        slowest = max(per_rank, key=lambda r: r["dml_ms"])
        alone = max(r["alone_ms"] for r in per_rank)
        result = {
            "model": cfg["model"],
            "batch_size": cfg["batch_size"],
            "image_size": cfg["image_size"],
            "peers": cfg["model_num"],
            "replicas": cfg["replicas"],
            "amp": amp,
            "compile": compile_mode,
            "data": source,
            "steps": n,
            "rounds": bench["rounds"],
            "images_per_s_per_peer": round(cfg["batch_size"] / (slowest["dml_ms"] / 1000), 1),
            "dml_step_ms": slowest["dml_ms"],
            "alone_step_ms": alone,
            "dml_tax": round(slowest["dml_ms"] / alone, 3),
            "exchange": mode,
            "exchange_share": round(slowest["exchange_ms"] / slowest["dml_ms"], 3),
            "per_peer": _per_peer(per_rank, cfg, ctx),
            "ops_per_step": ops,
            "loader": loaders,
            "threads_per_rank": ctx.placement.threads,
            "ranks": per_rank,
            "versions": versions(),
        }
        return result
    finally:
        D.destroy_distributed()


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--data"]:  # the data path's benchmark (bench_data.py)
        from .bench_data import main as data_main

        return data_main(argv[1:])
    if argv[:1] == ["--exchange"]:  # the exchange's scale benchmark (bench_exchange.py)
        from .bench_exchange import main as exchange_main

        return exchange_main(argv[1:])
    try:
        overrides = parse_overrides(argv)
        bench = {k: overrides.pop(k, v) for k, v in BENCH_KEYS.items()}
        defaults = {
            "model": "resnet20",
            "batch_size": 128,
            "augment": True,
            "print_freq": 10**6,
            "data_dir": "../shared/data/cifar10-small",
        }
        cfg = build_config(overrides={**defaults, **overrides})
        result = run(cfg, bench)
    except DMLError as e:
        print(f"dml-bench: error: {e}", file=sys.stderr)
        return 1
    emit_json_line(result, bench["out"])
    return 0


def cli() -> None:
    """The ``dml-bench`` command (``python -m dml_dist.tools.bench`` alike): ``main``, ended by ``end_with``."""
    from dml_dist.errors import end_with

    end_with(main)


if __name__ == "__main__":
    cli()
