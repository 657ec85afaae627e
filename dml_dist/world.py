"""The config against the world: how many processes a config needs, and the keys that follow from the world size
(``model_num``, ``replicas: auto``, ``experiment_name``), checked once the world is known."""

from __future__ import annotations

from .config import DEFAULT_LOCAL_PEERS
from .distributed.layout import replica_layout
from .errors import DMLError


def default_model_num(cfg: dict) -> int:
    """``model_num`` outside torchrun: as set, else one per listed replica count or model, else 2."""
    if cfg["model_num"] is not None:
        return cfg["model_num"]
    for k in ("replicas", "model", "init_from", "frozen", "mutual_weights"):
        if isinstance(cfg.get(k), list):
            return len(cfg[k])
    return DEFAULT_LOCAL_PEERS


def world_size_for(cfg: dict) -> int:
    """Processes a config needs: one per replica of every peer (``model_num`` set, or a replica list);
    ``replicas: auto`` outside torchrun is one replica per peer."""
    r = cfg["replicas"]
    return sum(r) if isinstance(r, list) else cfg["model_num"] * (1 if r == "auto" else r)


def finalize_config(cfg: dict, world_size: int) -> dict:
    """Fill the world-dependent keys (model_num, experiment_name) and check them against the world:
    ``world_size == model_num * replicas``, or the sum of a replica list (ranks peer-major: peer k's replicas
    are the next ``replicas[k]`` ranks)."""
    c = dict(cfg)
    r = c["replicas"]
    if r == "auto":  # as many replicas as the world holds: an elastic job that lost a node goes on with fewer
        m = c["model_num"] or (len(c["model"]) if isinstance(c["model"], list) else None)
        if m is None:
            raise DMLError("replicas=auto needs the number of peers: set model_num (or list one model per peer)")
        if world_size % m:
            raise DMLError(
                f"replicas=auto: {world_size} processes do not split into {m} peers; start a multiple of "
                f"{m} processes (every node alike) or set model_num"
            )
        c["model_num"], c["replicas"] = m, r = m, world_size // m
    if isinstance(r, list):
        if c["model_num"] is None:
            c["model_num"] = len(r)
        if len(r) != c["model_num"]:
            raise DMLError(
                f"replicas lists {len(r)} counts for {c['model_num']} peers; give one per peer (or one integer for all)"
            )
        if sum(r) != world_size:
            raise DMLError(
                f"replicas={r} needs {sum(r)} processes (their sum) but {world_size} were started; "
                f"launch torchrun --nproc_per_node={sum(r)} or change replicas"
            )
    elif c["model_num"] is None:
        if isinstance(c["model"], list) and world_size == 1:
            c["model_num"] = len(c["model"])
        else:
            c["model_num"] = max(1, world_size // r)
    m = c["model_num"]
    if not isinstance(r, list) and m * r != world_size:
        if r == 1:
            raise DMLError(
                f"model_num={m} but {world_size} process(es) were started; launch with "
                f"torchrun --nproc_per_node={m} (one process per peer) or set model_num={world_size}"
            )
        raise DMLError(
            f"model_num={m} x replicas={r} needs {m * r} processes but {world_size} were started; "
            f"launch {m * r} processes (torchrun --nproc_per_node={m * r}) or change model_num/replicas"
        )
    for k in sorted(set(replica_layout(c))):
        if c["batch_size"] % k:
            raise DMLError(
                f"batch_size={c['batch_size']} does not divide by replicas={k}; each replica takes an "
                f"equal share of its peer's batch: use a multiple of {k}"
            )
    if isinstance(c["model"], list) and len(c["model"]) != m:
        raise DMLError(f"model lists {len(c['model'])} architectures for {m} peers; give one per peer")
    for k in ("init_from", "frozen", "mutual_weights"):
        if c.get(k) is not None and len(c[k]) != m:
            raise DMLError(f"{k} lists {len(c[k])} entries for {m} peers; give one per peer (or leave it unset)")
    for k, frozen in enumerate(c.get("frozen") or []):
        if frozen and not (c["init_from"] and c["init_from"][k]) and not c["pretrained"]:
            raise DMLError(
                f"peer {k + 1} is frozen but would start from random weights; give it init_from (a checkpoint) "
                f"or pretrained: true"
            )
    if not c["experiment_name"]:
        arch = c["model"] if isinstance(c["model"], str) else "-".join(c["model"])
        c["experiment_name"] = f"dml_{arch}_{m}peers"
    return c


def peer_model_name(cfg: dict, peer: int) -> str:
    return cfg["model"][peer] if isinstance(cfg["model"], list) else cfg["model"]
