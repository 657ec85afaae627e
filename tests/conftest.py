"""Shared helpers: generated image folders and real torchrun launches (gloo on localhost)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "cifar10-small"
CI = os.environ.get("CI") == "true"
TWO_CPUS = (sorted(os.sched_getaffinity(0)) * 2)[:2]  # for taskset: two CPUs (one twice on a 1-CPU machine)


def requires(available: bool, reason: str):
    """Decorator for a test that needs a real component (SLURM, the shared subset): skipped where it is
    missing, but under ``CI=true`` it fails instead, so a CI run never passes without running it."""
    if available:
        return lambda test: test
    if not CI:
        return pytest.mark.skip(reason=reason)

    def fail(test):
        import functools

        @functools.wraps(test)
        def missing(*args, **kwargs):
            pytest.fail(f"CI=true and {reason}: install it (see .ci/run), or the run proves nothing of it")

        return missing

    return fail


TIMEOUT = 240  # seconds; every launch is bounded so a hang fails the test instead of the suite


def make_image_folder(
    root: Path, classes=("cat", "dog", "frog"), n_train=24, n_val=8, size=16, seed=0, splits=("train", "val"), noise=40
) -> Path:
    """Small learnable image folder: each class has its own mean colour plus noise (raise ``noise`` for
    a folder the peers cannot learn perfectly in two epochs)."""
    rng = np.random.default_rng(seed)
    counts = {"train": n_train, "val": n_val, "test": n_val}
    for split in splits:
        for c_idx, c in enumerate(classes):
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            base = np.array([(60 + 80 * c_idx) % 256, (200 - 70 * c_idx) % 256, (40 * c_idx + 90) % 256])
            for i in range(counts[split]):
                img = np.clip(base + rng.normal(0, noise, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i:04d}.png")
    return root


def age_folders(root: Path, seconds: int = 3600) -> None:
    """Set every folder's modification time ``seconds`` into the past: the file-list manifest is not trusted
    for folders that changed within a clock tick of the listing, and a test's folders are seconds old."""
    past = time.time() - seconds
    for d in [root, *(p for p in Path(root).rglob("*") if p.is_dir())]:
        os.utime(d, (past, past))


@pytest.fixture
def image_folder(tmp_path):
    return make_image_folder(tmp_path / "data")


def base_args(tmp_path: Path, data_dir: Path, **extra) -> list[str]:
    """A fast config for generated folders: tiny images, a couple of epochs, outputs under tmp_path. Pinned
    to the CPU: the tests assert CPU behaviour (bit-identical resumes, amp off), also on a machine with GPUs."""
    cfg = {
        "data_dir": str(data_dir),
        "device": "cpu",
        "model": "resnet20",
        "image_size": 16,
        "batch_size": 8,
        "epochs": 2,
        "lr": 0.05,
        "num_workers": 0,
        "save_dir": str(tmp_path / "ckpt"),
        "log_dir": str(tmp_path / "logs"),
        "experiment_name": "t",
        "print_freq": 2,
        "progress_bar": False,
        "save_freq": 1,
    }
    cfg.update(extra)
    return [f"{k}={v}" for k, v in cfg.items()]


def _env(extra_env=None) -> dict:
    env = dict(os.environ)
    env.pop("DML_FAULT", None)
    env["PYTHONUNBUFFERED"] = "1"
    env["OMP_NUM_THREADS"] = "1"
    # torchrun restarts reuse the rendezvous TCPStore by default, and restarted gloo workers can read the
    # dead workers' addresses from it (pytorch/pytorch#135712); launch/ scripts set the same.
    env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    env.update(extra_env or {})
    return env


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (torchrun starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that contain ``text`` (orphans included, wherever they were
    re-parented): how a test proves that no child outlived its caller."""
    found = []
    for d in os.listdir("/proc"):
        if d.isdigit() and int(d) != os.getpid():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmd:
                found.append(cmd)
    return found


def kill_tree(pid: int) -> None:
    for p in descendants(pid) + [pid]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_cmd(cmd: list[str], env=None, timeout=TIMEOUT, cwd=None, stdin=None) -> subprocess.CompletedProcess:
    """Run in a new session; on timeout kill the whole process tree (no orphans) and fail."""
    proc = subprocess.Popen(
        cmd,
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(env),
        cwd=cwd or REPO,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, err = proc.communicate()
        pytest.fail(f"timed out after {timeout}s: {' '.join(cmd)}\nstdout:\n{out[-3000:]}\nstderr:\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def torchrun_cmd(nproc: int, args: list[str], torchrun_args=(), module="dml_dist.train") -> list[str]:
    """A standalone torchrun of ``module`` on ``nproc`` local ranks, as a command line."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return [*launcher, *torchrun_args, "-m", module, *args]


def torchrun(
    nproc: int, args: list[str], env=None, timeout=TIMEOUT, torchrun_args=(), module="dml_dist.train", cwd=None
):
    return run_cmd(torchrun_cmd(nproc, args, torchrun_args, module), env, timeout, cwd)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("dml-dist: error:")]


def read_summary(tmp_path: Path, name="t") -> dict:
    return json.loads((tmp_path / "logs" / f"{name}_summary.json").read_text())


def assert_no_worker_traceback(stderr: str) -> None:
    """Workers exit with one line; the only traceback allowed is torchrun's own ChildFailedError report."""
    assert "dml_dist/" not in stderr and "[rank0]:" not in stderr and "[rank1]:" not in stderr, stderr[-3000:]


# The suite runs on two pytest-xdist workers, one test file at a time each (setup.cfg: -n 2 --dist loadfile, so
# a file's module-scoped runs are shared by its tests). The files go longest first (the measured sums of their
# tests' times; the few-second files test_augment, test_config and test_data, not listed, last), so that no long
# file starts last and runs alone. setup.cfg's --no-loadscope-reorder keeps this order: xdist would otherwise
# queue the files by their number of tests, which put the one-test files (SLURM, the end-to-end run, the lost
# node) last, one after another on one worker.
LONGEST_FIRST = (
    "test_stream.py",
    "test_checkpoint.py",
    "test_engine.py",
    "test_replicas.py",
    "test_cohort.py",
    "test_train_distributed.py",
    "test_launch.py",
    "test_api.py",
    "test_slurm.py",
    "test_bad_files.py",
    "test_callers.py",
    "test_exchange.py",
    "test_end_to_end.py",
    "test_elastic.py",
    "test_compare.py",
    "test_models_loss.py",
    "test_quickstart.py",
    "test_original_api.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))
