"""Issue 10: peers x data-parallel replicas on CPU/gloo (DeviceMesh + DDP within a peer, never across)."""
import shutil

import pytest
import torch

from conftest import assert_no_worker_traceback, base_args, error_lines, make_image_folder, read_summary, torchrun


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("replicas") / "data", n_train=16, n_val=4)


def _weights(path, peers=2, tag="final"):
    return [torch.load(path / "ckpt" / f"t_model{k}_{tag}.pth", weights_only=True)["model"] for k in range(1, peers + 1)]


def test_two_peers_times_two_replicas_train_and_resume_with_one_replica(tmp_path, folder):
    w = tmp_path / "r2"
    r = torchrun(4, base_args(w, folder, replicas=2, epochs=1, augment=True))
    assert r.returncode == 0, r.stderr[-3000:]
    s = read_summary(w)
    assert len(s["best_accuracies"]) == 2 and s["config"]["replicas"] == 2 and s["config"]["model_num"] == 2
    for rank, (peer, replica) in enumerate([(1, 0), (1, 1), (2, 0), (2, 1)]):
        assert f"placement: rank {rank} (peer {peer}, replica {replica})" in r.stdout
    latest = torch.load(w / "ckpt" / "t_latest.pth", weights_only=True)
    assert len(latest["peers"]) == 2  # one state per peer, whatever the number of replicas
    # Resumed with 1 replica (2 processes); any other count goes the same way (4 replicas = 8 processes: too
    # slow for the suite).
    other = tmp_path / "resume_r1"
    shutil.copytree(w / "ckpt", other / "ckpt")
    r = torchrun(2, base_args(other, folder, replicas=1, epochs=2, augment=True, resume="auto"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout and "1 epoch(s) and 0 step(s) done" in r.stdout
    assert [h["epoch"] for h in read_summary(other)["history"]] == [1, 2]


def test_sync_bn_step_over_replicas_equals_full_batch_step(tmp_path):
    """One step (the train set is one batch): DDP's average over equal shards with SyncBN statistics is the
    full-batch gradient, so 2 peers x 2 replicas end with the weights of 2 peers x 1 replica."""
    one_batch = make_image_folder(tmp_path / "data", n_train=4, n_val=2)  # 12 training images
    runs = {}
    for name, nproc, extra in (("r1", 2, {}), ("r2", 4, {"replicas": 2, "sync_bn": True})):
        r = torchrun(nproc, base_args(tmp_path / name, one_batch, batch_size=12, epochs=1, augment=True,
                                      momentum=0.9, **extra))
        assert r.returncode == 0, r.stderr[-3000:]
        runs[name] = _weights(tmp_path / name)
    for a, b in zip(runs["r1"], runs["r2"]):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.allclose(a[k].double(), b[k].double(), atol=1e-5, rtol=0), k
    h1, h2 = read_summary(tmp_path / "r1")["history"][0], read_summary(tmp_path / "r2")["history"][0]
    assert h2["train_loss"] == pytest.approx(h1["train_loss"], abs=1e-5)  # meters: per peer, over its replicas


@pytest.mark.parametrize("nproc,extra,needle", [
    (3, {"replicas": 2}, "model_num=1 x replicas=2 needs 2 processes but 3 were started"),
    (4, {"replicas": 2, "batch_size": 9}, "batch_size=9 does not divide by replicas=2"),
])
def test_bad_layouts_are_one_line_errors(tmp_path, folder, nproc, extra, needle):
    r = torchrun(nproc, base_args(tmp_path, folder, **extra), timeout=120)
    assert r.returncode != 0
    errs = error_lines(r.stderr)
    assert len(errs) == 1 and needle in errs[0], r.stderr[-3000:]
    assert_no_worker_traceback(r.stderr)
