"""The cohort's checkpoint state: what every rank keeps in step, what rank 0 writes, what resume restores.

``CohortCheckpoint`` holds the bookkeeping that is the same on every rank (completed epochs, steps done
in the current one, history, best accuracies, run facts) and does the two collectives around it:

- ``save``: replica 0 of every peer hands its state (model, optimizer, scheduler, scaler, RNG, partial
  epoch meters) to rank 0, whose writer thread writes the per-peer files first and the cohort's
  ``<exp>_latest.pth`` last (the commit point for resume). A diverged peer is never saved.
- ``resume``: rank 0 reads and checks the cohort file and hands each rank its peer's state.

The file formats and atomic writing live in ``checkpoint.py``; the Trainer (``train.py``) is the loop.
"""

from __future__ import annotations

import copy
import os
import random

import torch

from . import distributed as D
from . import faults
from .checkpoint import (
    FORMAT,
    CheckpointWriter,
    atomic_save,
    check_cohort_checkpoint,
    cpu_copy,
    latest_path,
    load_checkpoint,
    peer_path,
    prune_epoch_checkpoints,
    versions,
)
from .data.folders import files_changed
from .errors import DMLError
from .meters import Meters, meter_table


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """``optimizer.load_state_dict``, keeping this run's implementation choice (``fused``, ``foreach``): a
    state saved on a GPU (fused SGD) resumes on a CPU and the other way round."""
    impl = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, keep in zip(optimizer.param_groups, impl):
        group.update(keep)


def public_config(cfg: dict) -> dict:
    """The config as trained: ``resume`` says how a process started, not what was trained, so it is left
    out (a resumed run and an uninterrupted one then report the same config)."""
    return {k: v for k, v in cfg.items() if k != "resume"}


def rng_state(device: torch.device) -> dict:
    """This process's RNG states; the CUDA generator too on a GPU (dropout in mobilenetv2, torchvision.*)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


class CohortCheckpoint:
    """One rank's view of the cohort's checkpoint state. ``peer``: this rank's (arch, model, optimizer,
    scheduler, scaler); ``archs``: every peer's architecture."""

    def __init__(self, cfg: dict, ctx: D.DistContext, logger, data, peer: tuple, archs: list[str]):
        self.cfg, self.ctx, self.logger, self.data, self.archs = cfg, ctx, logger, data, archs
        self.arch, self.model, self.optimizer, self.scheduler, self.scaler = peer
        self.epoch, self.step = 0, 0  # completed epochs; steps done in the current epoch
        self.history: list[dict] = []
        self.best: list[float | None] = [None] * cfg["model_num"]
        self.best_ensemble = 0.0
        self.meters: Meters | None = None  # a resumed partial epoch's meters
        self.run_info = {"resumed_from": [], "epoch_seconds": []}
        self.writer = CheckpointWriter(enabled=ctx.is_main)

    # ------------------------------------------------------------------------------------------ save
    def _peer_state(self, meter_sums: dict | None) -> dict | None:
        """This peer's state from its replica 0; other replicas hand in nothing (a cohort checkpoint does
        not depend on the number of replicas)."""
        if self.ctx.replica != 0:
            return None
        return cpu_copy(
            {
                "arch": self.arch,
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "rng": rng_state(self.ctx.device),
                "meters": meter_sums,
            }
        )

    def _file_record(self) -> dict | None:
        """The training file list as a resume compares it: its size and each file's path hash (computed once)."""
        files = getattr(self.data, "train_files", None)
        if files is None:
            return None
        if not hasattr(self, "_files"):
            self._files = {"n": len(files), "hashes": torch.from_numpy(files.path_hashes())}
        return self._files

    def check_files(self, ckpt: dict, path: str) -> None:
        """Rank 0: refuse a resume on a folder whose training file list changed since ``ckpt`` (every later
        batch would differ), unless ``allow_data_change``; say how many files came and went either way."""
        before, now = ckpt.get("files"), self._file_record()
        if before is None or now is None or torch.equal(before["hashes"], now["hashes"]):
            return
        added, removed = files_changed(before["hashes"].numpy(), now["hashes"].numpy())
        what = f"the training file list changed since {path}: {added} file(s) added, {removed} removed"
        if not self.cfg.get("allow_data_change"):
            raise DMLError(
                f"{what}; restore the folder, start a new experiment, or set allow_data_change=true "
                f"(the batches from here on then differ from the run's)"
            )
        self.logger.info(f"allow_data_change: {what}; the batches from here on differ from the run's")

    def _meta(self) -> dict:
        return {
            "format": FORMAT,
            "kind": "cohort",
            "epoch": self.epoch,
            "step": self.step,
            "files": self._file_record(),
            "config": public_config(self.cfg),
            "num_classes": self.data.num_classes,
            "classes": list(self.data.classes),
            "history": copy.deepcopy(self.history),
            "best_accuracies": list(self.best),
            "best_ensemble_accuracy": self.best_ensemble,
            "run": copy.deepcopy(self.run_info),
            "versions": versions(),
        }

    def _peer_file(self, k: int, state: dict, tag: str, accuracy: float | None, meta: dict) -> None:
        atomic_save(
            {
                "format": FORMAT,
                "kind": "peer",
                "peer": k + 1,
                "arch": state["arch"],
                "num_classes": meta["num_classes"],
                "classes": meta["classes"],
                "image_size": self.cfg["image_size"],
                "model": state["model"],
                "epoch": meta["epoch"],
                "accuracy": accuracy,
                "best_accuracy": meta["best_accuracies"][k],
                "config": meta["config"],
                "versions": meta["versions"],
            },
            peer_path(self.cfg["save_dir"], self.cfg["experiment_name"], k + 1, tag),
            meta["epoch"],
        )

    def save(self, meters: Meters | None = None, new_best=(), final: bool = False, epoch_done: int = 0) -> None:
        """Collective (see the module docstring). Mid-epoch (``meters``), the meters are checked for a
        non-finite loss first. Everything the writer thread writes is snapshotted here, when the write is
        queued, so a slow disk cannot label a file with a later epoch."""
        # A diverged peer is never saved: its loss may still have been finite on the step that broke it.
        faults.before_save(self.ctx.rank, max(epoch_done, self.epoch), self.model)
        finite = all(bool(torch.isfinite(t).all()) for t in self.model.state_dict().values() if t.is_floating_point())
        flags = D.all_gather_tensor(torch.tensor([float(finite)])).view(-1)[self.ctx.first_ranks]  # sync point
        if not bool(flags.all()):
            bad = [k + 1 for k, f in enumerate(flags.tolist()) if not f]
            raise DMLError(
                f"peer(s) {bad}: weights are not finite (nan/inf) at epoch {max(epoch_done, self.epoch)}"
                f"{f', step {self.step}' if self.step else ''}; lower lr (or use amp=off) and check the data"
            )
        sums = None
        if meters is not None:
            # This peer's partial-epoch sums over all its replicas (sync point; raises on nan/inf).
            table = meter_table(meters, self.ctx, epoch_done, self.step - 1)
            sums = dict(zip(("loss", "ce", "kl", "correct", "n"), table[self.ctx.peer, :5].tolist()))
        states = D.gather_objects(self._peer_state(sums))  # sync point
        if not self.ctx.is_main:
            return
        states = [st for st in states if st is not None]  # replica 0 of each peer, in peer order
        meta, cfg, epoch = self._meta(), self.cfg, self.epoch
        accs = self.history[-1]["val_acc"] if self.history else [None] * cfg["model_num"]
        epoch_file = self.step == 0 and cfg["save_freq"] and epoch % cfg["save_freq"] == 0

        def write():
            faults.before_write()
            for k, state in enumerate(states):
                if k in new_best:
                    self._peer_file(k, state, "best", accs[k], meta)
                if epoch_file:
                    self._peer_file(k, state, f"epoch_{epoch}", accs[k], meta)
                    prune_epoch_checkpoints(cfg["save_dir"], cfg["experiment_name"], k + 1, cfg["keep_last"])
                if final:
                    self._peer_file(k, state, "final", accs[k], meta)
            atomic_save({**meta, "peers": states}, latest_path(cfg["save_dir"], cfg["experiment_name"]), epoch)

        self.writer.submit(write)

    # ---------------------------------------------------------------------------------------- resume
    def _resume_path(self, resume: str) -> str | None:
        """Rank 0: the file to resume from. After a torchrun restart, this experiment's own ``_latest.pth``
        wins over an explicit ``resume=PATH`` when it is newer: it holds the progress made since PATH."""
        latest = latest_path(self.cfg["save_dir"], self.cfg["experiment_name"])
        if resume == "auto":
            return latest if os.path.isfile(latest) else None
        if (
            self.ctx.restart_count > 0
            and os.path.isfile(latest)
            and os.path.isfile(resume)
            and os.path.realpath(latest) != os.path.realpath(resume)
            and os.path.getmtime(latest) > os.path.getmtime(resume)
        ):
            return latest
        return resume

    def resume(self, resume: str | None) -> None:
        """Collective: rank 0 reads and checks the cohort checkpoint, then hands each rank its peer's state."""
        if not resume:
            return
        path, error, ckpt = None, None, None
        if self.ctx.is_main:
            try:
                path = self._resume_path(resume)
                if path is not None:
                    ckpt = load_checkpoint(path)
                    check_cohort_checkpoint(ckpt, path, self.cfg, self.archs, self.data.num_classes)
                    self.check_files(ckpt, path)
            except DMLError as e:
                error = str(e)
        path, error = D.broadcast_object((path, error))
        if error:
            raise DMLError(error)
        if path is None:
            self.logger.info("resume=auto: no checkpoint for this experiment yet, starting fresh")
            return
        per_rank = [ckpt["peers"][self.ctx.peer_of(rank)] for rank in range(self.ctx.world_size)] if ckpt else None
        state = D.scatter_objects(per_rank)
        meta = D.broadcast_object({k: v for k, v in ckpt.items() if k not in ("peers", "files")} if ckpt else None)
        try:
            self.model.load_state_dict(state["model"])
            load_optimizer_state(self.optimizer, state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if self.scaler is not None and state["scaler"]:
                self.scaler.load_state_dict(state["scaler"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise DMLError(
                f"checkpoint {path}: peer {self.ctx.peer + 1} state does not fit this model "
                f"({str(e).splitlines()[0][:160]}); start a new experiment",
                all_ranks=False,
            ) from None
        set_rng_state(state["rng"], self.ctx.device)
        # A peer's partial-epoch sums go to its replica 0 (any number of replicas sums to the same).
        if state["meters"] and self.ctx.replica == 0:
            self.meters = Meters(self.ctx.device, state["meters"])
        elif state["meters"]:
            self.meters = Meters(self.ctx.device)
        self.epoch, self.step = meta["epoch"], meta["step"]
        self.history, self.best = meta["history"], list(meta["best_accuracies"])
        self.best_ensemble = meta["best_ensemble_accuracy"]
        self.run_info = meta["run"]
        self.run_info["resumed_from"].append(f"{path}@epoch{self.epoch}+step{self.step}")
        self.logger.info(f"resumed from {path}: {self.epoch} epoch(s) and {self.step} step(s) done")
        before = meta["config"].get("replicas")
        if before is not None and before != self.cfg["replicas"]:
            self.logger.info(
                f"replicas: the checkpoint was trained with {before} per peer, this run has "
                f"{self.cfg['replicas']} ({self.ctx.world_size} processes)"
            )
