"""Issue 17: replicas per peer as a list (``replicas: [1, 2]``): a layout that is not a rectangle."""

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

# SyncBN makes a peer's replicas compute exactly its full-batch step (test_replicas.py), so every layout of
# the same cohort must land on the same weights, up to float rounding.
COMMON = dict(epochs=2, augment=True, sync_bn=True, momentum=0.9)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("lists") / "data", n_train=16, n_val=4)  # 6 steps per epoch


@pytest.fixture(scope="module")
def reference(tmp_path_factory, folder):
    """[1, 1]: one epoch, then resumed for the second (exact on CPU): the run every layout must match."""
    w = tmp_path_factory.mktemp("ref")
    r = torchrun(2, base_args(w, folder, **{**COMMON, "epochs": 1}))
    assert r.returncode == 0, r.stderr[-3000:]
    first = w.parent / (w.name + "_epoch1")
    shutil.copytree(w / "ckpt", first)
    r = torchrun(2, base_args(w, folder, **COMMON, resume="auto"))
    assert r.returncode == 0, r.stderr[-3000:]
    return w, first


def _assert_close(a, b, atol=1e-4):
    for k in (1, 2):
        wa = torch.load(a / "ckpt" / f"t_model{k}_final.pth", weights_only=True)["model"]
        wb = torch.load(b / "ckpt" / f"t_model{k}_final.pth", weights_only=True)["model"]
        assert wa.keys() == wb.keys()
        for key in wa:
            assert torch.allclose(wa[key].double(), wb[key].double(), atol=atol, rtol=0), (k, key)
    ha, hb = read_summary(a)["history"], read_summary(b)["history"]
    for x, y in zip(ha, hb):  # meters per peer over its replicas, evaluation reassembled from the shares
        for key in ("train_loss", "train_kl", "val_loss", "val_acc"):
            assert y[key] == pytest.approx(x[key], abs=1e-4), key
        assert y["ensemble_acc"] == x["ensemble_acc"]


def test_one_and_two_replicas_train_resume_with_one_each_and_match(tmp_path, folder, reference):
    """[1, 2] (3 processes, all-reduce by rows; started by launch/local.sh with REPLICAS=[1,2]) for one
    epoch, resumed as [1, 1]: the weights of [1, 1]."""
    ref, _ = reference
    w = tmp_path / "w"
    (tmp_path / "empty.yaml").write_text("{}\n")  # defaults + the same overrides as the reference
    r = run_cmd(
        [
            "bash",
            str(REPO / "launch" / "local.sh"),
            "2",
            "--config",
            str(tmp_path / "empty.yaml"),
            *base_args(w, folder, **{**COMMON, "epochs": 1}),
        ],
        env={"REPLICAS": "[1,2]", "PYTHON": sys.executable},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    for rank, (peer, replica) in enumerate([(1, 0), (2, 0), (2, 1)]):
        assert f"placement: rank {rank} (peer {peer}, replica {replica})" in r.stdout
    assert "exchange: all_reduce (auto: replicas [1, 2]" in r.stdout  # uneven counts: the sums by rows
    # the log's per-peer compute / exchange-wait split (the idle share a layout is balanced by)
    assert "compute/exchange ms p1 " in r.stdout and " p2 " in r.stdout.split("compute/exchange ms", 1)[1]
    assert len(torch.load(w / "ckpt" / "t_latest.pth", weights_only=True)["peers"]) == 2
    r = torchrun(2, base_args(w, folder, **COMMON, resume="auto"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "1 epoch(s) and 0 step(s) done" in r.stdout
    assert read_summary(w)["config"]["replicas"] == 1
    _assert_close(ref, w)


def test_one_each_resumes_as_two_and_one_with_the_all_gather(tmp_path, folder, reference):
    """The other way round: [1, 1]'s first epoch resumed as [2, 1] with exchange=all_gather (the logits by
    rows, shares padded to the largest)."""
    ref, first = reference
    w = tmp_path / "w"
    shutil.copytree(first, w / "ckpt")
    r = torchrun(3, base_args(w, folder, **COMMON, resume="auto", replicas="[2,1]", exchange="all_gather"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "exchange: all_gather (set in the config)" in r.stdout
    assert read_summary(w)["config"]["replicas"] == [2, 1]
    _assert_close(ref, w)


def test_a_replica_list_that_does_not_fit_is_one_line(tmp_path, folder):
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
