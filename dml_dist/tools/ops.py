"""ATen operations per step (each one a kernel launch on a GPU): what ``dml-bench``'s ``ops_per_step`` reports."""

from __future__ import annotations

from torch.utils._python_dispatch import TorchDispatchMode

from ..engine import Peer, forward, peer_update
from ..exchange import exchange


class OpCounter(TorchDispatchMode):
    """Counts the ATen operations dispatched while it is active (each one a kernel launch on a GPU), per
    ``phase`` (set it between the parts of a step)."""

    def __init__(self):
        super().__init__()
        self.ops, self.collectives = 0, []  # collectives: the c10d operations, by name, in order
        self.phase, self.by_phase = "", {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        self.by_phase[self.phase] = self.by_phase.get(self.phase, 0) + 1
        if str(func).startswith("c10d."):
            self.collectives.append(str(func))
        return func(*args, **(kwargs or {}))


def ops_per_step(peer: Peer, plain, batches, ctx, cfg, mode: str) -> dict:
    """ATen operations of one steady-state DML step (batch, augmentation and upload, forward, exchange,
    loss, backward, optimizer, meters, DDP's gradient buckets), and of the peer's own module (``plain``: no DDP, not
    compiled) forward and backward on the same kind of batch (``logits.sum().backward()``): the difference is what the
    step adds around the model, the part that fusing and compiling can remove. ``collectives``: the c10d operations the
    step ran (which exchange ran, seen where it happens)."""
    with OpCounter() as step:
        step.phase = "batch"  # sampling, augmentation, upload
        x, y = next(batches)
        step.phase = "forward"
        logits = forward(peer.model, x, peer.amp, peer.channels_last)
        step.phase = "exchange"
        all_logits = exchange(logits, ctx, mode, cfg["temperature"])
        step.phase = "update"  # loss, backward, optimizer, the step's meters
        peer_update(
            logits,
            all_logits,
            ctx.peer,
            y,
            peer.optimizer,
            cfg["temperature"],
            cfg["kl_weight"],
            cfg["mutual"],
            peer.scaler,
            score=peer.score,
        )
    x, _ = next(batches)
    with OpCounter() as alone:
        forward(plain, x, peer.amp, peer.channels_last).float().sum().backward()
    peer.optimizer.zero_grad(set_to_none=True)
    return {
        "step": step.ops,
        "model_forward_backward": alone.ops,
        "outside_model": step.ops - alone.ops,
        "phases": step.by_phase,  # forward + update - model_forward_backward: the loss, optimizer, meters
        "collectives": sorted(set(step.collectives)),
        "counted": "eager" if cfg["compile"] else "as run",
    }  # dynamo runs no compiled code under a dispatch mode
