"""Where a peer's weights come from (``init_from``, ``pretrained``) and the input statistics they expect.

``init_from`` names, per peer, a dml-dist peer checkpoint (``<exp>_model<k>_best|final|epoch_<e>.pth``) or a plain
``state_dict`` file (torchvision's or timm's), read with ``weights_only=True``. Every data path normalises with
CIFAR-10's statistics; a peer whose inputs need others (the ``normalize`` key, pretrained weights, or the
checkpoint it starts from) gets them from a per-channel affine map in front of its model (``apply_statistics``):
peers with different statistics still see the same batch.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .checkpoint import load_checkpoint
from .data.memory import MEAN, STATISTICS, STD
from .errors import DMLError
from .models import canonical_model_name, pretrained_meta


def _state_dict_of(obj) -> dict | None:
    """A plain state dict, or one under ``state_dict``/``model`` (how other trainers save them), else None."""
    for candidate in (obj, obj.get("state_dict"), obj.get("model")) if isinstance(obj, dict) else ():
        if isinstance(candidate, dict) and candidate and all(isinstance(v, torch.Tensor) for v in candidate.values()):
            return {k.removeprefix("module."): v for k, v in candidate.items()}  # DDP's prefix
    return None


def load_init(path: str, model: nn.Module, arch: str, num_classes: int) -> dict:
    """Load ``path`` into ``model`` (strictly) -> the record of where the weights came from (``path``, ``kind``:
    peer | state_dict, and for a peer checkpoint its ``arch``, ``epoch`` and the ``statistics`` it was trained
    with). A file that does not fit is one line naming what differs."""
    ckpt = load_checkpoint(path, dml_only=False)
    record = {"path": str(path), "kind": "state_dict", "statistics": None}
    if isinstance(ckpt, dict) and ckpt.get("kind") == "cohort":
        raise DMLError(
            f"init_from {path} is a cohort checkpoint (every peer's state, for resume); pass one peer's file "
            f"(<exp>_model<k>_best.pth, _final.pth or _epoch_<e>.pth)"
        )
    if isinstance(ckpt, dict) and ckpt.get("kind") == "peer":
        trained = canonical_model_name(ckpt["arch"])
        if trained != arch:
            raise DMLError(
                f"init_from {path} holds a {trained}, but this peer is a {arch}; give it a {arch} checkpoint"
            )
        if ckpt["num_classes"] != num_classes:
            raise DMLError(
                f"init_from {path} was trained for {ckpt['num_classes']} classes, this data has {num_classes}; "
                f"start from a checkpoint of the same classes"
            )
        state = ckpt["model"]
        k = ckpt.get("peer", 1) - 1
        stats = (ckpt.get("resolved") or {}).get("normalize")  # older files recorded none: normalize decides
        record.update(kind="peer", arch=trained, epoch=ckpt.get("epoch"), statistics=stats[k] if stats else None)
    else:
        state = _state_dict_of(ckpt)
        if state is None:
            raise DMLError(f"init_from {path} holds no state dict (a mapping of parameter names to tensors)")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = next((ln for ln in lines[1:] if "size mismatch" in ln), lines[1] if len(lines) > 1 else lines[0])
        raise DMLError(
            f"init_from {path} does not fit {arch} with {num_classes} classes ({detail[:200]}); give a checkpoint "
            f"of the same architecture and class count"
        ) from None
    return record


def peer_statistics(cfg: dict, arch: str, record: dict | None) -> tuple[list[list[float]], str]:
    """The (mean, std) this peer's inputs get, and why: those of the checkpoint it starts from, else of the
    pretrained weights it starts from (their own metadata), else the ``normalize`` key's."""
    if record is not None and record["statistics"] is not None:
        return record["statistics"], f"those {record['path']} was trained with"
    if record is None and cfg["pretrained"]:
        meta = pretrained_meta(arch)
        if meta is not None and meta["mean"] is not None:
            return [meta["mean"], meta["std"]], f"{arch}'s pretrained weights"
    n = cfg["normalize"]
    mean, std = STATISTICS[n] if isinstance(n, str) else n
    return [list(mean), list(std)], f"normalize={n if isinstance(n, str) else 'as given'}"


def apply_statistics(model: nn.Module, mean, std, device: torch.device):
    """Make ``model`` see its inputs normalised with ``(mean, std)`` although the data path normalises with
    CIFAR-10's: a forward pre-hook computes ``x * (STD / std) + (MEAN - mean) / std`` per channel (nothing
    when they are CIFAR-10's). The hook is not part of the state dict; checkpoints record the statistics."""
    if [list(mean), list(std)] == [list(MEAN), list(STD)]:
        return None
    m0, s0 = torch.tensor(MEAN, dtype=torch.float64), torch.tensor(STD, dtype=torch.float64)
    m1, s1 = torch.tensor(mean, dtype=torch.float64), torch.tensor(std, dtype=torch.float64)
    scale = (s0 / s1).float().view(1, 3, 1, 1).to(device)
    shift = ((m0 - m1) / s1).float().view(1, 3, 1, 1).to(device)

    def renormalize(_module, args):
        return (torch.addcmul(shift, args[0], scale), *args[1:])

    return model.register_forward_pre_hook(renormalize)
