"""Process-group setup, device placement and the few collectives DML needs.

Peers are not replicas: there is no DDP wrapper and no SyncBN. Ranks talk only to exchange logits
(one all-gather per step), batch fingerprints, validation logits and checkpoint state. Every function
here is a collective: call it on every rank. With world size 1 they short-circuit.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Optional

import torch
import torch.distributed as dist

from .errors import DMLError

TIMEOUT = timedelta(seconds=int(os.environ.get("DML_DIST_TIMEOUT", "600")))


@dataclass(frozen=True)
class Placement:
    device: str        # "cpu" or "cuda:<i>"
    backend: str       # "gloo" or "nccl"
    threads: int       # torch intra-op threads for this process
    shared_gpu: bool   # several local peers on one GPU (gloo, logits staged through host memory)


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def resolve_placement(local_rank: int, local_world_size: int, num_gpus: int, device: str = "auto",
                      backend: str = "auto", cpu_count: Optional[int] = None) -> Placement:
    """Map a local rank to a device and a backend.

    - one GPU per local peer: ``cuda:<local_rank>`` with NCCL;
    - more local peers than GPUs: peers share GPUs round-robin with gloo (NCCL refuses two ranks on one
      GPU), logits go through host memory for the all-gather;
    - no GPU (or ``device=cpu``): CPU with gloo, the cores split between the local processes.
    """
    cpus = cpu_count or _cpu_count()
    threads = max(1, cpus // max(1, local_world_size))
    if device == "auto":
        device = "cuda" if num_gpus > 0 else "cpu"
    if device == "cpu":
        if backend == "nccl":
            raise DMLError("backend=nccl needs GPUs but device=cpu; use backend=gloo (or auto)")
        return Placement("cpu", "gloo", threads, False)
    if num_gpus < 1:
        raise DMLError("device=cuda but no GPU is visible; use device=cpu or device=auto")
    shared = local_world_size > num_gpus
    if backend == "nccl" and shared:
        raise DMLError(f"{local_world_size} peers on {num_gpus} GPU(s): NCCL refuses two ranks on one GPU; "
                       f"use backend=gloo (or auto)")
    chosen = backend if backend != "auto" else ("gloo" if shared else "nccl")
    return Placement(f"cuda:{local_rank % num_gpus}", chosen, threads, shared)


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    placement: Placement

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        return torch.device(self.placement.device)

    @property
    def restart_count(self) -> int:
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))

    def describe(self) -> dict:
        return {"rank": self.rank, "host": socket.gethostname(), "device": self.placement.device,
                "backend": self.placement.backend, "threads": self.placement.threads}


def init_distributed(cfg: dict) -> DistContext:
    """Read torchrun's environment, place this rank, set threads/device, init the process group."""
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    num_gpus = torch.cuda.device_count() if cfg["device"] != "cpu" else 0
    placement = resolve_placement(local_rank, local_world, num_gpus, cfg["device"], cfg["backend"])
    torch.set_num_threads(placement.threads)
    if placement.device.startswith("cuda"):
        torch.cuda.set_device(torch.device(placement.device))
    if world > 1 and not dist.is_initialized():
        kwargs = {"device_id": torch.device(placement.device)} if placement.backend == "nccl" else {}
        dist.init_process_group(placement.backend, timeout=TIMEOUT, **kwargs)
    return DistContext(rank, world, local_rank, local_world, placement)


def is_peer_loss(e: BaseException) -> bool:
    """An error a rank gets when another rank died mid-collective (the cause is on that other rank)."""
    text = str(e)
    return isinstance(e, dist.DistError) or (isinstance(e, RuntimeError) and (
        "Connection closed by peer" in text or "Connection reset by peer" in text or "gloo" in text.lower()))


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def _comm_device(t: torch.Tensor) -> torch.device:
    """gloo works on host memory: stage CUDA tensors through the CPU (the shared-GPU placement)."""
    return t.device if dist.get_backend() == "nccl" else torch.device("cpu")


# torch >= 2.12 deprecates all_gather_into_tensor in favour of all_gather_single (same semantics).
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def all_gather_logits(logits: torch.Tensor) -> torch.Tensor:
    """[B, C] on every rank -> [world, B, C], the same on every rank, on ``logits.device``.

    No gradient flows through the result (peers' predictions are targets); the caller keeps its own
    ``logits`` for the backward pass. Sync point: one all-gather per training step.
    """
    if not _active():
        return logits.detach().unsqueeze(0)
    src = logits.detach().contiguous()
    dev = _comm_device(src)
    world = dist.get_world_size()
    # Concatenated layout [world * B, ...]: the one every backend accepts; viewed as [world, B, ...].
    out = torch.empty((world * src.shape[0], *src.shape[1:]), dtype=src.dtype, device=dev)
    _ALL_GATHER(out, src.to(dev))
    return out.view(world, *src.shape).to(logits.device)


def all_gather_tensor(t: torch.Tensor) -> torch.Tensor:
    """Small tensor of equal shape on every rank -> [world, ...] on every rank (fingerprints, meters)."""
    return all_gather_logits(t)


def gather_to_main(t: torch.Tensor) -> Optional[torch.Tensor]:
    """Equal-shaped tensors -> [world, ...] on rank 0 (CPU), None elsewhere. No gradients."""
    if not _active():
        return t.detach().cpu().unsqueeze(0)
    src = t.detach().contiguous()
    dev = _comm_device(src)
    src = src.to(dev)
    parts = [torch.empty_like(src) for _ in range(dist.get_world_size())] if dist.get_rank() == 0 else None
    dist.gather(src, parts, dst=0)
    return torch.stack(parts).cpu() if parts is not None else None


def gather_objects(obj: Any) -> Optional[list]:
    """Picklable object from every rank -> list on rank 0, None elsewhere (checkpoint state: CPU tensors)."""
    if not _active():
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_object(obj: Any = None, src: int = 0) -> Any:
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def scatter_objects(objs: Optional[list]) -> Any:
    """Rank 0's list -> element ``rank`` on every rank (restoring each peer from rank 0's checkpoint)."""
    if not _active():
        return objs[0]
    out = [None]
    dist.scatter_object_list(out, objs if dist.get_rank() == 0 else None, src=0)
    return out[0]


def barrier() -> None:
    if _active():
        dist.barrier()
