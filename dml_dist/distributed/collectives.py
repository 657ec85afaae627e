"""The few collectives DML needs, on every backend under one rule (see the package docstring). Every function here
is a collective: call it on every rank of the group."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from .groups import host_group, is_active


def comm_device(t: torch.Tensor) -> torch.device:
    """The device a tensor travels on: its own when the group has a backend for it (CPU: always; CUDA:
    when NCCL is in the group), else host memory (CUDA tensors of peers sharing a GPU over gloo)."""
    if t.device.type == "cpu" or "nccl" in str(dist.get_backend()):
        return t.device
    return torch.device("cpu")


# torch >= 2.12 deprecates all_gather_into_tensor in favour of all_gather_single (same semantics).
ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def all_gather_start(t: torch.Tensor, group=None) -> Callable[[], torch.Tensor]:
    """Start gathering ``t`` ([B, ...], equal shapes) over ``group`` without waiting: returns a function
    that waits and gives [world, B, ...] on ``t.device``. On NCCL the wait only orders the current stream
    after the gather (the host goes on); on gloo the gather runs in the group's thread meanwhile. Every
    rank of ``group`` must start its gathers in the same order."""
    if not is_active():
        return lambda: t.unsqueeze(0)
    src = t.contiguous()
    dev = comm_device(src)
    if dev.type == "cpu":
        group = host_group(group)
    world = dist.get_world_size(group)
    out = torch.empty((world * src.shape[0], *src.shape[1:]), dtype=src.dtype, device=dev)
    work = ALL_GATHER(out, src.to(dev), group=group, async_op=True)

    def wait() -> torch.Tensor:
        work.wait()
        return out.view(world, *src.shape).to(t.device)

    return wait


def all_gather(t: torch.Tensor, group=None) -> torch.Tensor:
    """[B, ...] on every rank (equal shapes) -> [world, B, ...], the same on every rank of ``group``, on
    ``t.device``: the logits of a step, fingerprints, meters. No gradient flows through the result (peers'
    predictions are targets); the caller keeps its own logits for the backward pass."""
    return all_gather_start(t.detach(), group)()


def all_reduce_sum(t: torch.Tensor, group=None) -> torch.Tensor:
    """Elementwise sum of ``t`` over the ranks of ``group``, on every one of them, on ``t.device`` (a new
    tensor; ``t`` is untouched). No gradient flows (the DML exchange's sums are targets). Sync point: with
    ``exchange: all_reduce``, the one collective of a training step."""
    if not is_active():
        return t.detach().clone()
    dev = comm_device(t)
    if dev.type == "cpu":
        group = host_group(group)
    out = t.detach().to(dev, copy=True).contiguous()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out.to(t.device)


def gather_to_main(t: torch.Tensor, group=None) -> torch.Tensor | None:
    """Equal-shaped tensors -> [world, ...] (CPU) on the group's first rank, None elsewhere. No gradients."""
    if not is_active():
        return t.detach().cpu().unsqueeze(0)
    src = t.detach().contiguous()
    src = src.to(comm_device(src))
    if src.device.type == "cpu":
        group = host_group(group)
    first = dist.get_global_rank(group, 0) if group is not None else 0
    parts = [torch.empty_like(src) for _ in range(dist.get_world_size(group))] if dist.get_rank() == first else None
    dist.gather(src, parts, dst=first, group=group)
    return torch.stack(parts).cpu() if parts is not None else None


def gather_objects(obj: Any, group=None) -> list | None:
    """Picklable object from every rank -> list on the group's first rank, None elsewhere. Object
    collectives travel over the group's CPU backend."""
    if not is_active():
        return [obj]
    group = host_group(group)
    first = dist.get_global_rank(group, 0) if group is not None else 0
    out = [None] * dist.get_world_size(group) if dist.get_rank() == first else None
    dist.gather_object(obj, out, dst=first, group=group)
    return out


def all_gather_objects(obj: Any, group=None) -> list:
    """Picklable object from every rank of ``group`` -> the list of all of them, on each of them."""
    if not is_active():
        return [obj]
    group = host_group(group)
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def broadcast_object(obj: Any = None, src: int = 0, group=None) -> Any:
    """``obj`` of global rank ``src`` -> every rank of ``group``."""
    if not is_active():
        return obj
    group = host_group(group)
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def scatter_objects(objs: list | None, group=None) -> Any:
    """The first rank's list -> element ``i`` on the group's i-th rank (restoring peers from rank 0)."""
    if not is_active():
        return objs[0]
    group = host_group(group)
    first = dist.get_global_rank(group, 0) if group is not None else 0
    out = [None]
    dist.scatter_object_list(out, objs if dist.get_rank() == first else None, src=first, group=group)
    return out[0]


def barrier() -> None:
    if is_active():
        dist.barrier(group=host_group())
