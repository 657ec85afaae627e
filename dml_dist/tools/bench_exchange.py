"""The exchange's scale benchmark, in one invocation (``dml-bench --exchange``).

    dml-bench --exchange                                   # N = 2, 4, 8, 16; B = 256, C = 1000; both modes
    dml-bench --exchange peers=[2,4] batch=64 classes=100 plot=exchange.png out=exchange.jsonl

For each N it starts N processes on this machine (gloo over localhost, one thread each; no model, no
data), gives each a fixed random [B, C] logit tensor and runs, for each mode in turn (``rounds``
alternating rounds of ``steps`` steps; the median round's times count), the trainer's own step tail:

- ``exchange``: ``exchange.exchange``, the call training makes: the logits all-gather, or this peer's
  softmax/entropy payload and its all-reduce;
- ``loss``: the mutual term's forward and backward from what came back (the all-gather's consumer takes the
  softmax of N - 1 peers' logits, the all-reduce's of none).

Times are per step of the slowest rank. Bytes each rank receives per step are measured (the loopback
interface's receive counter across the timed steps, every rank together, divided by N and by the steps; the
smallest round counts, since other processes' localhost traffic only adds to it) and modelled (ring all-gather:
(N - 1) B C 4; ring all-reduce: 2 (N - 1) / N B (C + 1) 4). It prints a table and one JSON line, and draws
``plot`` (bytes and time against N) when matplotlib is installed.
Keys: ``peers`` ([2, 4, 8, 16]), ``batch`` (256), ``classes`` (1000), ``steps`` (20), ``rounds`` (3),
``temperature`` (4.0), ``plot`` (exchange.png; empty: none), ``out`` (append the JSON line there).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import statistics
import sys
import time
from datetime import timedelta
from types import SimpleNamespace

import torch
import torch.distributed as dist

from ..checkpoint import versions
from ..config import parse_tool_keys
from ..distributed import ALL_GATHER
from ..errors import DMLError
from ..logger import emit_json_line

KEYS = {
    "peers": [2, 4, 8, 16],
    "batch": 256,
    "classes": 1000,
    "steps": 20,
    "rounds": 3,
    "temperature": 4.0,
    "plot": "exchange.png",
    "out": None,
}
MODES = ("all_gather", "all_reduce")


def loopback_rx_bytes() -> int:
    """Bytes received so far on the loopback interface (every process's localhost traffic)."""
    with open("/proc/net/dev") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name.strip() == "lo":
                return int(rest.split()[0])
    raise DMLError("no loopback interface in /proc/net/dev: cannot measure the bytes")


def model_bytes(mode: str, n: int, b: int, c: int) -> int:
    """What a ring algorithm makes each rank receive per step (fp32)."""
    if mode == "all_gather":
        return (n - 1) * b * c * 4
    return round(2 * (n - 1) / n * b * (c + 1) * 4)


def _step_tail(mode: str, z: torch.Tensor, y: torch.Tensor, temperature: float, ctx) -> tuple[float, float]:
    """One step's exchange and mutual-term forward+backward, timed: (exchange s, loss s)."""
    from ..exchange import PeerSums, exchange
    from ..loss import compute_dml_loss, loss_from_sums

    logits = z.clone().requires_grad_()
    t0 = time.perf_counter()
    got = exchange(logits, ctx, mode, temperature)  # sync point, as in training
    t1 = time.perf_counter()
    if isinstance(got, PeerSums):
        loss = loss_from_sums(logits, got.summed, got.peers, y, temperature, own=got.own)
    else:
        r = ctx.rank
        loss = compute_dml_loss(logits, torch.cat([got[:r], got[r + 1 :]]), y, temperature)
    loss.total.backward()
    return t1 - t0, time.perf_counter() - t1


def _worker(rank: int, n: int, port: int, b: dict, results) -> None:
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, n + 1, is_master=False, timeout=timedelta(seconds=300))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=n)
    try:
        g = torch.Generator().manual_seed(rank)
        z = torch.randn(b["batch"], b["classes"], generator=g) * 3
        y = torch.randint(0, b["classes"], (b["batch"],), generator=g)
        ctx = SimpleNamespace(peer_group=None, rank=rank, uniform=True)  # one replica per peer, the world
        rounds = {m: [] for m in MODES}
        for m in MODES:  # warm-up: connections, allocator
            for _ in range(3):
                _step_tail(m, z, y, b["temperature"], ctx)
        for _ in range(b["rounds"]):
            for m in MODES:
                cfg = b["temperature"]
                dist.barrier()
                rx0 = loopback_rx_bytes()
                dist.barrier()  # nobody sends a step's bytes before rank 0 has read the counter
                times = [_step_tail(m, z, y, cfg, ctx) for _ in range(b["steps"])]
                dist.barrier()
                rx = loopback_rx_bytes() - rx0
                mine = torch.tensor([sum(t[0] for t in times), sum(t[1] for t in times)]) / b["steps"]
                slowest = torch.stack([torch.empty_like(mine) for _ in range(n)])
                ALL_GATHER(slowest.view(-1), mine)
                rounds[m].append((slowest[:, 0].max().item(), slowest[:, 1].max().item(), rx))
        if rank == 0:
            out = {}
            for m, rs in rounds.items():
                ex, loss = (statistics.median(r[i] for r in rs) for i in range(2))  # each on its own
                rx = min(r[2] for r in rs)  # the counter is machine-wide: anything else on lo only adds
                out[m] = {
                    "exchange_ms": round(1000 * ex, 3),
                    "loss_ms": round(1000 * loss, 3),
                    # every rank's traffic crossed lo once during the timed steps
                    "rx_bytes_per_rank": round(rx / n / b["steps"]),
                    "model_bytes_per_rank": model_bytes(m, n, b["batch"], b["classes"]),
                }
            results.put(out)
    finally:
        dist.destroy_process_group()


def run_cohort(n: int, b: dict) -> dict:
    """N processes, both modes; rank 0's figures."""
    store = dist.TCPStore("127.0.0.1", 0, n + 1, is_master=True, wait_for_workers=False)
    # forkserver: torch is imported once by the server, each process is a fork of it (spawn would import it
    # N times per cohort); no fork of this process, whose store already runs threads.
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed", "dml_dist.engine", "dml_dist.loss"])
    results = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, n, store.port, b, results)) for r in range(n)]
    for p in procs:
        p.start()
    out, deadline = None, time.monotonic() + 600
    try:
        while out is None:  # rank 0's figures, unless a process fails first (the others would wait for it)
            try:
                out = results.get(timeout=0.5)
            except queue.Empty:
                failed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if failed or time.monotonic() > deadline:
                    raise DMLError(
                        f"a benchmark process failed with N={n} (exit codes {[p.exitcode for p in procs]})"
                        if failed
                        else f"the benchmark with N={n} took over 600 s; lower peers= or steps="
                    ) from None
        for p in procs:
            p.join(timeout=30)
        if any(p.exitcode for p in procs):
            raise DMLError(f"a benchmark process failed with N={n} (exit codes {[p.exitcode for p in procs]})")
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    return out


def table(rows: list[dict]) -> str:
    lines = [
        "| N | mode | bytes/rank/step measured | model | exchange ms | loss ms | exchange + loss ms |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['peers']} | {r['mode']} | {r['rx_bytes_per_rank'] / 1e6:.2f} MB | "
            f"{r['model_bytes_per_rank'] / 1e6:.2f} MB | {r['exchange_ms']:.1f} | {r['loss_ms']:.1f} | "
            f"{r['exchange_ms'] + r['loss_ms']:.1f} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("dml-bench: matplotlib is not installed, so no plot; pip install 'dml-dist[plot]'", file=sys.stderr)
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6))
    for m in MODES:
        rs = [r for r in rows if r["mode"] == m]
        ns = [r["peers"] for r in rs]
        ax1.plot(ns, [r["rx_bytes_per_rank"] / 1e6 for r in rs], "o-", label=f"{m} (measured)")
        ax1.plot(ns, [r["model_bytes_per_rank"] / 1e6 for r in rs], "k:", lw=0.8)
        ax2.plot(ns, [r["exchange_ms"] for r in rs], "o-", label=m)
    for ax, title in ((ax1, "MB received per rank per step"), (ax2, "exchange ms per step (slowest rank)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [str(k) for k in ns])
        ax.set_xlabel("peers N")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    ax1.set_yscale("log")
    b, c = rows[0]["batch"], rows[0]["classes"]
    fig.suptitle(
        f"DML exchange, B={b}, C={c}, gloo on localhost ({os.cpu_count()} cores); dotted: ring model", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        b = parse_tool_keys(argv, KEYS, "dml-bench --exchange")
        if not isinstance(b["peers"], list) or not all(isinstance(n, int) and n >= 2 for n in b["peers"]):
            raise DMLError(f"peers must be a list of cohort sizes >= 2, e.g. peers=[2,4,8], got {b['peers']!r}")
        rows = []
        for n in b["peers"]:
            for m, r in run_cohort(n, b).items():
                rows.append({"peers": n, "mode": m, "batch": b["batch"], "classes": b["classes"], **r})
                print(
                    f"N={n:>3} {m:>10}: {r['rx_bytes_per_rank'] / 1e6:8.2f} MB/rank/step "
                    f"(model {r['model_bytes_per_rank'] / 1e6:.2f}), exchange {r['exchange_ms']:8.1f} ms, "
                    f"loss {r['loss_ms']:6.1f} ms",
                    flush=True,
                )
    except DMLError as e:
        print(f"dml-bench: error: {e}", file=sys.stderr)
        return 1
    print(table(rows))
    if b["plot"] and plot(rows, b["plot"]):
        print(f"plot: {b['plot']}")
    emit_json_line(
        {
            "benchmark": "exchange",
            "cores": os.cpu_count(),
            "steps": b["steps"],
            "rounds": b["rounds"],
            "rows": rows,
            "versions": versions(),
        },
        b["out"],
    )
    return 0


if __name__ == "__main__":
    from dml_dist.errors import end_with

    end_with(main)
