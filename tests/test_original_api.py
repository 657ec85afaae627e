"""Issue 9 §1 and §3: the original module's calls exactly as its documentation writes them, and the defects
review found, each with its own test. In-process unless a launch is the point."""

import os
from pathlib import Path

import pytest
import torch
from conftest import base_args, make_image_folder, torchrun
from torch.utils.data import DataLoader

import dml_dist
from dml_dist import (
    DEFAULT_CONFIG,
    build_model,
    compute_dml_loss,
    evaluate_dml_models,
    evaluate_ensemble,
    prepare_dataloaders,
    train_epoch_dml,
    validate_dml,
)
from dml_dist.checkpoint import prune_epoch_checkpoints, remove_stale_temp_files
from dml_dist.train import parse_args


@pytest.fixture(scope="module")
def data_cwd(tmp_path_factory):
    """A working directory holding ``data/`` (the original API's default data_dir)."""
    root = tmp_path_factory.mktemp("orig")
    make_image_folder(root / "data", n_train=12, n_val=6, size=32)
    return root


def test_default_config_holds_the_original_values():
    original = {
        "model": "ResNet32",
        "batch_size": 32,
        "num_workers": 4,
        "augment": False,
        "epochs": 200,
        "lr": 0.1,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "step_size": 60,
        "gamma": 0.1,
        "model_num": 2,
        "device": "auto",
        "print_freq": 10,
        "save_freq": 10,
        "save_dir": "checkpoints",
        "log_dir": "logs",
        "experiment_name": None,
        "resume": None,
    }
    assert {k: DEFAULT_CONFIG[k] for k in original} == original
    assert dml_dist.create_dml_config()["model"] == "resnet32"  # names stay case-insensitive


def test_original_calls_as_documented(data_cwd, monkeypatch):
    monkeypatch.chdir(data_cwd)
    train_loader, val_loader, test_loader = prepare_dataloaders("data", batch_size=32, augment=True)
    assert train_loader.batch_size is None and train_loader.batch_sampler.batch_size == 32
    assert isinstance(train_loader, DataLoader) and test_loader is None and len(val_loader.dataset) == 18
    assert train_loader.num_workers == DEFAULT_CONFIG["num_workers"]  # the defaults apply where the call is silent
    assert len(prepare_dataloaders()[0].dataset) == 36  # data_dir defaults to 'data'
    torch.manual_seed(0)
    models = [build_model("ResNet20", 3) for _ in range(2)]
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in models]
    x, y = next(iter(train_loader))
    loss = compute_dml_loss(models, x, y, 0)
    assert loss.dim() == 0 and torch.isfinite(loss)
    config = dict(DEFAULT_CONFIG, temperature=2.0, kl_weight=0.5, print_freq=1)
    device = "cpu"
    stats = train_epoch_dml(models, optimizers, train_loader, device, config)
    assert len(stats) == 2 and all(0 <= s["accuracy"] <= 1 and s["kl"] > 0 for s in stats)
    assert all(s["loss"] == pytest.approx(s["ce"] + 0.5 * s["kl"], rel=1e-5) for s in stats)
    assert train_loader.batch_sampler.epoch == 1  # it advanced the shared-seed sampler itself
    train_epoch_dml(models, optimizers, train_loader=train_loader, device=device, config=config)
    assert train_loader.batch_sampler.epoch == 2
    rows = validate_dml(models, val_loader, device, config)
    assert [r["model_idx"] for r in rows] == [1, 2, "ensemble"]
    for call in (
        lambda: evaluate_ensemble(models, val_loader, "auto", None),
        lambda: evaluate_ensemble(models=models, data_loader=val_loader, device="auto", config=None),
    ):
        assert call() == rows[-1]
    assert evaluate_dml_models(models, val_loader, "auto", None) == rows
    assert evaluate_dml_models(models=models, data_loader=val_loader, device="auto", config=None) == rows


def test_defect1_evaluation_scores_every_model_on_the_same_labels(data_cwd):
    """With a shuffled loader, two identical models must score identically (one pass, every model)."""
    _, val_loader, _ = prepare_dataloaders(str(data_cwd / "data"), num_workers=0)
    shuffled = DataLoader(val_loader.dataset, batch_size=4, shuffle=True)
    torch.manual_seed(3)
    m = build_model("resnet20", 3)
    twin = build_model("resnet20", 3)
    twin.load_state_dict(m.state_dict())
    rows = evaluate_dml_models([m, twin], shuffled, "cpu")
    assert rows[0]["accuracy"] == rows[1]["accuracy"] == rows[2]["accuracy"]
    assert rows[0]["loss"] == pytest.approx(rows[1]["loss"])


def test_defect2_pruning_and_temp_cleanup_match_the_exact_experiment(tmp_path):
    for exp in ("exp", "myexp", "exp_b"):
        for e in (1, 2, 3):
            (tmp_path / f"{exp}_model1_epoch_{e}.pth").write_bytes(b"x")
        (tmp_path / f".{exp}_latest.pth.tmp.123").write_bytes(b"x")
    prune_epoch_checkpoints(str(tmp_path), "exp", 1, keep_last=1)
    names = {p.name for p in tmp_path.iterdir()}
    assert "exp_model1_epoch_3.pth" in names and "exp_model1_epoch_2.pth" not in names
    assert {f"{e}_model1_epoch_{k}.pth" for e in ("myexp", "exp_b") for k in (1, 2, 3)} <= names
    removed = remove_stale_temp_files(str(tmp_path), "exp")
    assert [os.path.basename(p) for p in removed] == [".exp_latest.pth.tmp.123"]
    assert {".myexp_latest.pth.tmp.123", ".exp_b_latest.pth.tmp.123"} <= {p.name for p in tmp_path.iterdir()}


def test_defect7_key_value_pairs_on_both_sides_of_config():
    args = parse_args(["data_dir=X", "--config", "c.yaml", "epochs=3"])
    assert args.config == "c.yaml" and args.overrides == ["data_dir=X", "epochs=3"]


def test_defect6_peers_start_from_the_weights_the_readme_seed_rule_gives(tmp_path):
    """docs/configuration.md: peer k (counted from 1) starts from weights seeded ``seed + k - 1``. With lr=0 the weights
    never move (momentum and weight decay only scale a zero step), so the final checkpoints hold each
    peer's initial parameters."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "configuration.md").read_text()
    assert "peer k (counted from 1) starts from weights seeded `seed + k - 1`" in doc
    data = make_image_folder(tmp_path / "data", n_train=3, n_val=1)  # 9 images: one step of 8
    r = torchrun(2, base_args(tmp_path, data, lr=0, epochs=1, seed=7))
    assert r.returncode == 0, r.stderr[-3000:]
    params = [n for n, _ in build_model("resnet20", 3).named_parameters()]
    saved = [torch.load(tmp_path / "ckpt" / f"t_model{k}_final.pth", weights_only=True)["model"] for k in (1, 2)]
    for k in (1, 2):
        torch.manual_seed(7 + k - 1)
        expected = build_model("resnet20", 3, image_size=16).state_dict()
        assert all(torch.equal(saved[k - 1][n], expected[n]) for n in params), f"peer {k}"
    assert not torch.equal(saved[0]["conv1.weight"], saved[1]["conv1.weight"])
