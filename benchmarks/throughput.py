"""Training-step throughput of one DML cohort (no data loading, no evaluation), one process per peer.

    torchrun --standalone --nproc_per_node=2 benchmarks/throughput.py model=resnet20 batch_size=128 steps=30
    python benchmarks/throughput.py device=cuda        # one peer, no all-gather

Times forward + all-gather + DML loss + backward + SGD step on a fixed random batch, after `warmup` steps,
and the all-gather alone. Rank 0 prints one JSON line (images/s per peer, ms per step, share of the step
spent in the all-gather, placement, library versions and git commit) and appends it to `out` if given.
"""
import json
import sys
import time

import torch

from dml_dist import distributed as D
from dml_dist.checkpoint import versions
from dml_dist.config import build_config, parse_overrides
from dml_dist.engine import autocast_context
from dml_dist.loss import compute_dml_loss
from dml_dist.models import build_model

BENCH_KEYS = {"steps": 30, "warmup": 5, "out": None}


def main(argv):
    overrides = parse_overrides(argv)
    bench = {k: overrides.pop(k, v) for k, v in BENCH_KEYS.items()}
    cfg = build_config(overrides={"model": "resnet20", "batch_size": 128, **overrides})
    ctx = D.init_distributed(cfg)
    amp = "off" if ctx.device.type != "cuda" else ("bf16" if cfg["amp"] == "auto" else cfg["amp"])
    torch.manual_seed(ctx.rank)
    model = build_model(cfg["model"] if isinstance(cfg["model"], str) else cfg["model"][ctx.rank], 10).to(ctx.device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(cfg["batch_size"], 3, cfg["image_size"], cfg["image_size"], device=ctx.device)
    y = torch.randint(0, 10, (cfg["batch_size"],), device=ctx.device)
    gather_s = 0.0
    for i in range(bench["warmup"] + bench["steps"]):
        if i == bench["warmup"]:
            D.barrier()
            if ctx.device.type == "cuda":
                torch.cuda.synchronize()
            t0, gather_s = time.perf_counter(), 0.0
        with autocast_context(ctx.device, amp):
            logits = model(x).float()
        tg = time.perf_counter()
        all_logits = D.all_gather_logits(logits)  # sync point, as in training
        gather_s += time.perf_counter() - tg
        peers = torch.cat([all_logits[:ctx.rank], all_logits[ctx.rank + 1:]])
        loss = compute_dml_loss(logits, peers, y).total
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if ctx.device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    per_rank = D.gather_objects({"ms_per_step": 1000 * elapsed / bench["steps"],
                                 "gather_share": gather_s / elapsed, **ctx.describe()})
    if ctx.is_main:
        result = {"model": cfg["model"], "batch_size": cfg["batch_size"], "image_size": cfg["image_size"],
                  "peers": ctx.world_size, "amp": amp, "steps": bench["steps"],
                  "images_per_s_per_peer": round(cfg["batch_size"] * bench["steps"] / elapsed, 1),
                  "ranks": per_rank, "versions": versions()}
        line = json.dumps(result)
        print(line)
        if bench["out"]:
            with open(bench["out"], "a") as f:
                f.write(line + "\n")
    D.destroy_distributed()


if __name__ == "__main__":
    main(sys.argv[1:])
