"""Process-group set-up: read torchrun's environment, place this rank (``placement.py``), form the group and the
layout's subgroups, and tear it all down."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from .collectives import all_gather, gather_objects
from .context import DistContext
from .groups import _GROUPS, collective_timeout, stall_margin
from .layout import choose_rank_order, layout_groups, replica_layout
from .placement import assign_gpus, exchange_identities, gpu_sharers, process_group_backend, resolve_placement

_SHARERS: dict = {}  # "gpu": ranks of the job on this rank's physical GPU (from the identity exchange)


def ranks_on_my_gpu() -> int | None:
    """Ranks of the job that use this rank's physical GPU, as the identity exchange found (None: unknown,
    no launcher or no GPU)."""
    return _SHARERS.get("gpu")


def under_launcher() -> bool:
    """True in a process started by torchrun / the elastic launcher (a rendezvous to join)."""
    return "MASTER_ADDR" in os.environ and "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(cfg: dict) -> DistContext:
    """Read torchrun's environment, place this rank, set threads/device, init the process group (under a
    launcher always, also for a world of one, so the real collectives run)."""
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    num_gpus = torch.cuda.device_count() if cfg["device"] != "cpu" else 0
    _GROUPS["detect"] = collective_timeout(cfg)
    _GROUPS["timeout"] = _GROUPS["detect"] + stall_margin(_GROUPS["detect"])
    store, assignment = None, None
    if under_launcher() and not dist.is_initialized():
        # Which physical GPU each rank gets decides the backend, so ask every rank before the group (on CPU
        # the same exchange checks the node numbering).
        store, rank, world = next(dist.rendezvous("env://", timeout=_GROUPS["timeout"]))
        identities = exchange_identities(store, rank, world)
        assignment = assign_gpus(identities, rank) if num_gpus > 0 else None
        _SHARERS["gpu"] = gpu_sharers(identities, rank) if num_gpus > 0 else None
    placement = resolve_placement(
        local_rank, local_world, num_gpus, cfg["device"], cfg["backend"], assignment=assignment
    )
    torch.set_num_threads(placement.threads)
    if placement.device.startswith("cuda"):
        torch.cuda.set_device(torch.device(placement.device))
    if under_launcher() and not dist.is_initialized():
        kwargs = {"device_id": torch.device(placement.device)} if placement.backend == "nccl" else {}
        if store is not None:  # namespaced as init_process_group's own rendezvous does it
            kwargs.update(store=dist.PrefixStore("default_pg", store), rank=rank, world_size=world)
        dist.init_process_group(process_group_backend(placement), timeout=_GROUPS["timeout"], **kwargs)
    if under_launcher() and dist.is_initialized():
        agree_restart_count()
    layout = replica_layout(cfg, world)
    if dist.is_initialized() and layout is not None and max(layout) > 1:
        order, why = choose_rank_order(cfg, layout, local_world)
        peer_group, replica_group = layout_groups(layout, order, rank, process_group_backend(placement))
        return DistContext(
            rank, world, local_rank, local_world, placement, layout, peer_group, replica_group, order, why
        )
    return DistContext(rank, world, local_rank, local_world, placement, layout or (1,) * world)


def agree_restart_count() -> int:
    """Collective: the highest torchrun restart count of any rank, written back to this process's
    ``TORCHELASTIC_RESTART_COUNT``. Hack: each node's agent counts its own restarts, and an agent restarted
    because another node re-joined the rendezvous does not count it, so nodes can disagree; every rank must
    take the same resume decision and use the same store keys."""
    mine = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    agreed = int(all_gather(torch.tensor([mine])).max())
    os.environ["TORCHELASTIC_RESTART_COUNT"] = str(agreed)
    return agreed


def destroy_distributed() -> None:
    _GROUPS.clear()
    if dist.is_initialized():
        dist.destroy_process_group()


def log_start(ctx: DistContext, log, cfg: dict, asked_replicas) -> None:
    """Collective: what start-up decided (the replicas, the rank order, every rank's placement)."""
    shared_store = os.environ.get("TORCH_DISABLE_SHARE_RDZV_TCP_STORE") != "1"
    if int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0 and shared_store:
        log(
            "warning: --max-restarts without TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: restarted gloo "
            "workers can fail to connect (pytorch/pytorch#135712); export it before torchrun"
        )
    if asked_replicas == "auto":
        log(f"replicas: auto = {cfg['replicas']} per peer ({ctx.world_size} processes, {cfg['model_num']} peers)")
    log(f"rank order: {ctx.order} ({ctx.order_why})")
    for p in gather_objects(ctx.describe()) or []:
        log(
            "placement: rank {rank} (peer {peer}, replica {replica}) host {host} device {device} "
            "backend {backend} group {group} threads {threads}".format(**p)
        )
