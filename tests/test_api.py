"""The notebook API: train_dml from a plain process (elastic launcher underneath) and inside torchrun,
loading and evaluating checkpoints, dml-eval, and the example notebook."""

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, SHARED_DATA, make_image_folder, processes_mentioning, requires, run_cmd
from torch.utils.data import DataLoader

from dml_dist import DMLError, create_dml_config, train_dml

SCRIPTS = Path(__file__).parent / "scripts"


@pytest.fixture(scope="module")
def hard_folder(tmp_path_factory):
    """Noisy enough that two epochs do not reach 100%: accuracies then carry information."""
    return make_image_folder(
        tmp_path_factory.mktemp("api") / "data", n_train=24, n_val=12, noise=110, splits=("train", "val", "test")
    )


def _api(tmp_path, data_dir, model_num, mode="default", env=None):
    out = tmp_path / "out.json"
    r = run_cmd(
        [sys.executable, str(SCRIPTS / "api_train.py"), str(data_dir), str(out), str(model_num), mode],
        env=env,
        cwd=tmp_path,
    )
    assert r.returncode == 0 and out.exists(), r.stderr[-3000:]
    return json.loads(out.read_text()), r


@pytest.fixture(scope="module")
def loaders_run(tmp_path_factory, hard_folder):
    """train_dml(cfg, train, val, test) for 3 peers from a plain process, with prepare_dataloaders' loaders
    (augmentation on), every step fingerprinted: run once, read by the test below and by dml-eval's."""
    w = tmp_path_factory.mktemp("loaders_run")
    (w / "fp").mkdir()
    res, r = _api(w, hard_folder, 3, mode="loaders", env={"DML_FINGERPRINT_DIR": str(w / "fp")})
    return w, res, r


def test_train_dml_from_plain_process_with_the_callers_loaders(loaders_run):
    """The peers draw the same batches through the shared-seed sampler, and what they report is what the
    checkpoints hold. 2 peers and train_dml(cfg) without loaders: tests/test_callers.py and the example notebook."""
    tmp_path, res, r = loaders_run
    model_num, fp = 3, tmp_path / "fp"
    assert "error" not in res, res.get("error")
    f0 = (fp / "fingerprints_rank0.txt").read_text()
    assert len(f0.splitlines()) == 2 * (72 // 8)
    assert all((fp / f"fingerprints_rank{k}.txt").read_text() == f0 for k in (1, 2))
    assert res["n_models"] == model_num and res["model_types"] == ["CifarResNet"]
    assert res["config_model_num"] == model_num and res["children"] == []
    assert res["handlers_restored"]  # the caller's SIGINT/SIGTERM handlers are back
    summary = json.loads((tmp_path / "logs" / "api_summary.json").read_text())
    assert res["best_accuracies"] == summary["best_accuracies"]
    assert res["avg_best_accuracy"] == summary["avg_best_accuracy"]
    assert res["training_history"] == summary["history"] and len(res["training_history"]) == 2
    # rank 0's progress reached the caller's stdout
    assert "epoch 2/2" in r.stdout and "ensemble val acc" in r.stdout
    # the best checkpoints, reloaded and evaluated, reproduce the accuracies training reported
    evals = res["eval_best_val"]
    assert [e["model_idx"] for e in evals] == list(range(1, model_num + 1)) + ["ensemble"]
    assert [e["accuracy"] for e in evals[:-1]] == pytest.approx(res["best_accuracies"], abs=1e-9)
    assert not all(a == 1.0 for a in res["best_accuracies"])
    # The returned models are the final peers, in peer order: scored here on data_dir/test they reproduce
    # test_results, which the peer processes computed from their own in-memory models (not from files);
    # the losses tell the final weights from any other epoch's. The final checkpoints score alike.
    for evals in (res["eval_returned_test"], res["eval_final_test"]):
        assert [e["accuracy"] for e in evals[:-1]] == pytest.approx(res["test_results"]["peer_acc"], abs=1e-9)
        assert [e["loss"] for e in evals[:-1]] == pytest.approx(res["test_results"]["peer_loss"], rel=1e-4)
        assert evals[-1]["accuracy"] == pytest.approx(res["test_results"]["ensemble_acc"], abs=1e-9)


def test_failing_peer_raises_in_the_caller(tmp_path, hard_folder):
    """The caller gets that peer's error; no peer is left, anywhere (the peers' temporary folder is under
    TMPDIR: no live process names it)."""
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    env = {"DML_FAULT": "action=raise,rank=1,epoch=1,step=2", "TMPDIR": str(tmpdir)}
    res, _ = _api(tmp_path, hard_folder, 2, env=env)
    assert res["error"].startswith("DMLTrainingError: train_dml failed: peer 2 (rank 1): injected failure on rank 1")
    assert res["children"] == [] and res["handlers_restored"]
    assert processes_mentioning(str(tmpdir)) == []


def test_unpicklable_loader_is_a_clear_error(hard_folder):
    class Local(torch.utils.data.Dataset):  # defined in a function: pickle cannot find it
        classes = ["a", "b"]

        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.zeros(3, 16, 16), i % 2

    loader = DataLoader(Local(), batch_size=2)
    with pytest.raises(DMLError, match="train_loader.dataset cannot be pickled .*sends a copy to each peer"):
        train_dml(create_dml_config(model_num=2), loader, loader)
    with pytest.raises(DMLError, match="val_loader was given without train_loader"):
        train_dml(create_dml_config(model_num=2), val_loader=loader)


class MainDataset(torch.utils.data.Dataset):
    classes = ["a", "b"]

    def __len__(self):
        return 4

    def __getitem__(self, i):
        return torch.zeros(3, 16, 16), i % 2


def test_dataset_class_defined_in_main_is_refused_with_the_documented_message(monkeypatch):
    """A class of the calling script (``__main__``): pickling works in the caller, but a peer process could not
    import it. Put into this process's ``__main__`` as a script's own class is, it must be refused up front."""
    monkeypatch.setattr(MainDataset, "__module__", "__main__")
    monkeypatch.setattr(sys.modules["__main__"], "MainDataset", MainDataset, raising=False)
    loader = DataLoader(MainDataset(), batch_size=2)
    with pytest.raises(DMLError) as e:
        train_dml(create_dml_config(model_num=2, image_size=16), loader, loader)
    assert str(e.value) == (
        "train_loader.dataset uses a class or function defined in __main__ (a notebook cell or "
        "the calling script); the peer processes are fresh interpreters that cannot import it, "
        "so define it in an importable module"
    )


def test_train_dml_inside_torchrun_with_custom_loaders_and_workers(tmp_path, hard_folder):
    """train_dml in a torchrun group with a user's ImageFolder loaders (random transforms, a custom
    collate_fn): the per-sample path, read by 2 DataLoader workers per rank, gives both ranks the same
    batches at every step."""
    fp, marks = tmp_path / "fp", tmp_path / "marks"
    fp.mkdir()
    marks.mkdir()
    r = run_cmd(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(SCRIPTS / "api_in_torchrun.py"),
            str(hard_folder),
            str(tmp_path),
            "loaders",
        ],
        env={"DML_FINGERPRINT_DIR": str(fp), "DML_TEST_COLLATE_MARK": str(marks / "m")},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{k}.json").read_text()) for k in (0, 1))
    assert r0["n_models"] == 2 and r1["n_models"] == 1 and r0["best"] == r1["best"]
    f0, f1 = (fp / "fingerprints_rank0.txt").read_text(), (fp / "fingerprints_rank1.txt").read_text()
    assert f0 == f1 and len(f0.splitlines()) == 72 // 8  # every step checked, the same batch on both ranks
    assert len(set(line.split()[3] for line in f0.splitlines())) == 72 // 8  # and the batches differ
    # the custom collate_fn ran in 2 worker processes per rank, never in the ranks themselves
    pids = {int(p.name.rsplit(".", 1)[1]) for p in marks.iterdir()}
    assert len(pids) == 4 and not pids & {r0["pid"], r1["pid"]}, (pids, r0["pid"], r1["pid"])
    assert "data path: custom" in (tmp_path / "logs" / "ing.log").read_text()


def test_dml_eval_cli_prints_the_table(tmp_path, hard_folder, loaders_run, capsys):
    """dml-eval on the best checkpoints of the 3-peer run above: its table gives the accuracies training reported."""
    run = loaders_run[0]
    summary = json.loads((run / "logs" / "api_summary.json").read_text())
    ckpts = [str(run / "checkpoints" / f"api_model{k}_best.pth") for k in (1, 2, 3)]
    cli = [sys.executable, "-m", "dml_dist.evaluate", "--checkpoints", *ckpts, "--data-dir", str(hard_folder)]
    r = run_cmd([*cli, "--split", "val"])
    assert r.returncode == 0, r.stderr
    rows = {m.group(1): float(m.group(2)) for m in re.finditer(r"^(model\d|ensemble)\s+\S+\s+([\d.]+)", r.stdout, re.M)}
    for k in range(3):
        assert rows[f"model{k + 1}"] == pytest.approx(summary["best_accuracies"][k], abs=1e-4)
    assert "ensemble" in rows
    # --split test (the default) and train: the trainer's own splits, counted (README promise); and a missing
    # data_dir. In-process: the command line above is the CLI's, these are its arguments.
    from dml_dist.evaluate import main as dml_eval

    n_train, n_test = (
        len(list((hard_folder / "train").rglob("*.png"))),
        len(list((hard_folder / "test").rglob("*.png"))),
    )
    for split, n in (("test", n_test), ("train", n_train)):
        code = dml_eval(["--checkpoints", *ckpts, "--data-dir", str(hard_folder), "--split", split])
        out = capsys.readouterr().out
        assert code == 0 and out.startswith(f"{split}: {n} images"), (split, out)
    code = dml_eval(["--checkpoints", ckpts[0], "--data-dir", str(tmp_path / "nope")])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("dml-dist: error: data_dir") and len(err.splitlines()) == 1


@requires(SHARED_DATA.is_dir(), "../shared/data/cifar10-small is missing")
def test_example_notebook_runs_headless(tmp_path):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(REPO / "examples" / "quickstart.ipynb", as_version=4)
    import os

    os.environ["DML_EXAMPLE_EPOCHS"] = "1"
    os.environ["DML_EXAMPLE_SUBSET"] = "256"
    os.environ["DML_EXAMPLE_OUT"] = str(tmp_path)
    try:
        NotebookClient(
            nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(REPO / "examples")}}
        ).execute()
    finally:
        del os.environ["DML_EXAMPLE_EPOCHS"], os.environ["DML_EXAMPLE_OUT"], os.environ["DML_EXAMPLE_SUBSET"]
    outputs = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "ensemble" in outputs and "epoch 1/1" in outputs
    assert any("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
    assert (tmp_path / "curves.png").is_file()
