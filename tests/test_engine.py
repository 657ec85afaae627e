"""Issue 8 on CPU: torch.compile trains like eager, a non-finite loss stops the run with one line naming
the epoch and steps, no host sync in a step (meters on the device)."""
import re

import pytest
import torch

from conftest import assert_no_worker_traceback, base_args, error_lines, make_image_folder, read_summary, torchrun


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("engine") / "data", n_train=16, n_val=4)


def test_compile_applies_under_torchrun_and_trains_close_to_eager(tmp_path, tiny):
    """A real torchrun run with compile: true: rank 0 logs dynamo's counters after the first epoch, which
    prove the peer ran compiled graphs; the losses stay close to an eager run's. One peer: two ranks
    compiling at once take minutes on 2 cores, and the gather of logits is the same for any module."""
    out = {}
    for name, extra in (("eager", {}), ("compiled", {"compile": True})):
        r = torchrun(1, base_args(tmp_path / name, tiny, epochs=1, augment="[crop,flip]", model_num=1, **extra))
        assert r.returncode == 0, r.stderr[-3000:]
        out[name] = (r.stdout, read_summary(tmp_path / name))
    line = re.search(r"compile: (\w+), (\d+) graph\(s\) compiled, (\d+) graph break\(s\)", out["compiled"][0])
    assert line and line.group(1) == "OptimizedModule" and int(line.group(2)) >= 1, out["compiled"][0][-3000:]
    assert "compile:" not in out["eager"][0]
    (_, eager), (_, compiled) = out["eager"], out["compiled"]
    assert compiled["config"]["compile"] is True and eager["config"]["compile"] is False
    a, b = eager["history"][0], compiled["history"][0]
    assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-2)  # close ...
    assert b["val_loss"] == pytest.approx(a["val_loss"], rel=5e-2)
    # ... and the checkpoints hold the plain modules' weights (no torch.compile prefix)
    w = torch.load(tmp_path / "compiled" / "ckpt" / "t_model1_final.pth", weights_only=True)["model"]
    assert w and not any(k.startswith("_orig_mod") for k in w)


def test_non_finite_loss_is_one_line_naming_epoch_and_steps(tmp_path, tiny):
    r = torchrun(2, base_args(tmp_path, tiny, lr=1e12, epochs=2, print_freq=4))
    assert r.returncode != 0
    errs = error_lines(r.stderr)
    assert len(errs) == 1, r.stderr[-3000:]
    # read at the first print_freq boundary: steps 0-3 of epoch 1, for both peers
    assert "peer(s) [1, 2]: loss is not finite (nan/inf) at epoch 1, steps 0-3; lower lr" in errs[0], errs[0]
    assert_no_worker_traceback(r.stderr)
    assert not (tmp_path / "ckpt" / "t_latest.pth").exists()  # nothing diverged was saved


def test_non_finite_weights_are_never_saved(tmp_path, tiny):
    """Peer 2's weights turn nan at the end of epoch 2 while its loss stayed finite (DML_FAULT nan_weights):
    the save refuses them with one line, and every file on disk still holds epoch 1's finite weights."""
    r = torchrun(2, base_args(tmp_path, tiny, epochs=3), env={"DML_FAULT": "action=nan_weights,rank=1,epoch=2"})
    assert r.returncode != 0
    errs = error_lines(r.stderr)
    assert len(errs) == 1, r.stderr[-3000:]
    assert "peer(s) [2]: weights are not finite (nan/inf) at epoch 2; lower lr" in errs[0], errs[0]
    assert_no_worker_traceback(r.stderr)
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert files == sorted(["t_latest.pth"] + [f"t_model{k}_{t}.pth" for k in (1, 2) for t in ("best", "epoch_1")])
    latest = torch.load(tmp_path / "ckpt" / "t_latest.pth", weights_only=True)
    assert latest["epoch"] == 1
    for f in files:
        ck = torch.load(tmp_path / "ckpt" / f, weights_only=True)
        for state in ([p["model"] for p in ck["peers"]] if "peers" in ck else [ck["model"]]):
            assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point()), f
