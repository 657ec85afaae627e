"""Issue 9 §5 and defect 5: the quick start without the shared subset falls back to CIFAR-10 in data/,
trimmed by train_subset (here a CIFAR-format file the test writes, never a download); every peer gets a
_best.pth even when its accuracy never rises above 0.0."""

import json
import sys

import pytest
import torch
from conftest import REPO, assert_no_worker_traceback, error_lines, run_cmd
from test_data import write_tiny_cifar10


@pytest.fixture(scope="module")
def fallback_run(tmp_path_factory):
    """launch/local.sh 2 from a folder with data/cifar-10-batches-py and no shared subset. Every label is
    class 9 and lr=0: the untrained peers (which predict other classes) score exactly 0.0 throughout."""
    w = tmp_path_factory.mktemp("quickstart")
    write_tiny_cifar10(w / "data", n_train=20, label=9)
    r = run_cmd(
        [
            "bash",
            str(REPO / "launch" / "local.sh"),
            "2",
            "epochs=2",
            "lr=0",
            "image_size=16",
            "batch_size=8",
            "train_subset=40",
            "progress_bar=false",
            "download=false",
        ],
        env={"PYTHON": sys.executable, "DML_SHARED_DATA": str(w / "no-shared-subset")},
        cwd=w,
    )
    return w, r


def test_quick_start_falls_back_to_cifar10_in_data(fallback_run):
    w, r = fallback_run
    assert r.returncode == 0, r.stderr[-3000:]
    assert "no shared subset at" in r.stderr and "CIFAR-10 in data/" in r.stderr
    assert "data: 40 train / 10 val / 10 test images, 10 classes" in r.stdout  # train_subset trimmed 90 to 40
    s = json.loads((w / "logs" / "quickstart_summary.json").read_text())
    assert s["config"]["dataset"] == "cifar10" and s["config"]["train_subset"] == 40


def test_defect5_every_peer_gets_a_best_checkpoint_even_at_zero_accuracy(fallback_run):
    w, r = fallback_run
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((w / "logs" / "quickstart_summary.json").read_text())
    assert 0.0 in s["best_accuracies"]  # the case of the defect: a peer that never rose above 0.0
    for path in s["checkpoints"]["best"]:
        ck = torch.load(w / path, weights_only=True)
        assert ck["epoch"] == 1  # written on the first epoch, unconditionally


def test_without_the_subset_and_without_a_network_the_quick_start_is_one_line(tmp_path):
    """README: with neither the shared subset nor a network, the quick start stops with one line naming both
    options. The network is made unreachable for the download alone (a proxy on a closed local port)."""
    env = {"PYTHON": sys.executable, "DML_SHARED_DATA": str(tmp_path / "no-shared-subset")}
    env.update(
        {"https_proxy": "http://127.0.0.1:1", "http_proxy": "http://127.0.0.1:1", "no_proxy": "", "NO_PROXY": ""}
    )
    r = run_cmd(["bash", str(REPO / "launch" / "local.sh"), "2", "epochs=1"], env=env, cwd=tmp_path)
    assert r.returncode != 0
    errs = error_lines(r.stderr)
    assert len(errs) == 1 and "could not be downloaded" in errs[0], r.stderr[-3000:]
    assert "download it there on a machine with network" in errs[0] and "../shared/data/cifar10-small" in errs[0]
    assert_no_worker_traceback(r.stderr)
