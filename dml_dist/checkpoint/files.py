"""Checkpoints: rank 0 aggregates every peer's state and writes it atomically.

Files in ``save_dir`` (k counts from 1):

- ``<exp>_latest.pth``: the whole cohort (every peer's model/optimizer/scheduler/best accuracy and RNG
  state, epoch and step, config, history, library versions): what ``resume`` reads;
- ``<exp>_model<k>_best.pth`` / ``_final.pth`` / ``_epoch_<e>.pth``: one peer's weights plus what is
  needed to rebuild it (architecture, classes, config).

Peers are not replicas, so "save on rank 0" would keep one peer only: every rank hands its state to
rank 0 (``gather_objects``), and same-named tensors of different peers live under ``peers[k]``.
Everything is plain tensors and Python values, loadable with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import os
import pickle
import random
import re
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from .. import faults
from ..data.memory import STATISTICS
from ..errors import DMLError, sigterm_held

FORMAT = "dml-dist/1"


def _package_version(name: str) -> str | None:
    """A package's ``__version__`` without importing it (importing torchvision costs seconds at every start):
    its generated ``version.py``, read as text; None when the package is missing."""
    if name in sys.modules:
        return str(sys.modules[name].__version__)
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        return None
    try:
        with open(os.path.join(os.path.dirname(spec.origin), "version.py")) as f:
            found = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", f.read(), re.M)
    except OSError:
        found = None
    if found:
        return found.group(1)
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:  # a version is a record: it must never stop a save
        return None


@functools.cache
def _versions() -> tuple:
    import platform

    from .. import __version__

    return (
        ("dml_dist", __version__),
        ("torch", str(torch.__version__)),
        ("torchvision", _package_version("torchvision")),
        ("torchcodec", _package_version("torchcodec")),
        ("python", platform.python_version()),
        ("git", _git_commit()),
    )


def versions() -> dict:
    """Library versions and the code's git commit, saved with every checkpoint and summary."""
    return dict(_versions())


def _git_commit() -> str | None:
    """The code version saved with results: HEAD of the checkout this package runs from (an editable
    install), None for an installed copy."""
    import subprocess

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # above dml_dist/
    try:
        out = subprocess.run(
            ["git", "-C", repo, "rev-parse", "--show-toplevel", "HEAD"], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.split()
    if out.returncode != 0 or len(lines) != 2 or os.path.realpath(lines[0]) != os.path.realpath(repo):
        return None
    return lines[1]


def cpu_copy(obj: Any) -> Any:
    """Deep copy with every tensor detached and moved to host memory (safe to write from a thread)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_copy(v) for v in obj)
    return obj


def atomic_save(obj: Any, path: str, epoch: int = 0) -> None:
    """Write to a temp file in the same folder, fsync, then rename: a crash leaves the old file intact."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp.{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    faults.before_rename(epoch)
    os.replace(tmp, path)
    try:  # make the rename itself durable
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _own_files(save_dir: str, pattern: str) -> list[tuple[re.Match, str]]:
    """Files in ``save_dir`` whose whole name matches ``pattern`` (anchored: experiment ``exp`` never
    matches ``myexp_...`` or ``exp_b_...``)."""
    if not os.path.isdir(save_dir):
        return []
    rx = re.compile(pattern)
    return [(m, os.path.join(save_dir, name)) for name in sorted(os.listdir(save_dir)) if (m := rx.fullmatch(name))]


def _own_checkpoint_name(experiment: str) -> str:
    return rf"{re.escape(experiment)}_(latest|model\d+_(best|final|epoch_\d+))\.pth"


def remove_stale_temp_files(save_dir: str, experiment: str) -> list[str]:
    """This experiment's temp files left by a process killed mid-write (never complete, never read)."""
    stale = [p for _, p in _own_files(save_dir, rf"\.{_own_checkpoint_name(experiment)}\.tmp\.\d+")]
    for p in stale:
        os.remove(p)
    return stale


def load_checkpoint(path: str, dml_only: bool = True) -> dict:
    """``torch.load(weights_only=True)`` with one-line errors for missing, truncated or unsafe files, and
    (``dml_only``) for files dml-dist did not write."""
    if not os.path.isfile(path):
        raise DMLError(f"checkpoint {path} does not exist; check the path (or use resume=auto)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "Weights only load failed" in str(e) or "Unsupported global" in str(e):
            raise DMLError(
                f"checkpoint {path} holds pickled objects other than tensors and plain values; "
                f"refused (weights_only=True), it was not executed"
            ) from None
        raise DMLError(f"checkpoint {path} is truncated or corrupt ({first}); use another checkpoint") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DMLError(f"checkpoint {path} is truncated or corrupt ({first[:160]}); use another checkpoint") from None
    if dml_only and (not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT):
        raise DMLError(f"checkpoint {path} was not written by dml-dist ({FORMAT}); use a file from save_dir")
    return ckpt


def check_cohort_checkpoint(
    ckpt: dict, path: str, cfg: dict, archs: list[str], num_classes: int, run: dict | None = None
) -> None:
    """Refuse a cohort checkpoint that does not fit this run, naming what differs; ``run``: this run's
    ``Resolved.record()`` (the peers' input statistics and frozen flags must be the checkpoint's)."""
    if ckpt.get("kind") != "cohort":
        raise DMLError(
            f"checkpoint {path} holds a single peer, not a cohort; resume from <experiment>_latest.pth (or resume=auto)"
        )
    peers = ckpt["peers"]
    if len(peers) != cfg["model_num"]:
        raise DMLError(
            f"checkpoint {path} holds {len(peers)} peers but this run has model_num={cfg['model_num']}; "
            f"launch {len(peers)} processes or start a new experiment"
        )
    for k, (p, arch) in enumerate(zip(peers, archs), start=1):
        if p["arch"] != arch:
            raise DMLError(
                f"checkpoint {path}: peer {k} is {p['arch']} but this run builds {arch}; "
                f"set model={p['arch']} or start a new experiment"
            )
    if ckpt["num_classes"] != num_classes:
        raise DMLError(
            f"checkpoint {path} has {ckpt['num_classes']} classes but the data has {num_classes}; "
            f"use the data it was trained on"
        )
    if run is None:
        return
    frozen = (ckpt.get("resolved") or {}).get("frozen") or [False] * len(peers)  # older: no frozen peers
    for k in range(len(peers)):
        stats = recorded_statistics(ckpt, k)
        if stats != [list(v) for v in run["normalize"][k]]:
            raise DMLError(
                f"checkpoint {path}: peer {k + 1} was trained on inputs normalised with mean {stats[0]} std "
                f"{stats[1]}, this run gives it mean {run['normalize'][k][0]} std {run['normalize'][k][1]} "
                f"({run['normalize_why'][k]}); set normalize (or init_from, pretrained) as the run had them, or "
                f"start a new experiment"
            )
        if bool(frozen[k]) != bool(run["frozen"][k]):
            was = "frozen" if frozen[k] else "a learner"
            raise DMLError(
                f"checkpoint {path}: peer {k + 1} was {was} there; set frozen as the run had it, or start a new "
                f"experiment"
            )


def recorded_statistics(ckpt: dict, k: int) -> list[list[float]]:
    """Peer ``k``'s (from 0) input [mean, std] as the checkpoint's run recorded them; CIFAR-10's for a file from
    before they were recorded (every run used those then)."""
    stats = (ckpt.get("resolved") or {}).get("normalize")
    return [list(v) for v in (stats[k] if stats else STATISTICS["cifar10"])]


def latest_path(save_dir: str, experiment: str) -> str:
    return os.path.join(save_dir, f"{experiment}_latest.pth")


def peer_path(save_dir: str, experiment: str, peer: int, tag: str) -> str:
    """tag: 'best' | 'final' | 'epoch_<e>'; peer counts from 1."""
    return os.path.join(save_dir, f"{experiment}_model{peer}_{tag}.pth")


def prune_epoch_checkpoints(save_dir: str, experiment: str, peer: int, keep_last: int) -> None:
    if keep_last <= 0:
        return
    found = sorted(
        (int(m.group(1)), p) for m, p in _own_files(save_dir, rf"{re.escape(experiment)}_model{peer}_epoch_(\d+)\.pth")
    )
    for _, p in found[:-keep_last]:
        os.remove(p)


class CheckpointWriter:
    """Rank 0's background writer: training continues while the previous state is written.

    One thread, writes in submission order; ``wait()`` re-raises the first write error.
    """

    def __init__(self, enabled: bool):
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt") if enabled else None
        self.pending: list[Future] = []
        if self.pool is not None:  # its thread now, not inside the first submit (where a SIGTERM could land)
            self.pool.submit(int).result()

    def submit(self, fn, *args) -> None:
        if self.pool is None:
            return
        self._reap()
        with sigterm_held():  # the write is queued and counted, or not queued at all
            self.pending.append(self.pool.submit(fn, *args))

    def _reap(self) -> None:
        done = [f for f in self.pending if f.done()]
        self.pending = [f for f in self.pending if not f.done()]
        for f in done:
            f.result()

    def wait(self) -> None:
        for f in self.pending:
            f.result()
        self.pending = []

    def close(self) -> None:
        if self.pool is not None:
            try:
                self.wait()
            finally:
                self.pool.shutdown(wait=True)
                self.pool = None


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
