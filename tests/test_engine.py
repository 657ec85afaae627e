"""Issue 8 on CPU: torch.compile trains like eager, a non-finite loss stops the run with one line naming
the epoch and steps, no host sync in a step (meters on the device)."""
import json

import pytest
import torch

from dml_dist import create_dml_config
from dml_dist.train import run

from conftest import assert_no_worker_traceback, base_args, error_lines, make_image_folder, torchrun


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("engine") / "data", n_train=16, n_val=4)


def _cfg(tmp_path, data, **kw):
    base = dict(data_dir=str(data), model="resnet20", image_size=16, batch_size=8, epochs=1, lr=0.05,
                num_workers=0, save_dir=str(tmp_path / "ckpt"), log_dir=str(tmp_path / "logs"), print_freq=2,
                progress_bar=False, experiment_name="e", model_num=1, augment=["crop", "flip"])
    base.update(kw)
    return create_dml_config(**base)


def test_compile_trains_close_to_eager(tmp_path, tiny):
    eager = run(_cfg(tmp_path / "eager", tiny))
    compiled = run(_cfg(tmp_path / "compiled", tiny, compile=True))
    assert compiled["config"]["compile"] is True and eager["config"]["compile"] is False
    a, b = eager["history"][0], compiled["history"][0]
    assert b["train_loss"][0] == pytest.approx(a["train_loss"][0], rel=1e-2)  # close ...
    assert b["val_loss"][0] == pytest.approx(a["val_loss"][0], rel=5e-2)
    # ... and the checkpoint holds the plain module's weights (no torch.compile prefix)
    w = torch.load(tmp_path / "compiled" / "ckpt" / "e_model1_final.pth", weights_only=True)["model"]
    assert not any(k.startswith("_orig_mod") for k in w)


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
