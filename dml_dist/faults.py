"""Documented fault-injection hook for tests and drills (docs/troubleshooting.md).

``DML_FAULT="action=<a>,rank=<r>[,epoch=<e>][,step=<s>]"`` (epoch counts from 1, step from 0):

- ``seed_offset``: rank r uses ``seed + 1`` for data sampling and says so in one stdout line (the consistency
  check must catch it);
- ``raise``: rank r fails with an error at setup (no epoch) or at (epoch, step);
- ``sigkill``: rank r SIGKILLs itself at (epoch, step), first attempt only (not after a torchrun restart or a
  SLURM requeue);
- ``sigstop``: rank r stops itself (SIGSTOP) at (epoch, step): a stalled rank, first attempt only;
- ``slow_save``: rank 0's checkpoint writer sleeps ``seconds`` (default 2) before each checkpoint it
  writes: a slow disk, so that a test can stop the job while writes are queued;
- ``slow_report``: rank 0 waits ``seconds`` (default 8) before printing an error every rank hit: a loaded
  machine, where the other ranks' exit must not make the launcher stop rank 0 before its line is out;
- ``nan_weights``: rank r's weights become nan at the end of ``epoch``, before that epoch's checkpoint
  (its loss stayed finite): the save must refuse them;
- ``kill_in_save``: rank 0 SIGKILLs itself after writing a checkpoint's temp file, before the rename,
  on the first save at or after ``epoch``.

``DML_FINGERPRINT_DIR=<dir>``: every rank appends the batch fingerprints it checks to
``<dir>/fingerprints_rank<r>.txt`` (one ``epoch step labels_hash inputs_hash`` line per check), so a test
can compare the ranks' batches independently of the trainer's own check.
"""

from __future__ import annotations

import os
import signal
import time

from .errors import DMLError


def _spec() -> dict | None:
    raw = os.environ.get("DML_FAULT")
    if not raw:
        return None
    spec = dict(part.split("=", 1) for part in raw.split(",") if "=" in part)
    again = any(int(os.environ.get(v) or 0) > 0 for v in ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT"))
    if again and spec.get("action") in (
        "sigkill",
        "sigstop",
        "kill_in_save",
    ):
        return None
    return spec


def _mine(spec: dict | None, rank: int, action: str) -> bool:
    return bool(spec) and spec.get("action") == action and int(spec.get("rank", 0)) == rank


def seed_offset(rank: int) -> int:
    if not _mine(_spec(), rank, "seed_offset"):
        return 0
    print(f"fault: seed_offset: rank {rank} draws its batches with seed + 1", flush=True)
    return 1


def at_setup(rank: int) -> None:
    spec = _spec()
    if _mine(spec, rank, "raise") and "epoch" not in spec:
        raise DMLError(f"injected failure on rank {rank} (DML_FAULT)", all_ranks=False)


def at_step(rank: int, epoch: int, step: int) -> None:
    spec = _spec()
    if not spec or int(spec.get("epoch", -1)) != epoch or int(spec.get("step", 0)) != step:
        return
    if _mine(spec, rank, "raise"):
        raise DMLError(f"injected failure on rank {rank} at epoch {epoch} step {step} (DML_FAULT)", all_ranks=False)
    if _mine(spec, rank, "sigkill"):
        os.kill(os.getpid(), signal.SIGKILL)
    if _mine(spec, rank, "sigstop"):
        os.kill(os.getpid(), signal.SIGSTOP)


def before_write() -> None:
    spec = _spec()
    if _mine(spec, 0, "slow_save"):
        seconds = float(spec.get("seconds", 2))
        print(f"fault: slow_save: the checkpoint writer sleeps {seconds:g} s before this write", flush=True)
        time.sleep(seconds)


def before_error_report(rank: int) -> None:
    spec = _spec()
    if _mine(spec, rank, "slow_report"):
        time.sleep(float(spec.get("seconds", 8)))


def before_save(rank: int, epoch: int, model) -> None:
    spec = _spec()
    if _mine(spec, rank, "nan_weights") and int(spec.get("epoch", 1)) == epoch:
        import torch

        with torch.no_grad():
            next(model.parameters()).fill_(float("nan"))


def before_rename(epoch: int) -> None:
    spec = _spec()
    if _mine(spec, 0, "kill_in_save") and epoch >= int(spec.get("epoch", 0)):
        os.kill(os.getpid(), signal.SIGKILL)


def record_fingerprint(rank: int, epoch: int, step: int, fingerprint) -> None:
    """``fingerprint``: a function giving this rank's [labels hash, inputs hash], called only when recording."""
    folder = os.environ.get("DML_FINGERPRINT_DIR")
    if folder:
        fingerprint = fingerprint()
        with open(os.path.join(folder, f"fingerprints_rank{rank}.txt"), "a") as f:
            f.write(f"{epoch} {step} {int(fingerprint[0])} {int(fingerprint[1])}\n")
