"""train_dml from every kind of caller (issue 9 §2): a script without a main guard, `python -c`, a script
piped on stdin (the notebook is tests/test_api.py's example notebook). The peers are fresh interpreters,
so the caller's __main__ is never re-imported; no child outlives the call, after success, after a failing
peer (tests/test_api.py), or after Ctrl-C in the caller."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import _env, kill_tree, make_image_folder, processes_mentioning, run_cmd

SCRIPTS = Path(__file__).parent / "scripts"

CALLER = """
import json, os, sys
sys.path.insert(0, {scripts!r})
from dml_dist import create_dml_config, prepare_dataloaders, train_dml
cfg = create_dml_config(model="resnet20", data_dir={data!r}, epochs={epochs}, image_size=16, batch_size=8,
                        num_workers=0, print_freq=3, save_dir={out!r} + "/ckpt", log_dir={out!r} + "/logs",
                        experiment_name="c")
mode = {mode!r}
if mode == "test_loader_only":
    _, _, test_loader = prepare_dataloaders({data!r}, batch_size=8, image_size=16, num_workers=0)
    res = train_dml(cfg, test_loader=test_loader)
elif mode == "imagefolder_collate_no_val":
    from torch.utils.data import DataLoader
    from caller_helpers import marking_collate, random_imagefolder
    cfg["consistency_check_every"] = 1
    res = train_dml(cfg, DataLoader(random_imagefolder({data!r} + "/train", 16), batch_size=8, shuffle=True,
                                    collate_fn=marking_collate))
else:
    res = train_dml(cfg)
with open({out!r} + "/result.json", "w") as f:
    json.dump({{"n_models": len(res["models"]), "model_num": res["config"]["model_num"],
               "test_results": res["test_results"], "history": len(res["training_history"])}}, f)
"""


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(
        tmp_path_factory.mktemp("callers") / "data", n_train=16, n_val=4, splits=("train", "val", "test")
    )


def _code(tmp_path, folder, mode, epochs=1):
    return CALLER.format(scripts=str(SCRIPTS), data=str(folder), out=str(tmp_path), mode=mode, epochs=epochs)


@pytest.mark.parametrize(
    "caller,mode",
    [
        ("script_without_main_guard", "test_loader_only"),
        ("python_c", "default"),
        ("stdin", "imagefolder_collate_no_val"),
    ],
)
def test_train_dml_from_every_caller(tmp_path, folder, caller, mode):
    """The stdin caller also hands train_dml a user's own torchvision ImageFolder with random transforms,
    shuffle=True and a custom collate_fn, and no val loader: the peers draw the shared seed's batches (every step
    fingerprinted, the same on both ranks), through the user's collate."""
    code = _code(tmp_path, folder, mode)
    tmpdir, fp = tmp_path / "tmp", tmp_path / "fp"
    tmpdir.mkdir()
    fp.mkdir()
    env = {"TMPDIR": str(tmpdir), "DML_TEST_COLLATE_MARK": str(tmp_path / "collate"), "DML_FINGERPRINT_DIR": str(fp)}
    if caller == "script_without_main_guard":
        (tmp_path / "caller.py").write_text(code)
        r = run_cmd([sys.executable, str(tmp_path / "caller.py")], env=env, cwd=tmp_path)
    elif caller == "python_c":
        r = run_cmd([sys.executable, "-c", code], env=env, cwd=tmp_path)
    else:
        (tmp_path / "caller.py").write_text(code)
        with open(tmp_path / "caller.py") as stdin:  # own session; a timeout kills the whole tree
            r = run_cmd([sys.executable, "-"], env=env, cwd=tmp_path, stdin=stdin)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "result.json").read_text())
    assert res["n_models"] == 2 and res["model_num"] == 2 and res["history"] == 1
    assert "epoch 1/1" in r.stdout  # rank 0's log reached the caller
    assert processes_mentioning(str(tmpdir)) == []  # no peer outlived the call
    if mode in ("test_loader_only", "default"):  # the test split from the loader alone, or from data_dir/test
        assert len(res["test_results"]["peer_acc"]) == 2
    if mode == "imagefolder_collate_no_val":
        assert list(tmp_path.glob("collate.*")), "the custom collate_fn was not used by the peers"
        assert "data: 43 train / 5 val images" in r.stdout  # val_fraction held out of the train dataset
        assert res["test_results"] is None
        f0, f1 = ((fp / f"fingerprints_rank{k}.txt").read_text() for k in (0, 1))
        assert f0 == f1 and len(f0.splitlines()) == 43 // 8  # one epoch: 43 images, full batches of 8


def test_a_decoded_train_set_with_a_custom_collate_keeps_it_and_holds_out_val(tmp_path, folder, monkeypatch):
    """In-process, the decoded-set side of a caller's loader (the stdin caller above passes a torchvision
    ImageFolder): ``prepare_dataloaders``' own decoded train set in a DataLoader with a custom collate_fn and no
    val loader. train_dml holds val_fraction out of it without augmentation, keeps the collate_fn, and the
    trainer's loader for it is then the per-sample path, which runs that collate (the memory path would not)."""
    from torch.utils.data import DataLoader

    from dml_dist import create_dml_config, prepare_dataloaders
    from dml_dist.api import datasets_from_loaders
    from dml_dist.data import SampleLoader, TensorImageDataset, make_train_loader

    monkeypatch.syspath_prepend(str(SCRIPTS))
    from caller_helpers import marking_collate

    train, _, _ = prepare_dataloaders(str(folder), batch_size=8, image_size=16, num_workers=0, augment=True)
    assert isinstance(train.dataset, TensorImageDataset) and train.dataset.augment
    cfg = create_dml_config(data_dir=str(folder), image_size=16, batch_size=8)
    loader = DataLoader(train.dataset, batch_size=8, collate_fn=marking_collate)
    data, _ = datasets_from_loaders(cfg, loader, None, None)
    assert all(isinstance(d, TensorImageDataset) for d in (data.train, data.val))
    assert (len(data.train), len(data.val)) == (43, 5)  # val_fraction 0.1 of 48, by the seed
    assert data.train.augment == train.dataset.augment and data.val.augment == ()
    assert data.collate_fn is marking_collate
    monkeypatch.setenv("DML_TEST_COLLATE_MARK", str(tmp_path / "collate"))
    trainer_loader = make_train_loader(data.train, 8, cfg["seed"], collate_fn=data.collate_fn)
    assert isinstance(trainer_loader, SampleLoader)
    x, y = next(iter(trainer_loader))
    assert x.shape == (8, 3, 16, 16) and list(tmp_path.glob("collate.*")), "the custom collate_fn did not run"


def test_no_child_outlives_ctrl_c(tmp_path, folder):
    """Ctrl-C in the caller mid-epoch: no peer is left (after a failing peer: tests/test_api.py)."""
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    (tmp_path / "caller.py").write_text(_code(tmp_path, folder, "default", epochs=50))
    proc = subprocess.Popen(
        [sys.executable, str(tmp_path / "caller.py")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env({"TMPDIR": str(tmpdir)}),
        cwd=tmp_path,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 180
        log = tmp_path / "logs" / "c.log"
        while time.time() < deadline and not (log.exists() and "epoch 1 [" in log.read_text()):
            time.sleep(0.5)
        assert len(processes_mentioning(str(tmpdir))) >= 2, "the peers never started"
        proc.send_signal(signal.SIGINT)  # Ctrl-C in the caller
        out, err = proc.communicate(timeout=60)
    finally:
        kill_tree(proc.pid)
    assert proc.returncode != 0 and "KeyboardInterrupt" in err, err[-2000:]
    time.sleep(1)
    assert processes_mentioning(str(tmpdir)) == []
