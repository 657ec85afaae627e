"""The Deep Mutual Learning objective (Zhang et al., CVPR 2018, eq. 10) and its ensemble-teacher variant."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

MUTUAL = ("dml", "ensemble")


class DMLLoss(NamedTuple):
    total: torch.Tensor
    ce: torch.Tensor
    kl: torch.Tensor


def _mutual_term(
    logits: torch.Tensor, peers: torch.Tensor, t: float, mutual: str, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """``weights`` [N-1] (the other peers' ``mutual_weights``, summing to 1): a weighted mean over the peers
    instead of the plain one (None: the plain mean, today's loss bit for bit)."""
    log_p_i = F.log_softmax(logits.float() / t, dim=-1)  # [B, C]
    log_p_j = F.log_softmax(peers.float() / t, dim=-1)  # [N-1, B, C]
    if mutual == "ensemble":
        # KDCL's naive ensemble teacher: the mean of the other peers' softened probabilities.
        q = log_p_j.exp().mean(0) if weights is None else torch.einsum("j,jbc->bc", weights, log_p_j.exp())
        log_q = q.clamp_min(1e-30).log()
        return (q * (log_q - log_p_i)).sum(-1).mean() * (t * t)
    # KL(p_j || p_i) = sum_c p_j (log p_j - log p_i), per sample, then mean over batch and peers.
    kl = (log_p_j.exp() * (log_p_j - log_p_i.unsqueeze(0))).sum(-1)  # [N-1, B]
    if weights is None:
        return kl.mean() * (t * t)
    return (weights @ kl).mean() * (t * t)


def _loss(
    logits: torch.Tensor,
    peer_logits,
    targets: torch.Tensor,
    temperature: float = 1.0,
    kl_weight: float = 1.0,
    mutual: str = "dml",
    weights=None,
) -> DMLLoss:
    if mutual not in MUTUAL:
        raise ValueError(f"mutual must be one of {MUTUAL}, got {mutual!r}")
    ce = F.cross_entropy(logits, targets)
    if isinstance(peer_logits, torch.Tensor):
        peers = peer_logits.detach()
    else:
        peers = (
            torch.stack([p.detach() for p in peer_logits]) if len(peer_logits) else logits.new_empty(0, *logits.shape)
        )
    if peers.shape[0] == 0:
        kl = torch.zeros((), dtype=logits.dtype, device=logits.device)
    else:
        if weights is not None:
            weights = torch.as_tensor(weights, dtype=torch.float32, device=logits.device)
            weights = weights / weights.sum()
        kl = _mutual_term(logits, peers, float(temperature), mutual, weights)
    return DMLLoss(ce + kl_weight * kl, ce, kl)


# ---------------------------------------------------------------------------------------------------
# The exchange without the peers' logits (``exchange: all_reduce``).
#
# With q_k = softmax(z_k / T) (detached) and log p_i = log_softmax(z_i / T) (this peer's, with gradient),
# S = sum_k q_k over all N peers and h_k = sum_c q_k log q_k (peer k's negative entropy), per sample:
#
#   sum_{j != i} KL(q_j || p_i) = sum_{j != i} sum_c q_j log q_j - sum_c (sum_{j != i} q_j) log p_i
#                               = (H - h_i) - sum_c (S - q_i) log p_i,          H = sum_k h_k.
#
# The gradient with respect to z_i flows only through log p_i, so it needs only the B x C sum S; the
# value also needs the B-vector H. The ``ensemble`` target (S - q_i) / (N - 1) needs S alone. So one
# all-reduce of the packed [B, C + 1] tensor (S | H), fp32, replaces the all-gather of N x B x C logits:
# the same loss and the same gradient, up to float rounding (S - q_i cancels this rank's own term).
#
# With ``mutual_weights`` w_k, peer k adds w_k (q_k | h_k) instead: the weighted sums S_w and H_w, and
# (S_w - w_i q_i) / (W - w_i), W = sum_k w_k, is the others' weighted mean, as (S - q_i) / (N - 1) is the plain one.
# ---------------------------------------------------------------------------------------------------


def exchange_payload(logits: torch.Tensor, temperature: float, weight: float | None = None) -> torch.Tensor:
    """This peer's share of the all-reduce: [B, C + 1] float32 = (q | h), times its ``mutual_weights`` entry
    when given; detached (the peers' sums are targets; no gradient crosses the exchange)."""
    log_q = F.log_softmax(logits.detach().float() / float(temperature), dim=-1)
    q = log_q.exp()
    payload = torch.cat([q, (q * log_q).sum(-1, keepdim=True)], dim=-1)
    return payload if weight is None else payload * weight


def loss_from_sums(
    logits: torch.Tensor,
    summed: torch.Tensor,
    peers: int,
    targets: torch.Tensor,
    temperature: float = 1.0,
    kl_weight: float = 1.0,
    mutual: str = "dml",
    own: torch.Tensor | None = None,
    rest_weight: float | None = None,
) -> DMLLoss:
    """``compute_dml_loss`` for a cohort of ``peers`` peers from the all-reduced ``exchange_payload``s
    (``summed`` [B, C + 1]: S and H) instead of the other peers' logits: the same value and gradient up
    to float rounding (not bit for bit). ``own``: this rank's payload as it went into the sum (computed
    here when not given). ``rest_weight``: the other peers' ``mutual_weights`` summed (W - w_i), when the
    payloads were weighted; None: N - 1."""
    if mutual not in MUTUAL:
        raise ValueError(f"mutual must be one of {MUTUAL}, got {mutual!r}")
    ce = F.cross_entropy(logits, targets)
    if peers < 2:
        return DMLLoss(ce, ce, torch.zeros((), dtype=logits.dtype, device=logits.device))
    t = float(temperature)
    log_p_i = F.log_softmax(logits.float() / t, dim=-1)  # [B, C], with gradient
    own = exchange_payload(logits, t) if own is None else own
    rest = (summed - own) / (peers - 1 if rest_weight is None else rest_weight)  # the others' mean: (q | h)
    q_rest = rest[:, :-1].clamp_min(0.0)  # rounding can leave -1e-9 after the cancel
    if mutual == "ensemble":
        log_q = q_rest.clamp_min(1e-30).log()
        kl = (q_rest * (log_q - log_p_i)).sum(-1).mean() * (t * t)
    else:
        kl = (rest[:, -1] - (q_rest * log_p_i).sum(-1)).mean() * (t * t)
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
      ``weights=[w_j]`` (one per other peer, ``mutual_weights``) makes both means weighted ones.
    - ``compute_dml_loss(models, x, y, model_idx, temperature=1.0, kl_weight=1.0)`` (the original API) ->
      the total loss tensor of ``models[model_idx]`` on batch ``x, y``; the other models run under
      ``no_grad``.
    """
    if args and _is_models(args[0]):
        return _loss_of_models(*args, **kwargs)
    return _loss(*args, **kwargs)


def _loss_of_models(
    models: Sequence[nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    model_idx: int,
    temperature: float = 1.0,
    kl_weight: float = 1.0,
    mutual: str = "dml",
) -> torch.Tensor:
    logits = models[model_idx](x)
    with torch.no_grad():
        peers = [m(x) for k, m in enumerate(models) if k != model_idx]
    return _loss(logits, peers, y, temperature, kl_weight, mutual).total
