"""Issue 10: peers x data-parallel replicas on CPU/gloo (DeviceMesh + DDP within a peer, never across)."""

import shutil

import pytest
import torch
from conftest import assert_no_worker_traceback, base_args, error_lines, make_image_folder, read_summary, torchrun


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    # 9 val images: replica shares of 5 and 4, so evaluation reassembles uneven shards
    return make_image_folder(tmp_path_factory.mktemp("replicas") / "data", n_train=16, n_val=3)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, folder):
    """The module's launches, each run once on first use (2 peers, augmentation, 6 steps an epoch):
    ``r1``: 1 replica, 2 epochs, the reference; ``r2``: 2 replicas with SyncBN and ``exchange: all_reduce``
    (over each replica index's peer group; r1 all-gathers), 1 epoch; ``r2_resumed``:
    r2's checkpoint resumed with 1 replica to epoch 2; ``r2_nosync``: 2 replicas without SyncBN, 1 epoch;
    ``r2_replica_major``: the same with the peers of one replica index on consecutive ranks."""
    root = tmp_path_factory.mktemp("replica_runs")
    specs = {
        "r1": (2, {"epochs": 2}),
        "r2": (4, {"replicas": 2, "sync_bn": True, "exchange": "all_reduce"}),
        "r2_resumed": (2, {"epochs": 2, "sync_bn": True, "resume": "auto"}),
        "r2_nosync": (4, {"replicas": 2, "sync_bn": False}),
        "r2_replica_major": (4, {"replicas": 2, "sync_bn": False, "rank_order": "replica"}),
    }
    done = {}

    def get(name):
        if name not in done:
            if name == "r2_resumed":
                shutil.copytree(get("r2")[0] / "ckpt", root / name / "ckpt")
            nproc, extra = specs[name]
            r = torchrun(nproc, base_args(root / name, folder, **{"epochs": 1, "augment": True, **extra}))
            assert r.returncode == 0, r.stderr[-3000:]
            done[name] = (root / name, r)
        return done[name]

    return get


def _weights(path, peers=2, tag="final"):
    return [
        torch.load(path / "ckpt" / f"t_model{k}_{tag}.pth", weights_only=True)["model"] for k in range(1, peers + 1)
    ]


def _assert_same_weights(a, b, atol):
    for wa, wb in zip(a, b):
        assert wa.keys() == wb.keys()
        for k in wa:
            assert torch.allclose(wa[k].double(), wb[k].double(), atol=atol, rtol=0), k


def _assert_same_epoch(h1, h2):
    """One epoch's history entries agree: the meters (per peer, over its replicas) and the evaluation,
    which rank 0 reassembles from the replicas' shares of the val set (peers and ensemble)."""
    for key in ("train_loss", "train_ce", "train_kl", "val_loss"):
        assert h2[key] == pytest.approx(h1[key], abs=1e-5), key
    assert h2["train_acc"] == h1["train_acc"] and h2["val_acc"] == h1["val_acc"]
    assert h2["ensemble_acc"] == h1["ensemble_acc"]
    assert h2["ensemble_loss"] == pytest.approx(h1["ensemble_loss"], abs=1e-5)


def test_two_peers_times_two_replicas_train_and_resume_with_one_replica(runs):
    w, r = runs("r2")
    s = read_summary(w)
    assert len(s["best_accuracies"]) == 2 and s["config"]["replicas"] == 2 and s["config"]["model_num"] == 2
    for rank, (peer, replica) in enumerate([(1, 0), (1, 1), (2, 0), (2, 1)]):
        assert f"placement: rank {rank} (peer {peer}, replica {replica})" in r.stdout
    assert "exchange: all_reduce (set in the config)" in r.stdout
    latest = torch.load(w / "ckpt" / "t_latest.pth", weights_only=True)
    assert len(latest["peers"]) == 2  # one state per peer, whatever the number of replicas
    # Resumed with 1 replica (2 processes); any other count goes the same way (4 replicas = 8 processes: too
    # slow for the suite).
    other, r = runs("r2_resumed")
    assert "resumed from" in r.stdout and "1 epoch(s) and 0 step(s) done" in r.stdout
    resumed = read_summary(other)["history"]
    assert [h["epoch"] for h in resumed] == [1, 2]
    # With SyncBN an epoch over 2 replicas is the full-batch epoch, so the run that switched from 2 replicas
    # to 1 at the checkpoint ends where the uninterrupted 1-replica run ends.
    ref = runs("r1")[0]
    _assert_same_weights(_weights(ref), _weights(other), atol=1e-4)
    for h1, h2 in zip(read_summary(ref)["history"], resumed):
        _assert_same_epoch(h1, h2)


def test_sync_bn_epoch_over_replicas_equals_full_batch_epoch(runs):
    """DDP's average over equal shards with SyncBN statistics is the full-batch gradient, so 2 peers x 2
    replicas end epoch 1 with the weights of 2 peers x 1 replica, and score the same; without SyncBN
    (statistics per shard) they do not."""
    ref, sync, nosync = runs("r1")[0], runs("r2")[0], runs("r2_nosync")[0]
    epoch1 = _weights(ref, tag="epoch_1")
    _assert_same_weights(epoch1, _weights(sync), atol=1e-5)
    _assert_same_epoch(read_summary(ref)["history"][0], read_summary(sync)["history"][0])
    # negative control: per-shard statistics change the gradients and the running statistics
    apart = max(
        (a[k].double() - b[k].double()).abs().max().item()
        for a, b in zip(epoch1, _weights(nosync))
        for k in a
        if a[k].is_floating_point()
    )
    assert apart > 1e-3, apart


def test_replica_major_ranks_train_exactly_as_peer_major(runs):
    """rank_order=replica puts the peers of one replica index on consecutive ranks (what a node needs to
    decode only its rows): the groups, the exchange, the checkpoint gather and the evaluation reassembly all
    follow the mapping, so the weights and the history are those of the peer-major run, bit for bit."""
    (peer_major, _), (replica_major, r) = runs("r2_nosync"), runs("r2_replica_major")
    assert "rank order: replica (rank_order=replica)" in r.stdout
    for rank, (peer, replica) in enumerate([(1, 0), (2, 0), (1, 1), (2, 1)]):
        assert f"placement: rank {rank} (peer {peer}, replica {replica})" in r.stdout
    for a, b in zip(_weights(peer_major), _weights(replica_major)):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert read_summary(peer_major)["history"] == read_summary(replica_major)["history"]


def test_replicas_without_sync_bn_report_what_the_checkpoint_holds(runs, folder):
    """Without SyncBN each replica updates BatchNorm's running statistics from its own shard; before each
    evaluation the replicas take replica 0's (the saved state), so the summary's final validation figures
    are those of the final checkpoints, scored again here the way dml-eval scores them."""
    from dml_dist.data import build_datasets, make_eval_loader
    from dml_dist.evaluate import evaluate_dml_models, load_dml_models

    path, _ = runs("r2_nosync")
    last = read_summary(path)["history"][-1]
    ckpts = [str(path / "ckpt" / f"t_model{k}_final.pth") for k in (1, 2)]
    loaded = load_dml_models(ckpts, "cpu")
    cfg = {**loaded["configs"][0], "data_dir": str(folder), "augment": False, "download": False}
    rows = evaluate_dml_models(loaded["models"], make_eval_loader(build_datasets(cfg).val, 64), "cpu")
    assert [r["loss"] for r in rows[:2]] == pytest.approx(last["val_loss"], abs=1e-6)
    assert [r["accuracy"] for r in rows[:2]] == last["val_acc"]
    assert rows[2]["loss"] == pytest.approx(last["ensemble_loss"], abs=1e-6)


@pytest.mark.parametrize(
    "nproc,extra,needle",
    [
        (3, {"replicas": 2}, "model_num=1 x replicas=2 needs 2 processes but 3 were started"),
        (4, {"replicas": 2, "batch_size": 9}, "batch_size=9 does not divide by replicas=2"),
    ],
)
def test_bad_layouts_are_one_line_errors(tmp_path, folder, nproc, extra, needle):
    r = torchrun(nproc, base_args(tmp_path, folder, **extra), timeout=120)
    assert r.returncode != 0
    errs = error_lines(r.stderr)
    assert len(errs) == 1 and needle in errs[0], r.stderr[-3000:]
    assert_no_worker_traceback(r.stderr)
