"""Checkpoints: ``files`` (the formats, atomic writes, the writer thread, loading and checking, the RNG and
optimizer state as saved) and ``checkpointer`` (when to write, the gather to rank 0, resume)."""

from .checkpointer import Checkpointer, PeerState, Resumed
from .files import (
    FORMAT,
    CheckpointWriter,
    atomic_save,
    latest_path,
    load_checkpoint,
    load_optimizer_state,
    peer_path,
    prune_epoch_checkpoints,
    public_config,
    remove_stale_temp_files,
    versions,
)

__all__ = [
    "FORMAT",
    "CheckpointWriter",
    "Checkpointer",
    "PeerState",
    "Resumed",
    "atomic_save",
    "latest_path",
    "load_checkpoint",
    "load_optimizer_state",
    "peer_path",
    "prune_epoch_checkpoints",
    "public_config",
    "remove_stale_temp_files",
    "versions",
]
