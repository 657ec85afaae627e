"""How a peer's model is wrapped: data-parallel replicas (DDP over the ``replica`` group, optional SyncBN within it)
and what ``torch.compile`` made of it.

Peers are never wrapped together: each peer's replicas form their own group (``DistContext.replica_group``)
and DDP averages gradients there only; the logits travel over the ``peer`` group. Over equal shards, DDP's
average of the replicas' gradients is the gradient of the whole batch, except through BatchNorm, whose
batch statistics are per shard unless ``sync_bn`` computes them over the peer's whole batch.

PyTorch's ``nn.SyncBatchNorm`` runs on GPUs only (its kernels have no CPU version). On CPU the same rule
is carried out by ``CPUSyncBatchNorm``: batch mean and variance of the replica group's combined batch
through autograd-aware all-reduces (``torch.distributed.nn.functional.all_reduce``), so tests on gloo see
exactly what a GPU run computes.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.nn as nn

from . import distributed as D
from .distributed import DistContext

# The autograd-aware all_reduce is deprecated in favour of a private module; it still works and is public.
warnings.filterwarnings("ignore", message="torch.distributed.nn.functional.all_reduce is deprecated")


class CPUSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics come from every replica's shard (CPU twin of SyncBatchNorm).

    Two-pass statistics (mean, then centred second moment), each one all-reduce; gradients flow through
    the all-reduces, so every replica's backward sees the whole batch's statistics, as in SyncBatchNorm.
    """

    def __init__(self, bn: nn.BatchNorm2d, group):
        super().__init__(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
        self.load_state_dict(bn.state_dict())
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        c = x.shape[1]
        count = x.new_full((1,), float(x.numel() // c))
        total = all_reduce(torch.cat([x.sum((0, 2, 3)), count]), group=self.group)
        n = total[c]
        mean = total[:c] / n
        centred = x - mean.view(1, c, 1, 1)
        var = all_reduce(centred.pow(2).sum((0, 2, 3)), group=self.group) / n
        if self.track_running_stats:
            with torch.no_grad():
                m = self.momentum if self.momentum is not None else 0.0
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1).clamp_min(1), alpha=m)
                self.num_batches_tracked.add_(1)
        y = centred * torch.rsqrt(var + self.eps).view(1, c, 1, 1)
        if self.affine:
            y = y * self.weight.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)
        return y


def convert_sync_batchnorm(model: nn.Module, group, device: torch.device) -> nn.Module:
    """BatchNorm -> SyncBatchNorm within ``group`` (GPU: PyTorch's own; CPU: ``CPUSyncBatchNorm``)."""
    if device.type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group=group)

    def convert(module: nn.Module) -> nn.Module:
        if isinstance(module, nn.BatchNorm2d) and not isinstance(module, CPUSyncBatchNorm):
            return CPUSyncBatchNorm(module, group)
        for name, child in module.named_children():
            module.add_module(name, convert(child))
        return module

    return convert(model)


def separate_replica_group(ctx: DistContext):
    """A second group over this peer's replicas (collective: every rank creates every group), so that
    SyncBN's all-reduces in backward never interleave with DDP's gradient buckets on one communicator."""
    groups = [dist.new_group(ctx.ranks_of(k), timeout=D.group_timeout()) for k in range(ctx.peers)]
    return groups[ctx.peer]


def wrap_replicas(
    model: nn.Module, ctx: DistContext, sync_bn: bool, frozen: bool = False
) -> tuple[nn.Module, nn.Module]:
    """-> (model to keep: its state dict is the peer's, model to train with). With one replica, or for a
    frozen peer (no gradients to average), both are ``model``; otherwise the second is DDP over the replica
    group."""
    group = ctx.replica_group
    if sync_bn and max(ctx.layout) > 1 and ctx.device.type == "cpu":
        group = separate_replica_group(ctx)  # collective: every rank, a peer with one replica too
    if ctx.replicas == 1 or frozen:
        return model, model
    from torch.nn.parallel import DistributedDataParallel as DDP

    if sync_bn:
        model = convert_sync_batchnorm(model, group, ctx.device)
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return model, DDP(model, device_ids=device_ids, process_group=ctx.replica_group)


def take_first_replica_buffers(model: nn.Module, ctx: DistContext) -> None:
    """Collective within each peer's replica group: every replica takes replica 0's buffers (BatchNorm's
    running statistics, which each replica updates from its own shard without SyncBN), so that what is
    evaluated is what is saved (checkpoints hold replica 0's state). Training is unchanged: DDP broadcasts
    replica 0's buffers before each forward anyway."""
    if ctx.replicas == 1:
        return
    src = ctx.ranks_of(ctx.peer)[0]
    for buf in model.buffers():
        dist.broadcast(buf, src, group=ctx.replica_group)


# torch.compile's modes that replay the compiled graphs as CUDA graphs, and what each becomes where they cannot
CUDA_GRAPH_MODES = {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}


def compile_choice(setting, device: torch.device, replicas: int) -> tuple[str | None, str]:
    """``compile`` as it runs for one peer, and why: None (eager) or torch.compile's mode. ``reduce-overhead``
    (and ``max-autotune``) replay each step's kernels as CUDA graphs (one launch where a CIFAR ResNet makes
    hundreds); that needs a CUDA device, and a peer without DDP (``replicas``: the replicas that DDP averages):
    DDP's gradient hooks and its bucketed all-reduces run between the graphs of the backward. Elsewhere the
    peer compiles in the same mode without CUDA graphs, and the log says so."""
    if setting is False:
        return None, "off"
    mode = "default" if setting is True else setting
    if mode not in CUDA_GRAPH_MODES:
        return mode, f"compile={mode}"
    fallback = CUDA_GRAPH_MODES[mode]
    if device.type != "cuda":
        return fallback, f"{mode}: CUDA graphs need a CUDA device; mode {fallback} instead"
    if replicas > 1:
        return fallback, f"{mode}: CUDA graphs are not used over DDP ({replicas} replicas); mode {fallback} instead"
    return mode, f"compile={mode}: CUDA graphs"


def dynamo_counts() -> tuple[int, int, int]:
    """(graphs compiled, graph breaks, inductor's CUDA-graph skip events: a forward or backward graph, compiled or
    loaded from its cache, that runs without the CUDA graphs its mode asked for) so far in this process, from
    dynamo's private counters; zeros when they cannot be read (a log line must never stop training)."""
    try:
        from torch._dynamo.utils import counters

        return (
            int(counters["stats"]["unique_graphs"]),
            int(sum(counters["graph_break"].values())),
            int(counters["inductor"]["cudagraph_skips"]),
        )
    except Exception:  # noqa: BLE001
        return 0, 0, 0


class CompiledPart:
    """torch.compile of one of the step's functions around the model (``batch_transform``: augmentation with
    normalisation; ``score_step``: the loss with the meters' statistics) in the peer's mode without CUDA graphs
    (``CUDA_GRAPH_MODES``: the statistics outlive the step, and a CUDA graph's outputs are overwritten by its
    next replay). ``graphs`` counts the graphs its own calls compiled: the compile report's proof that it runs
    compiled (dynamo's counters are host-side numbers: reading them costs no device sync)."""

    def __init__(self, fn, mode: str, name: str):
        self.fn, self.name, self.graphs = torch.compile(fn, mode=CUDA_GRAPH_MODES.get(mode, mode)), name, 0

    def __call__(self, *args):
        before = dynamo_counts()[0]
        out = self.fn(*args)
        self.graphs += dynamo_counts()[0] - before
        return out


def compile_report(model, before: tuple[int, int, int], mode: str | None = None, parts=()) -> str:
    """What torch.compile did in the first epoch (dynamo's counters since ``before``, so a caller's own
    compiled graphs do not count): proof that the peer really runs compiled, how often dynamo fell back to
    eager, and with CUDA graphs, inductor's skip events (a graph it partitions around an operation CUDA graphs
    cannot take is not one); then the graphs of each ``CompiledPart`` among them."""
    graphs, breaks, skips = (now - then for now, then in zip(dynamo_counts(), before))
    line = f"compile: {type(model).__name__}, {graphs} graph(s) compiled, {breaks} graph break(s) in the first epoch"
    if mode in CUDA_GRAPH_MODES:
        line += f", {skips} CUDA-graph skip(s)"
    if parts:
        line += "; of them " + ", ".join(f"{p.name} {p.graphs}" for p in parts)
    return line
