"""The Deep Mutual Learning objective (Zhang et al., CVPR 2018, eq. 10) and its ensemble-teacher variant."""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

MUTUAL = ("dml", "ensemble")


class DMLLoss(NamedTuple):
    total: torch.Tensor
    ce: torch.Tensor
    kl: torch.Tensor


def _mutual_term(logits: torch.Tensor, peers: torch.Tensor, t: float, mutual: str) -> torch.Tensor:
    log_p_i = F.log_softmax(logits.float() / t, dim=-1)            # [B, C]
    log_p_j = F.log_softmax(peers.float() / t, dim=-1)              # [N-1, B, C]
    if mutual == "ensemble":
        # KDCL's naive ensemble teacher: the mean of the other peers' softened probabilities.
        q = log_p_j.exp().mean(0)
        log_q = q.clamp_min(1e-30).log()
        return (q * (log_q - log_p_i)).sum(-1).mean() * (t * t)
    # KL(p_j || p_i) = sum_c p_j (log p_j - log p_i), per sample, then mean over batch and peers.
    return (log_p_j.exp() * (log_p_j - log_p_i.unsqueeze(0))).sum(-1).mean() * (t * t)


def _loss(logits: torch.Tensor, peer_logits, targets: torch.Tensor, temperature: float = 1.0,
          kl_weight: float = 1.0, mutual: str = "dml") -> DMLLoss:
    if mutual not in MUTUAL:
        raise ValueError(f"mutual must be one of {MUTUAL}, got {mutual!r}")
    ce = F.cross_entropy(logits, targets)
    if isinstance(peer_logits, torch.Tensor):
        peers = peer_logits.detach()
    else:
        peers = torch.stack([p.detach() for p in peer_logits]) if len(peer_logits) else logits.new_empty(0, *logits.shape)
    if peers.shape[0] == 0:
        kl = torch.zeros((), dtype=logits.dtype, device=logits.device)
    else:
        kl = _mutual_term(logits, peers, float(temperature), mutual)
    return DMLLoss(ce + kl_weight * kl, ce, kl)


def kl_ramp(kl_weight: float, warmup_epochs: int, steps_per_epoch: int, epoch: int, step: int) -> float:
    """The mutual term's weight at ``step`` (from 0) of ``epoch`` (from 1): linear from 0 at the first step
    to ``kl_weight`` after ``warmup_epochs`` epochs, per step; ``kl_weight`` throughout without warm-up. A
    function of (epoch, step) alone, so a resumed run continues the same ramp."""
    if warmup_epochs <= 0:
        return kl_weight
    return kl_weight * min(1.0, ((epoch - 1) * steps_per_epoch + step) / (warmup_epochs * steps_per_epoch))


def _is_models(obj) -> bool:
    return isinstance(obj, (list, tuple, nn.ModuleList)) and len(obj) > 0 and all(isinstance(m, nn.Module) for m in obj)


def compute_dml_loss(*args, **kwargs):
    """Two call forms, told apart by the first argument's type.

    - ``compute_dml_loss(logits, peer_logits, targets, temperature=1.0, kl_weight=1.0, mutual="dml")`` ->
      ``DMLLoss(total, ce, kl)``: peer i's loss ``CE(y, z_i) + kl_weight * T^2 / (N-1) * sum_{j != i}
      KL(p_j || p_i)``. ``logits``: this peer's [B, C]; ``peer_logits``: the other N-1 peers', a [N-1, B, C]
      tensor or a list of [B, C] tensors (empty for N=1). ``p = softmax(z / T)``; the cross-entropy uses
      the plain logits (T only softens the mutual term; T^2 keeps its gradient scale independent of T, as
      in knowledge distillation). Peer predictions are targets: detached, gradients reach only ``logits``.
      KL is summed over classes and averaged over the batch. ``mutual="ensemble"`` replaces the mean of
      KLs by one KL from the mean of the other peers' softened probabilities (KDCL's naive ensemble).
    - ``compute_dml_loss(models, x, y, model_idx, temperature=1.0, kl_weight=1.0)`` (the original API) ->
      the total loss tensor of ``models[model_idx]`` on batch ``x, y``; the other models run under
      ``no_grad``.
    """
    if args and _is_models(args[0]):
        return _loss_of_models(*args, **kwargs)
    return _loss(*args, **kwargs)


def _loss_of_models(models: Sequence[nn.Module], x: torch.Tensor, y: torch.Tensor, model_idx: int,
                    temperature: float = 1.0, kl_weight: float = 1.0, mutual: str = "dml") -> torch.Tensor:
    logits = models[model_idx](x)
    with torch.no_grad():
        peers = [m(x) for k, m in enumerate(models) if k != model_idx]
    return _loss(logits, peers, y, temperature, kl_weight, mutual).total
