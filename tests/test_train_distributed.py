"""Real torchrun launches over gloo on localhost."""

import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import (
    TIMEOUT,
    TWO_CPUS,
    _env,
    assert_no_worker_traceback,
    base_args,
    descendants,
    error_lines,
    kill_tree,
    make_image_folder,
    read_summary,
    run_cmd,
    torchrun,
    torchrun_cmd,
)
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import dml_dist

CIFAR = dict(dataset="cifar10", image_size=32, epochs=1)  # the tiny CIFAR-10 copy's runs
PEER_TAGS = ("train_loss", "train_ce", "train_kl", "train_acc", "val_loss", "val_acc")


def _fingerprints(folder, rank):
    return (folder / f"fingerprints_rank{rank}.txt").read_text().split("\n")


def _git_head_of_the_package():
    """The commit the summary must record: HEAD of the checkout dml_dist runs from (None if not a checkout)."""
    repo = Path(dml_dist.__file__).resolve().parents[1]
    if not (repo / ".git").exists():
        return None
    return subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()


def _check_summary(summary, peers, epochs):
    assert len(summary["best_accuracies"]) == peers
    assert all(0.0 <= a <= 1.0 for a in summary["best_accuracies"])
    assert summary["avg_best_accuracy"] == pytest.approx(sum(summary["best_accuracies"]) / peers)
    assert 0.0 <= summary["best_ensemble_accuracy"] <= 1.0
    assert [h["epoch"] for h in summary["history"]] == list(range(1, epochs + 1))
    for h in summary["history"]:
        assert len(h["val_acc"]) == peers and 0 <= h["ensemble_acc"] <= 1
    assert summary["best_accuracies"] == [max(h["val_acc"][k] for h in summary["history"]) for k in range(peers)]
    assert summary["config"]["model_num"] == peers
    # README: final_accuracies (the last epoch's), versions (libraries, git commit), run (wall-clock facts)
    assert summary["final_accuracies"] == summary["history"][-1]["val_acc"]
    assert summary["final_ensemble_accuracy"] == summary["history"][-1]["ensemble_acc"]
    v = summary["versions"]
    assert (v["torch"], v["torchvision"], v["dml_dist"]) == (
        torch.__version__,
        torchvision.__version__,
        dml_dist.__version__,
    )
    assert v["git"] == _git_head_of_the_package()
    run = summary["run"]
    assert run["resumed_from"] == [] and run["restarts"] == 0 and len(run["epoch_seconds"]) == epochs
    assert run["started_at"] <= run["finished_at"] and run["elapsed_s"] > 0


def _check_tensorboard(log_dir, peers, epochs, history=None):
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    expected = {"lr", "ensemble/val_acc", "ensemble/val_loss"} | {
        f"peer{k}/{t}" for k in range(1, peers + 1) for t in PEER_TAGS
    }
    assert expected <= tags, expected - tags
    assert [e.step for e in acc.Scalars("ensemble/val_acc")] == list(range(1, epochs + 1))
    if history is not None:  # the values are the summary's, epoch by epoch
        for tag, key in (("ensemble/val_loss", "ensemble_loss"), ("ensemble/val_acc", "ensemble_acc"), ("lr", "lr")):
            assert [e.value for e in acc.Scalars(tag)] == pytest.approx([h[key] for h in history], rel=1e-6), tag
        for k in range(peers):  # each peer's curves under its own name: the peers' figures differ
            for t in PEER_TAGS:
                got = [e.value for e in acc.Scalars(f"peer{k + 1}/{t}")]
                assert got == pytest.approx([h[t][k] for h in history], rel=1e-6), (k, t)


def test_three_peers_mixed_cohort_same_batches_summary_and_tensorboard(tmp_path, image_folder):
    """One launch of a mixed cohort of 3 (mutual=ensemble: each peer distils from the mean of the other two; the
    dml variant runs everywhere else), augmentation on, the consistency check at every step. The memory path (an
    image folder that fits) reads no files while training, so it has no workers; the per-sample path's workers
    run under torchrun in test_api.py, the stream path's in test_stream.py. Also the README's warning:
    --max-restarts without TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (every other test sets it) is one line at the
    start; the run itself needs no restart."""
    fp_dir = tmp_path / "fp"
    fp_dir.mkdir()
    r = torchrun(
        3,
        base_args(
            tmp_path,
            image_folder,
            model="[resnet20,mobilenet,resnet20]",
            mutual="ensemble",
            augment=True,
            consistency_check_every=1,
        ),
        env={"DML_FINGERPRINT_DIR": str(fp_dir), "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": ""},
        torchrun_args=["--max-restarts=1"],
    )
    assert r.returncode == 0, r.stderr[-3000:]
    warning = "warning: --max-restarts without TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: restarted gloo workers"
    assert r.stdout.count(warning) == 1, r.stdout[-2000:]
    # Every step of both epochs was fingerprinted on every rank, and the ranks saw byte-identical batches.
    f0 = _fingerprints(fp_dir, 0)
    assert len([line for line in f0 if line]) == 2 * (72 // 8)
    assert _fingerprints(fp_dir, 1) == f0 and _fingerprints(fp_dir, 2) == f0
    assert len(set(line.split()[3] for line in f0 if line)) == 18  # inputs differ from step to step
    summary = read_summary(tmp_path)
    _check_summary(summary, peers=3, epochs=2)
    _check_tensorboard(tmp_path / "logs" / "t", peers=3, epochs=2, history=summary["history"])
    assert summary["config"]["model"] == ["resnet20", "mobilenet", "resnet20"]
    assert summary["config"]["mutual"] == "ensemble"
    # 3 peers: auto takes the all-reduce of the softmax sums (tests/test_exchange.py: the same numbers)
    assert "exchange: all_reduce (auto: 3 peers >= 3" in r.stdout and summary["resolved"]["exchange"] == "all_reduce"
    assert all(h["train_kl"][k] > 0 for h in summary["history"] for k in range(3))
    # Rank 0 logged every rank's placement; non-zero ranks stay quiet.
    log = (tmp_path / "logs" / "t.log").read_text()
    assert all(f"placement: rank {k}" in log for k in range(3))
    assert r.stdout.count("placement: rank 1 ") == 1
    # Rank 0 wrote every peer's checkpoints, not only its own: the two ResNet-20s' weights differ.
    w1 = torch.load(tmp_path / "ckpt" / "t_model1_final.pth", weights_only=True)["model"]
    w3 = torch.load(tmp_path / "ckpt" / "t_model3_final.pth", weights_only=True)["model"]
    assert not torch.equal(w1["fc.weight"], w3["fc.weight"])
    assert torch.load(tmp_path / "ckpt" / "t_model2_best.pth", weights_only=True)["arch"] == "mobilenet"


@pytest.fixture(scope="module")
def solo(tmp_path_factory):
    """One plain process, model_num=1, no torchrun (and a progress bar asked for, off a terminal), on a tiny copy
    of CIFAR-10's python format: run once, read by the tests below."""
    from test_data import write_tiny_cifar10

    w = tmp_path_factory.mktemp("solo")
    write_tiny_cifar10(w / "cifar")
    args = base_args(w, w / "cifar", **CIFAR, model_num=1, progress_bar=True, nesterov=False)
    r = run_cmd(["taskset", "-c", str(TWO_CPUS[0]), sys.executable, "-m", "dml_dist.train", *args])  # 1 thread
    assert r.returncode == 0, r.stderr[-3000:]
    return w, r


def test_single_process_without_torchrun_is_plain_cross_entropy(solo):
    w, r = solo
    assert "epoch 1 [" in r.stdout and "%|" not in r.stderr + r.stdout  # progress_bar: only on a terminal
    summary = read_summary(w)
    _check_summary(summary, peers=1, epochs=1)
    assert summary["history"][0]["train_kl"] == [0.0]
    assert summary["history"][0]["train_loss"] == summary["history"][0]["train_ce"]


def _run_on_a_terminal(cmd, cwd, env=None, timeout=TIMEOUT):
    """``cmd`` with stdout and stderr on a pseudo-terminal (own session; the tree is killed on timeout)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a new pty is 0x0: no room for a bar
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=_env(env), cwd=cwd, start_new_session=True
    )
    os.close(slave)
    chunks, deadline = [], time.time() + timeout
    try:
        while True:
            ready, _, _ = select.select([master], [], [], max(0.0, deadline - time.time()))
            if not ready:
                pytest.fail(f"timed out after {timeout}s: {' '.join(cmd)}\n{b''.join(chunks)[-3000:]!r}")
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every process holding the terminal has exited
                break
            if not data:
                break
            chunks.append(data)
        proc.wait(timeout=60)
    finally:
        kill_tree(proc.pid)
        os.close(master)
    return proc.returncode, b"".join(chunks).decode(errors="replace")


def test_dml_train_without_torchrun_starts_the_peers_on_a_terminal(tmp_path, solo):
    """README: dml-train without torchrun starts model_num local processes itself, their output on this
    terminal (rank 0's log and progress bar); also nesterov=false and save_freq=0 (no epoch files).

    The same launch: the consistency check turned off lets a rank with other batches run on (nothing
    fingerprinted); with kl_weight=0 the peers train independently: peer 1 (rank 0, the shared seed's batches)
    ends with the weights of the model_num=1 run (one plain process, same seed, same images), whatever rank 1
    drew. The data is CIFAR-10's python format (a tiny copy), which trains in a cohort with its test split."""
    fp = tmp_path / "fp"
    fp.mkdir()
    args = base_args(
        tmp_path,
        solo[0] / "cifar",
        **CIFAR,
        model_num=2,
        progress_bar=True,
        save_freq=0,
        nesterov=False,
        consistency_check_every=0,
        kl_weight=0,
    )
    code, out = _run_on_a_terminal(  # on 2 CPUs: 1 thread per rank, as the solo run has, on any machine
        ["taskset", "-c", ",".join(map(str, TWO_CPUS)), sys.executable, "-m", "dml_dist.train", *args],
        tmp_path,
        env={"DML_FAULT": "action=seed_offset,rank=1", "DML_FINGERPRINT_DIR": str(fp)},
    )
    assert code == 0, out[-3000:]
    assert "placement: rank 0 (peer 1" in out and "placement: rank 1 (peer 2" in out
    assert "epoch 1/1" in out and "done: best acc" in out
    assert re.search(r"epoch 1: +\d+%\|", out), out[-3000:]  # rank 0's tqdm bar, on a terminal
    assert "dml-dist: error" not in out and "Traceback" not in out
    summary = read_summary(tmp_path)
    _check_summary(summary, peers=2, epochs=1)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == sorted(
        ["t_latest.pth"] + [f"t_model{k}_{tag}.pth" for k in (1, 2) for tag in ("best", "final")]
    )  # save_freq=0
    latest = torch.load(tmp_path / "ckpt" / "t_latest.pth", weights_only=True)
    assert [p["optimizer"]["param_groups"][0]["nesterov"] for p in latest["peers"]] == [False, False]
    # the check off, kl_weight 0, rank 1 on other batches
    assert "fault: seed_offset: rank 1 draws its batches with seed + 1" in out and list(fp.iterdir()) == []
    s = summary
    assert len(s["classes"]) == 10 and s["test_results"] is not None and len(s["test_results"]["peer_acc"]) == 2
    h = s["history"][0]
    assert h["train_loss"] == pytest.approx(h["train_ce"]) and all(k > 0 for k in h["train_kl"])
    peer1, alone = (
        torch.load(d / "ckpt" / "t_model1_final.pth", weights_only=True)["model"] for d in (tmp_path, solo[0])
    )
    for k in alone:
        assert torch.allclose(peer1[k].double(), alone[k].double(), atol=1e-5, rtol=0), k
    assert read_summary(solo[0])["history"][0]["val_loss"][0] == pytest.approx(h["val_loss"][0], abs=1e-5)


def test_diverging_rank_is_caught_by_the_consistency_check(tmp_path, image_folder):
    """Under torchrun, 3 ranks, rank 1 with another seed: every rank stops with the one line naming the odd one
    out. Who is named for other layouts (a pair, replicas' chunks) is the verdict's, checked in-process below."""
    r = torchrun(3, base_args(tmp_path, image_folder), env={"DML_FAULT": "action=seed_offset,rank=1"})
    assert r.returncode != 0
    errs = error_lines(r.stderr)
    assert len(errs) == 1, r.stderr[-3000:]
    needle = "rank(s) [1] drew different labels than rank(s) [0, 2]"
    assert f"batch mismatch at epoch 1 step 0: {needle}" in errs[0] and "same seed" in errs[0], errs[0]
    assert_no_worker_traceback(r.stderr)


def test_the_mismatch_verdict_names_the_odd_rank_or_both_sides_of_a_tie():
    from dml_dist.data.fingerprint import mismatch_verdict

    def fps(*ranks):  # per rank, per chunk: (labels hash, inputs hash), or None where the rank holds no such chunk
        return torch.tensor([[[0, 0, 0] if c is None else [1, *c] for c in chunks] for chunks in ranks])

    same, seed, aug = (1, 2), (5, 6), (1, 7)  # another seed changes the labels; another augmentation the inputs
    assert mismatch_verdict(fps([same], [same], [same])) is None
    assert (
        mismatch_verdict(fps([same], [seed]))
        == "rank(s) [0, 1] drew different labels (no majority tells which is right)"
    )
    assert mismatch_verdict(fps([same], [seed], [same])) == "rank(s) [1] drew different labels than rank(s) [0, 2]"
    assert (
        mismatch_verdict(fps([same], [same], [aug]))
        == "rank(s) [2] drew different augmented inputs than rank(s) [0, 1]"
    )
    # 2 peers x 2 replicas, peer-major: chunk 0 is held by ranks 0 and 2 (replica 0), chunk 1 by ranks 1 and 3; a
    # chunk's holders alone vote on it, so a pair of holders that disagree is a tie whatever the other chunk's say
    two_by_two = fps([same, None], [None, same], [seed, None], [None, same])
    assert mismatch_verdict(two_by_two) == "rank(s) [0, 2] drew different labels (no majority tells which is right)"
    assert mismatch_verdict(fps([same, None], [None, same], [same, None], [None, same])) is None


def _break(tmp_path, kind):
    d = make_image_folder(tmp_path / "data", n_train=6, n_val=2)
    if kind == "empty_class_folder":
        for f in (d / "train" / "dog").iterdir():
            f.unlink()
    elif kind == "unreadable_image":
        (d / "val" / "frog" / "0000.png").write_bytes(b"\x89PNG garbage")
    elif kind == "unknown_key":
        return base_args(tmp_path, d, learning_rate=0.1)
    return base_args(tmp_path, d)


@pytest.mark.parametrize(
    "kind,needle",
    [
        ("empty_class_folder", "holds no images"),
        ("unreadable_image", "cannot read image"),
        ("unknown_key", "unknown config key(s): 'learning_rate' (did you mean 'lr'?)"),
    ],
)
def test_bad_input_is_a_one_line_error_on_every_launch(tmp_path, kind, needle):
    """Bad input under torchrun. An empty class folder and an unreadable image are found by rank 0 (the scan, the
    cache build) and reach the other ranks through a collective; an unknown key stops every rank before a process
    group exists. Rank 0 may be slow to print (a loaded machine), before the group exists (unknown key) and with
    it up (the unreadable image: rank 1 waits for rank 0's report in the store): rank 1 must not exit first, or
    torchrun stops rank 0 before its line. A missing data_dir, mismatched class folders and model_num against the
    world are raised on every rank alike and reported by the same path as the unreadable image: their messages are
    checked in-process (tests/test_data.py, tests/test_config.py)."""
    slow = {"DML_FAULT": "action=slow_report,rank=0,seconds=6"} if kind != "empty_class_folder" else None
    r = torchrun(2, _break(tmp_path, kind), timeout=120, env=slow)
    assert r.returncode != 0
    errs = error_lines(r.stderr)
    assert len(errs) == 1 and needle in errs[0], r.stderr[-3000:]
    assert_no_worker_traceback(r.stderr)
    assert not (tmp_path / "ckpt").exists() or not any((tmp_path / "ckpt").iterdir())


def test_stalled_rank_ends_with_one_line_naming_it_and_the_restart_resumes(tmp_path, image_folder):
    """Issue 16: rank 1 stops (SIGSTOP) at epoch 2 step 1. Before the 12 s timeout, rank 0's log shows the
    slow step; at the timeout it prints one line from the heartbeats naming the stalled peer and rank, where it waited
    and the fix (issue 22: before the collectives' own timeout, a margin later). torchrun then restarts the group, which
    resumes from the epoch-1 checkpoint and finishes."""
    cmd = torchrun_cmd(2, base_args(tmp_path, image_folder, epochs=2, timeout=12), torchrun_args=["--max-restarts=1"])
    out_file = tmp_path / "stdout.txt"
    with open(out_file, "w") as out:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
            env=_env({"DML_FAULT": "action=sigstop,rank=1,epoch=2,step=1"}),
        )
        err = []
        deadline = threading.Timer(300, kill_tree, [proc.pid])  # a hang fails the test, never the suite
        deadline.start()
        try:
            for line in proc.stderr:
                err.append(line)
                if "stopped answering" in line:
                    # torchrun's SIGTERM cannot end a stopped process: it would SIGKILL it after a fixed 30 s
                    # grace before restarting; an operator's kill -9 (what the line asks for) skips the wait.
                    for pid in descendants(proc.pid):
                        try:
                            with open(f"/proc/{pid}/stat") as f:
                                if f.read().rsplit(")", 1)[1].split()[0] == "T":
                                    os.kill(pid, signal.SIGKILL)
                        except OSError:  # exited meanwhile
                            continue
            proc.wait(timeout=60)
        finally:
            deadline.cancel()
            kill_tree(proc.pid)
    r = subprocess.CompletedProcess(cmd, proc.returncode, out_file.read_text(), "".join(err))
    assert r.returncode == 0, r.stderr[-3000:]
    lines = error_lines(r.stderr)
    assert len(lines) == 1, r.stderr[-3000:]
    assert (
        "(rank 0) rank 1 (peer 2) stopped answering: rank 0 waited 12 s in the logits all-gather at epoch 2 "
        "step 1; its last report: epoch 2 step 0"
    ) in lines[0] and "raise timeout=" in lines[0], lines[0]
    # from the heartbeats at the 12 s detection, not from a collective's timeout (22 s: no backend line in [...]);
    # on NCCL the watchdog would abort the process then, without a word
    assert lines[0].endswith("raise timeout= (seconds)"), lines[0]
    slow = re.search(r"slow step: epoch 2 step 1 has taken (\d+\.\d) s", r.stdout)
    assert slow and 5 <= float(slow.group(1)) < 12, r.stdout[-3000:]  # the 5 s floor (tiny steps)
    assert "resumed from" in r.stdout and "1 epoch(s) and 0 step(s) done" in r.stdout
    assert len(read_summary(tmp_path)["history"]) == 2
