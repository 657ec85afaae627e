"""The checkpointer: decides when to write, gathers every peer's state to rank 0, and resumes.

The loop calls ``save(epoch, step)`` after every step and the trainer calls it after each epoch's evaluation; it
decides itself what that position asks for (``save_every_steps``, ``save_freq``, a new best, the final epoch). The
train state (history, best accuracies, run facts) is the trainer's: read through its ``state_dict()`` and restored
through its ``load_state_dict()``, as torchtitan's checkpointer does with a ``Stateful`` trainer.
"""

from __future__ import annotations

import copy
import os
from typing import NamedTuple

import torch

from .. import distributed as D
from .. import faults
from ..data.folders import files_changed
from ..errors import DMLError
from ..meters import Meters, meter_table
from .files import (
    FORMAT,
    CheckpointWriter,
    atomic_save,
    check_cohort_checkpoint,
    cpu_copy,
    latest_path,
    load_checkpoint,
    load_optimizer_state,
    peer_path,
    prune_epoch_checkpoints,
    public_config,
    remove_stale_temp_files,
    rng_state,
    set_rng_state,
    versions,
)


class PeerState(NamedTuple):
    """This rank's peer as a checkpoint holds it."""

    arch: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer | None  # None (and no scheduler): a frozen peer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    scaler: torch.amp.GradScaler | None
    init_from: dict | None = None  # where its weights came from (weights.load_init's record)


class Resumed(NamedTuple):
    """Where a resumed run starts: ``epoch`` epochs and ``step`` steps of the next one done."""

    path: str
    epoch: int
    step: int
    meters: Meters | None
    config: dict  # the config it was trained with


class Checkpointer:
    """One rank's side of the cohort's checkpoints. Files (``files.py``): ``<exp>_latest.pth`` (the cohort,
    what a resume reads) and each peer's ``_best``, ``_final`` and ``_epoch_<e>`` weights. Replica 0 of every
    peer hands its state to rank 0, whose writer thread writes the peer files first and ``_latest.pth`` last
    (the commit point). A peer whose weights are not finite is never saved."""

    def __init__(self, cfg: dict, ctx: D.DistContext, logger, data, peer: PeerState, archs: list[str], trainer):
        """``archs``: every peer's architecture; ``trainer``: the owner of the train state (``state_dict()``,
        ``load_state_dict()``, ``steps_per_epoch``)."""
        self.cfg, self.ctx, self.logger, self.data, self.peer = cfg, ctx, logger, data, peer
        self.archs, self.trainer = archs, trainer
        self.steps_per_epoch = trainer.steps_per_epoch
        self.writer = CheckpointWriter(enabled=ctx.is_main)
        self._files: dict | None = None
        if ctx.is_main:
            for stale in remove_stale_temp_files(cfg["save_dir"], cfg["experiment_name"]):
                logger.info(f"removed {stale}: a temp file left by a process killed while saving")

    # ------------------------------------------------------------------------------------------ save
    def due(self, epoch: int, step: int) -> bool:
        """Whether position ``(epoch, step)`` (``step`` steps of epoch ``epoch`` done) gets a checkpoint: the
        end of every epoch, and every ``save_every_steps`` global steps inside one."""
        if step >= self.steps_per_epoch:
            return True
        every = self.cfg["save_every_steps"]
        return bool(step and every and ((epoch - 1) * self.steps_per_epoch + step) % every == 0)

    def save(self, epoch: int, step: int, last: bool = False, meters: Meters | None = None) -> None:
        """Collective. ``step`` steps of epoch ``epoch`` (from 1) are done; ``step == steps_per_epoch`` is the
        epoch's end, after its evaluation (the loop's call there writes nothing). Mid-epoch, the partial
        ``meters`` are checked for a non-finite loss and saved. Everything the writer thread writes is
        snapshotted here, when the write is queued, so a slow disk cannot label a file with a later epoch."""
        if not self.due(epoch, step) or (meters is not None and step >= self.steps_per_epoch):
            return
        end = step >= self.steps_per_epoch
        done, step = (epoch, 0) if end else (epoch - 1, step)
        faults.before_save(self.ctx.rank, epoch, self.peer.model)
        self._check_finite(epoch, step)
        sums = None
        if meters is not None:  # this peer's partial-epoch sums over its replicas (sync point; raises on nan/inf)
            table = meter_table(meters, self.ctx, epoch, step - 1)
            sums = dict(zip(("loss", "ce", "kl", "correct", "n"), table[self.ctx.peer, :5].tolist()))
        states = D.gather_objects(self._peer_state(sums))  # sync point
        if not self.ctx.is_main:
            return
        states = [st for st in states if st is not None]  # replica 0 of each peer, in peer order
        train = self.trainer.state_dict()
        meta, cfg = self._meta(done, step, train), self.cfg
        accs = train["history"][-1]["val_acc"] if train["history"] else [None] * cfg["model_num"]
        new_best = [k for k, e in enumerate(train["best_epochs"]) if end and e == epoch]
        epoch_file = end and cfg["save_freq"] and epoch % cfg["save_freq"] == 0
        frozen = self.trainer.run.frozen

        def write():
            faults.before_write()
            for k, state in enumerate(states):
                if k in new_best:
                    self._peer_file(k, state, "best", accs[k], meta)
                if epoch_file and not frozen[k]:  # a frozen peer's weights never change: its _best and _final
                    self._peer_file(k, state, f"epoch_{epoch}", accs[k], meta)
                    prune_epoch_checkpoints(cfg["save_dir"], cfg["experiment_name"], k + 1, cfg["keep_last"])
                if last:
                    self._peer_file(k, state, "final", accs[k], meta)
            atomic_save({**meta, "peers": states}, latest_path(cfg["save_dir"], cfg["experiment_name"]), done)

        self.writer.submit(write)

    def _check_finite(self, epoch: int, step: int) -> None:
        """Collective: every rank raises when a peer's weights are not finite (its loss may still have been
        finite on the step that broke it)."""
        state = self.peer.model.state_dict().values()
        finite = all(bool(torch.isfinite(t).all()) for t in state if t.is_floating_point())
        flags = D.all_gather(torch.tensor([float(finite)])).view(-1)[self.ctx.first_ranks]  # sync point
        if not bool(flags.all()):
            bad = [k + 1 for k, f in enumerate(flags.tolist()) if not f]
            raise DMLError(
                f"peer(s) {bad}: weights are not finite (nan/inf) at epoch {epoch}"
                f"{f', step {step}' if step else ''}; lower lr (or use amp=off) and check the data"
            )

    def _peer_state(self, meter_sums: dict | None) -> dict | None:
        """This peer's state from its replica 0; other replicas hand in nothing (a cohort checkpoint does
        not depend on the number of replicas)."""
        if self.ctx.replica != 0:
            return None
        p = self.peer
        return cpu_copy(
            {
                "arch": p.arch,
                "model": p.model.state_dict(),
                "optimizer": p.optimizer.state_dict() if p.optimizer is not None else None,
                "scheduler": p.scheduler.state_dict() if p.scheduler is not None else None,
                "init_from": p.init_from,
                "scaler": p.scaler.state_dict() if p.scaler is not None else None,
                "rng": rng_state(self.ctx.device),
                "meters": meter_sums,
            }
        )

    def _file_record(self) -> dict | None:
        """The training file list as a resume compares it: its size and each file's path hash (computed once)."""
        files = getattr(self.data, "train_files", None)
        if files is None:
            return None
        if self._files is None:
            self._files = {"n": len(files), "hashes": torch.from_numpy(files.path_hashes())}
        return self._files

    def _meta(self, epoch: int, step: int, train: dict) -> dict:
        return {
            "format": FORMAT,
            "kind": "cohort",
            "epoch": epoch,
            "step": step,
            "files": self._file_record(),
            "config": public_config(self.cfg),
            "resolved": self.trainer.run.record(),
            "num_classes": self.data.num_classes,
            "classes": list(self.data.classes),
            "history": copy.deepcopy(train["history"]),
            "best_accuracies": list(train["best_accuracies"]),
            "best_epochs": list(train["best_epochs"]),
            "best_ensemble_accuracy": train["best_ensemble_accuracy"],
            "run": copy.deepcopy(train["run"]),
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
                "frozen": state["optimizer"] is None,
                "init_from": state.get("init_from"),
                "epoch": meta["epoch"],
                "accuracy": accuracy,
                "best_accuracy": meta["best_accuracies"][k],
                "config": meta["config"],
                "resolved": meta["resolved"],
                "versions": meta["versions"],
            },
            peer_path(self.cfg["save_dir"], self.cfg["experiment_name"], k + 1, tag),
            meta["epoch"],
        )

    def wait(self) -> None:
        """Until every queued write is on disk."""
        self.writer.wait()

    def writing(self) -> bool:
        """Whether writes are still queued or running."""
        return any(not f.done() for f in self.writer.pending)

    def close(self) -> None:
        self.writer.close()

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

    def _check_files(self, ckpt: dict, path: str) -> None:
        """Rank 0: refuse a resume on a folder whose training file list changed since ``ckpt``; see
        ``check_file_list``."""
        note = check_file_list(ckpt.get("files"), self._file_record(), path, self.cfg.get("allow_data_change"))
        if note:
            self.logger.info(note)

    def load(self, resume: str | None) -> Resumed | None:
        """Collective: rank 0 reads and checks the cohort checkpoint, then hands each rank its peer's state; the
        train state goes to the trainer's ``load_state_dict``. None: nothing to resume."""
        if not resume:
            return None
        path, error, ckpt = None, None, None
        if self.ctx.is_main:
            try:
                path = self._resume_path(resume)
                if path is not None:
                    ckpt = load_checkpoint(path)
                    check_cohort_checkpoint(
                        ckpt, path, self.cfg, self.archs, self.data.num_classes, self.trainer.run.record()
                    )
                    self._check_files(ckpt, path)
            except DMLError as e:
                error = str(e)
            except Exception as e:  # noqa: BLE001  (a malformed file: every rank must hear of it, none may wait)
                error = f"checkpoint {path or resume} cannot be resumed from ({type(e).__name__}: {e}); use another"
        path, error = D.broadcast_object((path, error))
        if error:
            raise DMLError(error)
        if path is None:
            self.logger.info("resume=auto: no checkpoint for this experiment yet, starting fresh")
            return None
        per_rank = [ckpt["peers"][self.ctx.peer_of(rank)] for rank in range(self.ctx.world_size)] if ckpt else None
        state = D.scatter_objects(per_rank)
        meta = D.broadcast_object({k: v for k, v in ckpt.items() if k not in ("peers", "files")} if ckpt else None)
        p = self.peer
        try:
            p.model.load_state_dict(state["model"])  # frozen flags as the checkpoint's: check_cohort_checkpoint
            if p.optimizer is not None:
                load_optimizer_state(p.optimizer, state["optimizer"])
                p.scheduler.load_state_dict(state["scheduler"])
            if p.scaler is not None and state["scaler"]:
                p.scaler.load_state_dict(state["scaler"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise DMLError(
                f"checkpoint {path}: peer {self.ctx.peer + 1} state does not fit this model "
                f"({str(e).splitlines()[0][:160]}); start a new experiment",
                all_ranks=False,
            ) from None
        set_rng_state(state["rng"], self.ctx.device)
        meters = None
        if state["meters"]:  # a peer's partial-epoch sums go to its replica 0 (any number of replicas sums the same)
            meters = Meters(self.ctx.device, state["meters"] if self.ctx.replica == 0 else None)
        self.trainer.load_state_dict(meta)
        return Resumed(path, meta["epoch"], meta["step"], meters, meta["config"])


def check_file_list(before: dict | None, now: dict | None, path: str, allow: bool) -> str | None:
    """Raise if the training file list recorded in the checkpoint at ``path`` (``before``) differs from this run's
    (``now``: path hashes; every later batch would differ), unless ``allow`` (``allow_data_change``): then the
    line to log, how many files came and went. None when nothing changed or either record is missing."""
    if before is None or now is None or torch.equal(before["hashes"], now["hashes"]):
        return None
    added, removed = files_changed(before["hashes"].numpy(), now["hashes"].numpy())
    what = f"the training file list changed since {path}: {added} file(s) added, {removed} removed"
    if not allow:
        raise DMLError(
            f"{what}; restore the folder, start a new experiment, or set allow_data_change=true "
            f"(the batches from here on then differ from the run's)"
        )
    return f"allow_data_change: {what}; the batches from here on differ from the run's"
