"""Where a rank runs and which backend its process group uses (the placement rule; docs/launching.md).

Pure functions of the launcher's numbers and the GPUs' identities, so the tests check every case on CPU.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass

import torch

from ..errors import DMLError


@dataclass(frozen=True)
class Placement:
    device: str  # "cpu" or "cuda:<i>"
    backend: str  # "gloo" or "nccl"
    threads: int  # torch intra-op threads for this process
    shared_gpu: bool  # several local peers on one GPU (gloo, logits staged through host memory)


def host_cpus() -> int:
    """The CPUs this process may use: its affinity mask, and no more than SLURM gives the job step on this node
    (``SLURM_CPUS_ON_NODE``, set afresh for the batch step and every srun step) where the cluster does not bind
    tasks to CPUs (``TaskPlugin=task/none`` leaves the mask at the whole node)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        cpus = os.cpu_count() or 1
    slurm = os.environ.get("SLURM_CPUS_ON_NODE", "")
    return min(cpus, int(slurm)) if slurm.isdigit() and int(slurm) > 0 else cpus


def gpu_uuids() -> list[str]:
    """The identities of this process's visible GPUs (``CUDA_VISIBLE_DEVICES`` order)."""
    return [str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count())]


def _gpu_picks(identities: list) -> tuple[dict, dict]:
    """``(host -> its ranks, rank -> (host, UUID of the GPU it takes))`` from every rank's ``(host, visible
    GPU UUIDs[, node rank])``: local rank l of a host takes its visible GPU ``l mod count`` (torchrun numbers
    a node's ranks contiguously). Ranks that see no GPU take none."""
    by_host: dict = {}
    for r, (host, *_) in enumerate(identities):
        by_host.setdefault(host, []).append(r)
    picks = {
        r: (host, identities[r][1][local % len(identities[r][1])])
        for host, ranks in by_host.items()
        for local, r in enumerate(ranks)
        if identities[r][1]
    }
    return by_host, picks


def assign_gpus(identities: list, rank: int) -> tuple[int, bool]:
    """``(visible GPU index for rank, whether any rank of the job shares its GPU)`` from every rank's
    ``(host, visible GPU UUIDs)``. Local rank l of a host takes its visible GPU ``l mod count``, as the
    count rule did; "shared" comes from the physical identities, two ranks of a host on one UUID. A
    launcher that shows each process only its own GPU (SLURM ``--gpus-per-task=1``, Kubernetes) is then
    one GPU per rank (NCCL), where counts alone (2 ranks, 1 visible GPU) said shared. One answer for the
    whole job, so every rank picks the same backend."""
    by_host, picks = _gpu_picks(identities)
    local = by_host[identities[rank][0]].index(rank)
    return local % len(identities[rank][1]), len(set(picks.values())) < len(picks)


def gpu_sharers(identities: list, rank: int) -> int:
    """How many ranks of the job use ``rank``'s physical GPU (the same picks as ``assign_gpus``): the
    memory budget splits that GPU's memory between them, whatever each process sees of the node."""
    picks = _gpu_picks(identities)[1]
    return max(1, sum(p == picks.get(rank) for p in picks.values()))


def exchange_identities(store, rank: int, world: int) -> list:
    """Every rank's ``(host, visible GPU UUIDs, node rank)`` through the rendezvous store, before the process
    group exists (the backend depends on the GPUs' answer). Runs on CPU too (no UUIDs), so the CPU tests take
    this path at every start and restart. Keyed by rank alone, never by ``TORCHELASTIC_RESTART_COUNT``: the
    agents of a job disagree on that count after a membership change, and a rank would wait for keys nobody
    writes. Each attempt has a store of its own with ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` (rank 0 hosts
    it), which restarts need anyway and the launch scripts export."""
    store.set(f"dml_ids/{rank}", json.dumps([socket.gethostname(), gpu_uuids(), int(os.environ.get("GROUP_RANK", 0))]))
    identities = [json.loads(store.get(f"dml_ids/{r}")) for r in range(world)]
    check_node_numbering(identities, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return identities


def check_node_numbering(identities: list, local_world_size: int) -> None:
    """The decode groups and the rank order take node ``rank // LOCAL_WORLD_SIZE``: torchrun's numbering.
    A launcher that numbers otherwise is refused in one line rather than decoding the wrong rows."""
    for r, ident in enumerate(identities):
        if len(ident) > 2 and ident[2] != r // max(1, local_world_size):
            raise DMLError(
                f"rank {r} runs on node {ident[2]}, but ranks must be numbered node by node with the "
                f"same --nproc_per_node={local_world_size} on every node; start every node alike"
            )


def resolve_placement(
    local_rank: int,
    local_world_size: int,
    num_gpus: int,
    device: str = "auto",
    backend: str = "auto",
    cpu_count: int | None = None,
    assignment: tuple[int, bool] | None = None,
) -> Placement:
    """Map a local rank to a device and a backend.

    - one GPU per local peer: ``cuda:<local_rank>`` with NCCL;
    - more local peers than GPUs: peers share GPUs round-robin with gloo (NCCL refuses two ranks on one
      GPU), logits go through host memory for the all-gather;
    - no GPU (or ``device=cpu``): CPU with gloo, the cores split between the local processes.

    ``assignment``: ``assign_gpus``'s answer from the GPUs' identities (under a launcher); without it,
    counts decide (local ranks > visible GPUs = shared).
    """
    cpus = cpu_count or host_cpus()
    threads = max(1, cpus // max(1, local_world_size))
    if device == "auto":
        device = "cuda" if num_gpus > 0 else "cpu"
    if device == "cpu":
        if backend == "nccl":
            raise DMLError("backend=nccl needs GPUs but device=cpu; use backend=gloo (or auto)")
        return Placement("cpu", "gloo", threads, False)
    if num_gpus < 1:
        raise DMLError("device=cuda but no GPU is visible; use device=cpu or device=auto")
    index, shared = assignment if assignment is not None else (local_rank % num_gpus, local_world_size > num_gpus)
    if backend == "nccl" and shared:
        raise DMLError(
            f"{local_world_size} peers on {num_gpus} GPU(s): NCCL refuses two ranks on one GPU; "
            f"use backend=gloo (or auto)"
        )
    chosen = backend if backend != "auto" else ("gloo" if shared else "nccl")
    return Placement(f"cuda:{index}", chosen, threads, shared)


def process_group_backend(placement: Placement) -> str:
    """The backend string for ``init_process_group``: always a CPU backend, NCCL for CUDA tensors when
    the placement chose NCCL (see the module docstring)."""
    return "cpu:gloo,cuda:nccl" if placement.backend == "nccl" else "gloo"
