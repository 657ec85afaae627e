"""Issue 10: peers x data-parallel replicas on CPU/gloo (DeviceMesh + DDP within a peer, never across); issue 17:
replicas per peer as a list (``replicas: [1, 2]``), a layout that is not a rectangle."""

import re
import shutil
import sys

import pytest
import torch
from conftest import (
    REPO,
    assert_no_worker_traceback,
    base_args,
    error_lines,
    make_image_folder,
    read_summary,
    run_cmd,
    torchrun,
)

# SyncBN makes a peer's replicas compute exactly its full-batch step (below), so every layout of the same cohort
# must land on the same weights, up to float rounding. With one replica sync_bn changes nothing.
COMMON = dict(epochs=2, augment=True, sync_bn=True, momentum=0.9)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    # 9 val images: replica shares of 5 and 4, so evaluation reassembles uneven shards
    return make_image_folder(tmp_path_factory.mktemp("replicas") / "data", n_train=16, n_val=3)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, folder):
    """The module's launches, each run once on first use (2 peers, augmentation, 6 steps an epoch):
    ``r1``: 1 replica, 2 epochs, the reference (its epoch-1 files kept: save_freq=1); ``r12``: replicas [1, 2]
    (3 processes, started by launch/local.sh with REPLICAS=[1,2]), 1 epoch; ``r2``: 2 replicas with SyncBN and
    ``exchange: all_reduce`` (over each replica index's peer group; r1 all-gathers), 1 epoch; ``r2_resumed``:
    r2's checkpoint resumed with 1 replica to epoch 2; ``r2_nosync``: 2 replicas without SyncBN, 1 epoch;
    ``r2_replica_major``: the same with the peers of one replica index on consecutive ranks."""
    root = tmp_path_factory.mktemp("replica_runs")
    specs = {
        "r2": (4, {"replicas": 2, "exchange": "all_reduce"}),
        "r2_resumed": (2, {"resume": "auto"}),
        "r2_nosync": (4, {"replicas": 2, "sync_bn": False}),
        "r2_replica_major": (4, {"replicas": 2, "sync_bn": False, "rank_order": "replica"}),
    }
    done = {}

    def get(name):
        if name not in done:
            w = root / name
            if name == "r1":
                r = torchrun(2, base_args(w, folder, **COMMON))
            elif name == "r12":
                (root / "empty.yaml").write_text("{}\n")  # defaults + the same overrides as the reference
                cmd = ["bash", str(REPO / "launch" / "local.sh"), "2", "--config", str(root / "empty.yaml")]
                r = run_cmd(
                    [*cmd, *base_args(w, folder, **{**COMMON, "epochs": 1})],
                    env={"REPLICAS": "[1,2]", "PYTHON": sys.executable},
                )
            else:
                if name == "r2_resumed":
                    shutil.copytree(get("r2")[0] / "ckpt", w / "ckpt")
                nproc, extra = specs[name]
                r = torchrun(nproc, base_args(w, folder, **{**COMMON, "epochs": 1 if nproc == 4 else 2, **extra}))
            assert r.returncode == 0, r.stderr[-3000:]
            done[name] = (w, r)
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
    # to 1 at the checkpoint ends where the uninterrupted 1-replica run ends (a resume itself is bit-identical
    # to an uninterrupted run: tests/test_checkpoint.py).
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


def _assert_close(a, b, atol=1e-4):
    _assert_same_weights(_weights(a), _weights(b), atol)
    ha, hb = read_summary(a)["history"], read_summary(b)["history"]
    for x, y in zip(ha, hb):  # meters per peer over its replicas, evaluation reassembled from the shares
        for key in ("train_loss", "train_kl", "val_loss", "val_acc"):
            assert y[key] == pytest.approx(x[key], abs=1e-4), key
        assert y["ensemble_acc"] == x["ensemble_acc"]


def test_one_and_two_replicas_train_as_one_each(runs):
    """[1, 2] (3 processes, all-reduce by rows; started by launch/local.sh with REPLICAS=[1,2]) for one epoch: the
    weights and the epoch of [1, 1] (SyncBN)."""
    ref = runs("r1")[0]
    w, r = runs("r12")
    for rank, (peer, replica) in enumerate([(1, 0), (2, 0), (2, 1)]):
        assert f"placement: rank {rank} (peer {peer}, replica {replica})" in r.stdout
    assert "exchange: all_reduce (auto: replicas [1, 2]" in r.stdout  # uneven counts: the sums by rows
    # the log's per-peer compute / exchange-wait split (the idle share a layout is balanced by)
    assert "compute/exchange ms p1 " in r.stdout and " p2 " in r.stdout.split("compute/exchange ms", 1)[1]
    assert len(torch.load(w / "ckpt" / "t_latest.pth", weights_only=True)["peers"]) == 2
    assert read_summary(w)["config"]["replicas"] == [1, 2]
    _assert_same_weights(_weights(ref, tag="epoch_1"), _weights(w), atol=1e-4)
    _assert_same_epoch(read_summary(ref)["history"][0], read_summary(w)["history"][0])


def test_one_and_two_resume_as_two_and_one_with_the_all_gather(tmp_path, folder, runs):
    """A list layout's checkpoint resumed in another list layout: [1, 2]'s first epoch resumed as [2, 1] with
    exchange=all_gather (the logits by rows, shares padded to the largest) ends where [1, 1] ends (the rectangle
    resumed with fewer replicas: the 2 x 2 test above)."""
    ref = runs("r1")[0]
    w = tmp_path / "w"
    shutil.copytree(runs("r12")[0] / "ckpt", w / "ckpt")
    r = torchrun(3, base_args(w, folder, **COMMON, resume="auto", replicas="[2,1]", exchange="all_gather"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout and "1 epoch(s) and 0 step(s) done" in r.stdout
    assert "exchange: all_gather (set in the config)" in r.stdout
    assert read_summary(w)["config"]["replicas"] == [2, 1]
    _assert_close(ref, w)


@pytest.mark.parametrize(
    "world,overrides,needle",
    [
        (3, {"replicas": 2}, "model_num=1 x replicas=2 needs 2 processes but 3 were started"),
        (4, {"replicas": 2, "batch_size": 9}, "batch_size=9 does not divide by replicas=2"),
        (
            2,
            {"replicas": [1, 2]},
            "replicas=[1, 2] needs 3 processes (their sum) but 2 were started; launch torchrun --nproc_per_node=3",
        ),
    ],
)
def test_a_layout_that_does_not_fit_the_world_is_one_line(world, overrides, needle):
    """Raised by finalize_config from the config and the world size alone, so on every rank alike: checked
    in-process; the process group is set up before it with no replica layout (replica_layout gives None for a
    layout that does not fit). One such start is launched below."""
    from dml_dist.config import build_config
    from dml_dist.distributed.layout import replica_layout
    from dml_dist.errors import DMLError
    from dml_dist.world import finalize_config

    cfg = build_config(overrides=overrides)
    if "batch_size" not in overrides:
        assert replica_layout(cfg, world) is None
    with pytest.raises(DMLError, match=re.escape(needle)):
        finalize_config(cfg, world)


def test_a_replica_list_that_does_not_fit_is_one_line_under_torchrun(tmp_path, folder):
    """The start with a layout that does not fit the world, launched: the group comes up without a replica
    layout, and every rank stops with the one line, no traceback."""
    r = torchrun(2, base_args(tmp_path, folder, epochs=1, replicas="[1,2]"), timeout=120)
    assert r.returncode != 0
    errs = error_lines(r.stderr)
    needle = "replicas=[1, 2] needs 3 processes (their sum) but 2 were started; launch torchrun --nproc_per_node=3"
    assert len(errs) == 1 and needle in errs[0], r.stderr[-3000:]
    assert_no_worker_traceback(r.stderr)


def test_replicas_auto_follows_the_world_and_refuses_what_does_not_fit():
    from dml_dist.config import build_config
    from dml_dist.errors import DMLError
    from dml_dist.world import finalize_config

    cfg = build_config(overrides={"replicas": "auto", "model_num": 2, "batch_size": 8})
    assert [finalize_config(cfg, w)["replicas"] for w in (2, 4, 8)] == [1, 2, 4]
    for overrides, world, needle in (
        ({"model_num": None}, 4, "replicas=auto needs the number of peers"),
        ({"model_num": 2}, 3, "replicas=auto: 3 processes do not split into 2 peers"),
        ({"model_num": 2, "batch_size": 6}, 8, "batch_size=6 does not divide by replicas=4"),
    ):
        with pytest.raises(DMLError, match=re.escape(needle)):
            finalize_config(build_config(overrides={"replicas": "auto", "batch_size": 8, **overrides}), world)


@pytest.mark.parametrize(
    "replicas,model_num,batch,needle",
    [
        ([1, 0], None, 8, "replicas must be an integer >= 1, auto (the world size / model_num), or a list of integers"),
        ([1, 2, 1], 2, 8, "replicas lists 3 counts for 2 peers"),
        ([1, 3], None, 8, "batch_size=8 does not divide by replicas=3"),
    ],
)
def test_replica_list_config_errors(replicas, model_num, batch, needle):
    from dml_dist.config import build_config
    from dml_dist.errors import DMLError
    from dml_dist.world import finalize_config

    with pytest.raises(DMLError, match=re.escape(needle)):
        cfg = build_config(overrides={"replicas": replicas, "model_num": model_num, "batch_size": batch})
        finalize_config(cfg, sum(replicas))
