"""The Deep Mutual Learning objective (Zhang et al., CVPR 2018, eq. 10)."""
from __future__ import annotations

from typing import NamedTuple, Sequence, Union

import torch
import torch.nn.functional as F


class DMLLoss(NamedTuple):
    total: torch.Tensor
    ce: torch.Tensor
    kl: torch.Tensor


def compute_dml_loss(logits: torch.Tensor, peer_logits: Union[torch.Tensor, Sequence[torch.Tensor]],
                     targets: torch.Tensor, temperature: float = 1.0, kl_weight: float = 1.0) -> DMLLoss:
    """Loss of peer i: ``CE(y, z_i) + kl_weight * T^2 / (N-1) * sum_{j != i} KL(p_j || p_i)``.

    ``logits``: this peer's logits [B, C]. ``peer_logits``: the other N-1 peers' logits, a [N-1, B, C]
    tensor or a list of [B, C] tensors (empty for N=1). ``p = softmax(z / T)``. The cross-entropy uses the
    plain logits (T only softens the mutual term; T^2 keeps its gradient scale independent of T, as in
    knowledge distillation). Peer predictions are targets: they are detached, so gradients reach only
    ``logits``. KL is summed over classes and averaged over the batch. With no peers the result is plain
    cross-entropy (kl = 0).
    """
    ce = F.cross_entropy(logits, targets)
    if isinstance(peer_logits, torch.Tensor):
        peers = peer_logits.detach()
    else:
        peers = torch.stack([p.detach() for p in peer_logits]) if len(peer_logits) else logits.new_empty(0, *logits.shape)
    if peers.shape[0] == 0:
        kl = torch.zeros((), dtype=logits.dtype, device=logits.device)
    else:
        t = float(temperature)
        log_p_i = F.log_softmax(logits.float() / t, dim=-1)           # [B, C]
        log_p_j = F.log_softmax(peers.float() / t, dim=-1)             # [N-1, B, C]
        # KL(p_j || p_i) = sum_c p_j (log p_j - log p_i), per sample, then mean over batch and peers.
        kl = (log_p_j.exp() * (log_p_j - log_p_i.unsqueeze(0))).sum(-1).mean() * (t * t)
    return DMLLoss(ce + kl_weight * kl, ce, kl)
