"""Checkpoints, exact resume, elastic restart after SIGKILL, atomic writes, refused files."""

import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import (
    TIMEOUT,
    _env,
    assert_no_worker_traceback,
    base_args,
    error_lines,
    kill_tree,
    make_image_folder,
    torchrun,
    torchrun_cmd,
)

from dml_dist import DMLError, load_dml_models
from dml_dist.checkpoint.files import check_cohort_checkpoint, load_checkpoint

EPOCHS = 4
# Every run of this module; kl_warmup_epochs: every resume test also proves that the warm-up ramp survives it.
RUN = dict(
    epochs=EPOCHS,
    save_freq=1,
    keep_last=2,
    augment=True,
    step_size=2,
    save_dir="save",
    log_dir="log",
    kl_warmup_epochs=2,
)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("ckdata") / "data")


def _launch(workdir: Path, data_dir, nproc=2, env=None, torchrun_args=(), **extra):
    """torchrun from ``workdir`` with relative save/log dirs, so runs in different folders report
    identical configs."""
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = {**RUN, **extra}
    return torchrun(nproc, base_args(workdir, data_dir, **cfg), env=env, torchrun_args=torchrun_args, cwd=workdir)


def _final_weights(workdir: Path, peers=2):
    return [
        torch.load(workdir / "save" / f"t_model{k}_final.pth", weights_only=True)["model"] for k in range(1, peers + 1)
    ]


def _summary(workdir: Path, ignore_config=()) -> dict:
    s = json.loads((workdir / "log" / "t_summary.json").read_text())
    s.pop("run")  # wall-clock times and resume records: the only part allowed to differ
    for k in ignore_config:
        s["config"].pop(k)
    if "loader" in ignore_config:  # another data path on purpose: what start-up resolved says so
        s["resolved"].pop("data_path"), s["resolved"].pop("data_why")
    return s


def _assert_same_run(a: Path, b: Path, ignore_config=()):
    """Bit-identical final weights of every peer and the same summary (``ignore_config``: keys that the
    second run set differently on purpose, e.g. how often it checkpoints)."""
    for wa, wb in zip(_final_weights(a), _final_weights(b)):
        assert wa.keys() == wb.keys()
        for k in wa:
            assert torch.equal(wa[k], wb[k]), k
    assert _summary(a, ignore_config) == _summary(b, ignore_config)


def _no_temp_files(workdir: Path):
    return [p.name for p in (workdir / "save").iterdir() if ".tmp" in p.name]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
    """The uninterrupted run every other run must reproduce."""
    w = tmp_path_factory.mktemp("reference")
    r = _launch(w, data_dir)
    assert r.returncode == 0, r.stderr[-3000:]
    return w


def test_reference_run_writes_every_checkpoint_loadable_with_weights_only(reference):
    names = sorted(p.name for p in (reference / "save").iterdir())
    assert names == sorted(
        ["t_latest.pth"] + [f"t_model{k}_{tag}.pth" for k in (1, 2) for tag in ("best", "final", "epoch_3", "epoch_4")]
    )
    for p in (reference / "save").iterdir():
        torch.load(p, weights_only=True)
    latest = torch.load(reference / "save" / "t_latest.pth", weights_only=True)
    assert latest["epoch"] == EPOCHS and latest["step"] == 0 and len(latest["peers"]) == 2
    assert {"model", "optimizer", "scheduler", "rng", "arch"} <= set(latest["peers"][0])
    assert latest["versions"]["torch"] == str(torch.__version__) and len(latest["history"]) == EPOCHS
    assert latest["peers"][0]["scheduler"]["last_epoch"] == EPOCHS
    best = torch.load(reference / "save" / "t_model1_best.pth", weights_only=True)
    assert best["accuracy"] == max(h["val_acc"][0] for h in latest["history"])
    # StepLR (lr 0.05, step_size 2, gamma 0.1): the lr each epoch trained with, and SGD's Nesterov default
    assert [h["lr"] for h in latest["history"]] == pytest.approx([0.05, 0.05, 0.005, 0.005], rel=1e-12)
    for peer in latest["peers"]:
        group = peer["optimizer"]["param_groups"][0]
        assert group["nesterov"] is True and group["momentum"] == 0.9
        assert group["fused"] is True  # the fused kernel on CPU too: what a GPU step runs
        assert group["lr"] == pytest.approx(0.0005, rel=1e-12)  # after epoch 4's step: the next epoch's lr
    # load_dml_models on the cohort file gives every peer, with the final weights
    loaded = load_dml_models([str(reference / "save" / "t_latest.pth")], "cpu")["models"]
    assert len(loaded) == 2
    for model, final in zip(loaded, _final_weights(reference)):
        state = model.state_dict()
        assert state.keys() == final.keys() and all(torch.equal(state[k], final[k]) for k in final)
    # the mutual term ramps up over 2 epochs, then has its full weight
    first, last = latest["history"][0], latest["history"][-1]
    for k in range(2):
        assert first["train_loss"][k] < first["train_ce"][k] + first["train_kl"][k]
        assert last["train_loss"][k] == pytest.approx(last["train_ce"][k] + last["train_kl"][k], rel=1e-6)


# With save_every_steps=2 the newest step checkpoint before the kill is step 5, or an earlier one (3, 1) when
# torchrun's SIGTERM reached rank 0 while its writer thread was still writing (the temp file is discarded).
# loader=stream: the same run through the stream path (each batch decoded from the files by the two ranks
# together, in a worker) must give the memory path's weights bit for bit, a mid-epoch resume included.
@pytest.mark.parametrize("loader", ["memory", "stream"])
def test_sigkilled_worker_is_restarted_and_finishes_identically(tmp_path, data_dir, reference, request, loader):
    """The fingerprint check also runs on the first step after the resume (README promise), which no check_every
    multiple would reach. The first attempt's rank 0 says in one line that it lost contact (the memory case:
    torchrun checks its workers every 5 s there, default 0.1 s, so that it does not stop rank 0 before its line).

    The memory case starts from another experiment's epoch-1 checkpoint (``resume=PATH``, defect 3): torchrun's
    restart must continue from this experiment's own, newer ``_latest.pth`` (epoch 2, mid-epoch), not reload PATH
    (1 epoch, 0 steps) and throw away the progress since. A resume at an epoch's boundary ends bit-identical too:
    the new launches of the kill_in_save and SIGTERM test below, and here the memory case's start from PATH. (A
    torchrun restart that resumes at an epoch's boundary is no longer compared with the reference: every restart
    here resumes mid-epoch; the stalled-rank test's restart resumes at a boundary and finishes.)"""
    w, fp = tmp_path / "killed", tmp_path / "fp"
    fp.mkdir()
    if loader == "stream":
        extra = {"loader": "stream", "num_workers": 1}
    else:
        extra = {"resume": str(request.getfixturevalue("crashed")[1])}
    r = _launch(
        w,
        data_dir,
        torchrun_args=["--max-restarts=1", *(["--monitor-interval=5"] if loader == "memory" else [])],
        save_every_steps=2,
        env={"DML_FAULT": "action=sigkill,rank=1,epoch=2,step=5", "DML_FINGERPRINT_DIR": str(fp)},
        **extra,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    # torchrun names the first failure it sees: rank 1's SIGKILL, or (checking every 5 s) rank 0's exit after its line
    first = ["(exitcode: -9) local_rank: 1", *(["(exitcode: 1) local_rank: 0"] if loader == "memory" else [])]
    restart = f"torchrun restart 1: resume={extra.get('resume', 'auto')}"  # as configured: rank 0 then picks the file
    assert any(f in r.stderr for f in first) and restart in r.stdout, r.stderr[-3000:]
    if loader == "memory":
        assert f"resumed from {extra['resume']}: 1 epoch(s) and 0 step(s) done" in r.stdout, r.stdout[-2000:]
    found = re.search(r"resumed from save/t_latest\.pth: 1 epoch\(s\) and ([135]) step\(s\) done", r.stdout)
    assert found, r.stdout[-2000:]
    for rank in (0, 1):  # lines "epoch step labels-hash inputs-hash", the epoch counted from 1
        checked = [line.split()[:2] for line in (fp / f"fingerprints_rank{rank}.txt").read_text().splitlines()]
        assert ["2", found.group(1)] in checked, checked
    assert f"data path: {loader}" in r.stdout
    if loader == "memory":
        lines = error_lines(r.stderr)
        assert len(lines) == 1, r.stderr[-3000:]
        assert re.fullmatch(
            r"dml-dist: error: \(rank 0\) lost contact with another rank \(.+\); see that rank's error", lines[0]
        ), lines[0]
        assert_no_worker_traceback(r.stderr)
    _assert_same_run(reference, w, ignore_config=["save_every_steps", *(k for k in extra if k != "resume")])
    assert _no_temp_files(w) == []


@pytest.fixture(scope="module")
def crashed(tmp_path_factory, data_dir):
    """A fresh start with ``resume=auto`` (no checkpoint yet) whose rank 0 dies between a checkpoint's temp write
    and its rename in epoch 2: ``save`` keeps epoch 1's files and the temp file. Epoch 1's ``_latest.pth`` is also
    copied aside, as another experiment's checkpoint for the memory sigkill case (defect 3; a launch fewer)."""
    w = tmp_path_factory.mktemp("crash")
    r = _launch(w, data_dir, resume="auto", env={"DML_FAULT": "action=kill_in_save,rank=0,epoch=2"})
    assert r.returncode != 0
    assert "resume=auto: no checkpoint for this experiment yet, starting fresh" in r.stdout
    assert "resumed from" not in r.stdout
    assert _no_temp_files(w), "the simulated crash should leave its temp file behind"
    epoch1 = tmp_path_factory.mktemp("epoch1") / "t_latest.pth"
    shutil.copy(w / "save" / "t_latest.pth", epoch1)
    return w, epoch1


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_of_another_architecture_is_refused_in_one_line_on_every_rank(tmp_path, data_dir, reference):
    """The whole path once, under torchrun: rank 0 reads and checks the file, every rank stops with its line."""
    bad = tmp_path / "bad.pth"
    shutil.copy(reference / "save" / "t_latest.pth", bad)
    r = _launch(tmp_path / "w", data_dir, resume=str(bad), model="resnet32")
    assert r.returncode != 0
    errs = error_lines(r.stderr)
    needle = "peer 1 is resnet20 but this run builds resnet32; set model=resnet20"
    assert len(errs) == 1 and needle in errs[0] and str(bad) in errs[0], r.stderr[-3000:]
    assert_no_worker_traceback(r.stderr)
    # the refused file is kept as it was, and the refused run wrote nothing
    assert bad.read_bytes() == (reference / "save" / "t_latest.pth").read_bytes()
    assert not (tmp_path / "w" / "save").exists() or not any((tmp_path / "w" / "save").iterdir())


@pytest.mark.parametrize(
    "case,needle",
    [
        ("peers", "holds 2 peers but this run has model_num=3"),
        ("truncated", "is truncated or corrupt"),
        ("pickled_code", "holds pickled objects other than tensors and plain values; refused"),
        ("single_peer", "holds a single peer, not a cohort"),
        ("classes", "has 3 classes but the data has 4; use the data it was trained on"),
    ],
)
def test_refused_checkpoints(tmp_path, reference, case, needle):
    """The checks a resume makes (rank 0, before any state is handed out), in-process: the launch above shows
    that a refusal ends every rank with its one line."""
    src, bad = reference / "save" / "t_latest.pth", tmp_path / "bad.pth"
    cfg, archs, classes = {"model_num": 2}, ["resnet20"] * 2, 3
    if case == "peers":
        shutil.copy(src, bad)
        cfg, archs = {"model_num": 3}, ["resnet20"] * 3
    elif case == "truncated":
        data = src.read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    elif case == "pickled_code":
        evil = _Evil()
        evil.marker = str(tmp_path / "pwned")
        torch.save({"format": "dml-dist/1", "kind": "cohort", "payload": evil}, bad)
    elif case == "single_peer":
        shutil.copy(reference / "save" / "t_model1_best.pth", bad)
    elif case == "classes":
        shutil.copy(src, bad)
        classes = 4
    with pytest.raises(DMLError) as e:
        check_cohort_checkpoint(load_checkpoint(str(bad)), str(bad), cfg, archs, classes)
    assert needle in str(e.value) and str(bad) in str(e.value)
    assert not (tmp_path / "pwned").exists()


def test_kill_in_save_keeps_the_last_checkpoint_and_sigterm_lets_rank0_finish_the_queued_writes(
    tmp_path, data_dir, reference, crashed
):
    """Two failures, one after the other, on the run that ``crashed`` left (a launch fewer than one each).

    1. Rank 0 died between a checkpoint's temp write and its rename: epoch 1's files are intact, and the next
       launch (``resume=auto``) removes the temp file and resumes from them.
    2. Preemption (SLURM, scancel, torchrun stopping the group): that launch gets SIGTERM while rank 0's writer
       is busy on a slow disk (each checkpoint takes 3 s). The queued checkpoints must not be lost: the workers
       finish them within torchrun's grace period and die of the signal.

    ``resume=auto`` then reproduces the reference, which both recoveries must have kept intact."""
    w = crashed[0]
    latest = torch.load(w / "save" / "t_latest.pth", weights_only=True)
    assert latest["epoch"] == 1 and _no_temp_files(w)
    cmd = torchrun_cmd(2, base_args(w, data_dir, **RUN, resume="auto"))
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            cwd=w,
            start_new_session=True,
            env=_env({"DML_FAULT": "action=slow_save,seconds=3"}),
        )
        lines = []
        try:
            for line in proc.stdout:  # the writer has begun its 3 s sleep on epoch 2's files: it is busy
                lines.append(line)
                if line.startswith("fault: slow_save"):
                    proc.send_signal(signal.SIGTERM)
                    break
            out = "".join(lines) + proc.communicate(timeout=TIMEOUT)[0]
        finally:
            kill_tree(proc.pid)
    stderr = (tmp_path / "stderr.txt").read_text()
    assert "removed save/.t_" in out and "resumed from save/t_latest.pth: 1 epoch(s) and 0 step(s) done" in out, out
    assert proc.returncode != 0 and "epoch 4/4" not in out, out[-2000:]
    assert "SIGTERM: finishing the queued checkpoint writes, then stopping" in out, out[-2000:]
    assert "Unable to shutdown process" not in stderr, stderr[-3000:]  # nobody needed torchrun's SIGKILL
    assert_no_worker_traceback(stderr)
    # Epoch 2's save was queued before epoch 3 began; epoch 3's may have been queued before the signal.
    latest = torch.load(w / "save" / "t_latest.pth", weights_only=True)
    done = latest["epoch"]
    assert done in (2, 3) and latest["step"] == 0
    assert (w / "save" / f"t_model2_epoch_{done}.pth").is_file() and _no_temp_files(w) == []
    r = _launch(w, data_dir, resume="auto")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from save/t_latest.pth: {done} epoch(s) and 0 step(s) done" in r.stdout
    _assert_same_run(reference, w)
    assert _no_temp_files(w) == []


def test_optimizer_state_from_a_fused_run_resumes_unfused_and_back():
    """A checkpoint's param groups carry ``fused``, which a plain ``load_state_dict`` would copy over this run's
    choice: the trainer's fused SGD (on every device) resumes a checkpoint of an older, unfused CPU run,
    and a plain optimizer (the API's) takes a fused run's state, each keeping its own kernel."""
    from dml_dist.checkpoint import load_optimizer_state

    w = [torch.nn.Parameter(torch.randn(4))]
    fused = torch.optim.SGD(w, lr=0.1, momentum=0.9, fused=True)
    w[0].grad = torch.ones(4)
    fused.step()
    plain = torch.optim.SGD([torch.nn.Parameter(w[0].detach().clone())], lr=0.1, momentum=0.9)
    load_optimizer_state(plain, fused.state_dict())
    assert plain.param_groups[0]["fused"] is None and plain.param_groups[0]["lr"] == 0.1
    assert torch.equal(
        next(iter(plain.state.values()))["momentum_buffer"], next(iter(fused.state.values()))["momentum_buffer"]
    )
    again = torch.optim.SGD(w, lr=0.1, momentum=0.9, fused=True)
    load_optimizer_state(again, plain.state_dict())
    assert again.param_groups[0]["fused"] is True


def test_a_sigterm_while_a_write_is_queued_waits_until_it_is_counted():
    """``sigterm_held`` (around ``CheckpointWriter.submit``): a SIGTERM inside the block, with other threads in
    the process that could take it, raises ``Stopped`` only after the block, never inside it."""
    import os
    import threading
    import time

    from dml_dist import errors

    before = signal.getsignal(signal.SIGTERM)
    state = (errors._Sigterm.pid, errors._Sigterm.armed, errors._Sigterm.received)
    busy = threading.Event()
    other = threading.Thread(target=busy.wait, daemon=True)  # a thread the kernel may hand the signal to
    other.start()
    reached = []
    try:
        errors.stop_on_sigterm()
        with pytest.raises(errors.Stopped):
            with errors.sigterm_held():
                os.kill(os.getpid(), signal.SIGTERM)
                for _ in range(50):  # Python would run the handler in any of these bytecodes
                    time.sleep(0.002)
                reached.append("the block's end")
        assert reached == ["the block's end"] and errors.sigterm_received()
    finally:
        busy.set()
        signal.signal(signal.SIGTERM, before)
        errors._Sigterm.pid, errors._Sigterm.armed, errors._Sigterm.received = state
