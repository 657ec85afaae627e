"""Process groups, placement and the few collectives DML needs: setup (torchrun's environment -> the group),
placement (devices, threads, backend), layout (ranks -> peers and replicas), groups (subgroups and
timeouts), collectives, context (DistContext).

Peers are not replicas: peers never share a DDP wrapper (a peer's own replicas do, ``parallel.py``). Ranks talk to
exchange logits (one all-gather, or one all-reduce of their softmax sums, per step), batch fingerprints, meters,
validation logits and checkpoint state. Every function here is a collective: call it on every rank.

The collective rule (one rule, every backend):

- The process group always has a CPU backend. With NCCL it is created as ``"cpu:gloo,cuda:nccl"``
  (``process_group_backend``): small host-side collectives (fingerprints, meters, Python objects) go over
  gloo, CUDA tensors (logits) over NCCL. A CPU or shared-GPU placement uses plain ``"gloo"``.
- A tensor is communicated on its own device when the group has a backend for that device type
  (``_comm_device``); otherwise (CUDA tensors in a gloo-only group: peers sharing a GPU) it is staged
  through host memory and the result is copied back.
- Whenever a process group exists, the real collective runs, also in a world of one (torchrun
  ``--nproc_per_node=1``): a one-GPU machine then exercises the same code paths as a node. Only a plain
  process without torchrun (no group) short-circuits."""

from .collectives import (
    ALL_GATHER,
    all_gather,
    all_gather_objects,
    all_gather_start,
    all_reduce_sum,
    barrier,
    broadcast_object,
    comm_device,
    gather_objects,
    gather_to_main,
    scatter_objects,
)
from .context import DistContext, ranks_of
from .groups import (
    collective_timeout,
    decode_group,
    group_size,
    group_timeout,
    host_group,
    is_active,
    local_rank,
    long_group,
    node_group,
    rank,
    stall_margin,
    stall_timeout,
)
from .layout import choose_rank_order, decodes_per_sample, layout_groups, replica_layout
from .setup import (
    agree_restart_count,
    destroy_distributed,
    init_distributed,
    log_start,
    ranks_on_my_gpu,
    under_launcher,
)

__all__ = [
    "ALL_GATHER",
    "DistContext",
    "agree_restart_count",
    "all_gather",
    "all_gather_objects",
    "all_gather_start",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "choose_rank_order",
    "collective_timeout",
    "comm_device",
    "decode_group",
    "decodes_per_sample",
    "destroy_distributed",
    "gather_objects",
    "gather_to_main",
    "group_size",
    "group_timeout",
    "host_group",
    "init_distributed",
    "is_active",
    "layout_groups",
    "local_rank",
    "log_start",
    "long_group",
    "node_group",
    "rank",
    "ranks_of",
    "ranks_on_my_gpu",
    "replica_layout",
    "scatter_objects",
    "stall_margin",
    "stall_timeout",
    "under_launcher",
]
