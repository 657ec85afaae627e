"""Issue 21: a job that loses a node goes on. Two torchrun agents on localhost (c10d rendezvous) are two
nodes of an elastic job (``--nnodes=1:2``); the second is killed with its ranks mid-run, and the first
carries on alone with ``replicas: auto`` (2 peers x 2 replicas -> 2 peers x 1) from the latest checkpoint."""

import socket
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, _env, base_args, kill_tree, make_image_folder, read_summary


def test_a_lost_node_is_survived_with_fewer_replicas(tmp_path):
    data = make_image_folder(tmp_path / "data", n_train=32, n_val=4)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = base_args(tmp_path, data, model_num=2, replicas="auto", epochs=5, batch_size=8, save_every_steps=4)
    conf = "keep_alive_interval=1,keep_alive_max_attempt=3,join_timeout=60,last_call_timeout=2"

    def agent(host: int):
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes=1:2",
            "--nproc_per_node=2",
            "--max-restarts=2",
            "--rdzv_backend=c10d",
            f"--rdzv_endpoint=127.0.0.1:{port}",
            "--rdzv_id=elastic",
            f"--rdzv_conf={conf},is_host={host}",
            "-m",
            "dml_dist.train",
            *args,
        ]
        logs = [open(tmp_path / f"agent{host}.{k}", "w+") for k in ("out", "err")]
        return subprocess.Popen(
            cmd, stdout=logs[0], stderr=logs[1], text=True, env=_env(), cwd=REPO, start_new_session=True
        )

    first = agent(1)  # hosts the rendezvous store: the node that stays
    time.sleep(2)
    second = agent(0)
    latest = tmp_path / "ckpt" / "t_latest.pth"
    try:
        deadline = time.time() + 240
        while time.time() < deadline and first.poll() is None:  # wait for the first epoch's checkpoint
            if latest.is_file() and torch.load(latest, weights_only=True)["epoch"] >= 1:
                break
            time.sleep(0.5)
        assert first.poll() is None, (tmp_path / "agent1.err").read_text()[-3000:]
        kill_tree(second.pid)  # the node is lost: its agent and its ranks (each in a session of its own)
        second.wait()
        first.wait(timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail("the surviving node did not finish")
    finally:
        for p in (first, second):
            if p.poll() is None:
                kill_tree(p.pid)
    out, err = ((tmp_path / f"agent1.{k}").read_text() for k in ("out", "err"))
    assert first.returncode == 0, err[-4000:]
    assert "replicas: auto = 2 per peer (4 processes, 2 peers)" in out
    assert "replicas: auto = 1 per peer (2 processes, 2 peers)" in out
    assert "replicas: the checkpoint was trained with 2 per peer, this run has 1 (2 processes)" in out
    summary = read_summary(tmp_path)
    assert [h["epoch"] for h in summary["history"]] == list(range(1, 6)) and summary["config"]["replicas"] == 1
    assert summary["run"]["resumed_from"]
