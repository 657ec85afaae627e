"""dml-compare on small fake summaries: grouping, the table's numbers, the DML gain, the curves."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dml_dist.tools.compare import group_runs, load_summaries, report


def _summary(path, seed, kl_weight, best, finals, ens):
    """A summary as dml-train writes it, for 2 peers over len(finals) epochs."""
    history = [
        {"epoch": e + 1, "val_acc": list(v), "ensemble_acc": ens[e], "train_acc": [v[0] + 0.1, v[1] + 0.2]}
        for e, v in enumerate(finals)
    ]
    s = {
        "config": {
            "model": "resnet20",
            "seed": seed,
            "kl_weight": kl_weight,
            "epochs": len(finals),
            "experiment_name": f"x{seed}{kl_weight}",
            "save_dir": "s",
            "log_dir": "l",
        },
        "best_accuracies": best,
        "history": history,
    }
    path.write_text(json.dumps(s))
    return str(path)


@pytest.fixture
def summaries(tmp_path):
    return [
        _summary(tmp_path / "d1.json", 1, 1.0, [0.60, 0.62], [(0.5, 0.5), (0.58, 0.60)], [0.55, 0.64]),
        _summary(tmp_path / "d2.json", 2, 1.0, [0.64, 0.66], [(0.5, 0.5), (0.62, 0.66)], [0.56, 0.70]),
        _summary(tmp_path / "i1.json", 1, 0.0, [0.50, 0.52], [(0.4, 0.4), (0.50, 0.50)], [0.45, 0.55]),
        _summary(tmp_path / "i2.json", 2, 0.0, [0.54, 0.56], [(0.4, 0.4), (0.54, 0.52)], [0.46, 0.57]),
    ]


def test_groups_ignore_seed_and_name_and_the_table_is_right(summaries):
    groups = group_runs(load_summaries(summaries))
    assert [g["label"] for g in groups] == ["kl_weight=1.0", "kl_weight=0.0"] and all(
        len(g["runs"]) == 2 for g in groups
    )
    md = report(groups)
    # peer 1 best over seeds: 0.60, 0.64 -> 62.00 ± 2.83 (sample std); final 0.58, 0.62 -> 60.00 ± 2.83
    assert "| peer 1 | 62.00 ± 2.83 | 60.00 ± 2.83 |" in md
    assert "| peer 2 | 64.00 ± 2.83 | 63.00 ± 4.24 |" in md
    assert "| ensemble | 67.00 ± 4.24 | 67.00 ± 4.24 |" in md  # best ensemble 0.64, 0.70
    # peers' mean best: DML 0.63 vs independent 0.53 -> +10.00 points; ensemble 0.67 vs 0.56 -> +11.00
    assert (
        "DML gain over `kl_weight=0.0` (kl_weight 0): peers' mean best accuracy +10.00 points, "
        "ensemble best +11.00 points." in md
    )
    assert md.count("DML gain") == 1  # the baseline has no baseline
    # final train accuracy, peers' mean: DML seeds (0.58+0.1 + 0.60+0.2)/2 = 0.74 and 0.79 -> 76.50 ± 3.54
    assert "Final train accuracy (on augmented batches), peers' mean: 76.50 ± 3.54" in md


def test_cli_writes_report_and_curves(tmp_path, summaries):
    out = tmp_path / "report"
    r = subprocess.run(
        [sys.executable, "-m", "dml_dist.tools.compare", *summaries, "--out", str(out)], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert (out / "report.md").read_text().startswith("# DML comparison")
    pytest.importorskip("matplotlib")
    png = (out / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_without_matplotlib_the_report_is_still_written(tmp_path, summaries):
    out = tmp_path / "report"
    # A stand-in module that fails to import, first on the path: the CLI must say how to install the extra.
    fake = tmp_path / "fake"
    (fake / "matplotlib").mkdir(parents=True)
    (fake / "matplotlib" / "__init__.py").write_text("raise ImportError('no matplotlib here')\n")
    r = subprocess.run(
        [sys.executable, "-m", "dml_dist.tools.compare", *summaries, "--out", str(out)],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(fake), "PATH": "/usr/bin:/bin"},
    )
    assert r.returncode == 0, r.stderr
    assert "pip install 'dml-dist[plot]'" in r.stderr and (out / "report.md").exists()
    assert not (out / "curves.png").exists()


def test_bad_input_is_one_line(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text("{}")
    r = subprocess.run([sys.executable, "-m", "dml_dist.tools.compare", str(bad)], capture_output=True, text=True)
    assert (
        r.returncode != 0
        and r.stderr.strip() == f"dml-compare: error: {bad} is not a dml-dist summary (no config/history)"
    )


def test_launch_compare_sh_runs_the_grid_then_reports_and_skips_what_is_done(tmp_path):
    """launch/compare.sh (README promise), at the smallest scale: one seed, DML and kl_weight=0 on a generated
    folder, then dml-compare's report; a second call finds both summaries and only reports."""
    from conftest import REPO, make_image_folder, run_cmd

    data = make_image_folder(tmp_path / "data")
    keys = ["device=cpu", "model=resnet20", "image_size=16", "batch_size=8", "epochs=1", "num_workers=0"]
    env = {"SEEDS": "1", "RUNS": str(tmp_path / "runs"), "OUT": str(tmp_path / "report")}
    env["CONFIG"] = str(REPO / "configs" / "quickstart.yaml")
    bin_dir = Path(sys.executable).parent  # this environment's dml-train and dml-compare, first on PATH
    assert (bin_dir / "dml-train").is_file() and (bin_dir / "dml-compare").is_file()
    env["PATH"] = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
    cmd = ["bash", str(REPO / "launch" / "compare.sh"), f"data_dir={data}", *keys]
    for call in (1, 2):
        r = run_cmd(cmd, env=env, cwd=tmp_path, timeout=600)  # a hang kills the whole tree
        assert r.returncode == 0, r.stderr[-3000:]
        assert ("epoch 1/1" in r.stdout) == (call == 1), r.stdout[-2000:]  # the second call trains nothing
    md = (tmp_path / "report" / "report.md").read_text()
    assert "DML gain over `kl_weight=0.0`" in md and (tmp_path / "report" / "curves.png").stat().st_size > 0
    names = sorted(p.name for p in (tmp_path / "runs" / "logs").glob("*_summary.json"))
    assert names == ["resnet20_kl0_seed1_summary.json", "resnet20_kl1_seed1_summary.json"]


def test_agreement_and_churn_between_seeds(tmp_path):
    """The cohort's agreement figures (mean over runs) and the churn between two seeds of one config: the
    share of validation samples whose predicted class differs, per peer and for the ensemble."""
    paths = []
    preds = {
        1: [[0, 1, 2, 3, 0], [0, 1, 2, 3, 1], [0, 1, 2, 3, 0]],  # peer 1, peer 2, ensemble
        2: [[0, 1, 2, 0, 0], [1, 1, 2, 3, 1], [0, 1, 2, 3, 0]],
    }
    for seed, agree in ((1, 0.8), (2, 0.6)):
        p = Path(_summary(tmp_path / f"s{seed}.json", seed, 1.0, [0.6, 0.6], [(0.5, 0.5)], [0.55]))
        s = json.loads(p.read_text())
        s["history"][-1].update(agreement=agree, pairwise_kl=0.1 * seed, ensemble_gain=0.01 * seed)
        s["final_predictions"] = preds[seed]
        p.write_text(json.dumps(s))
        paths.append(str(p))
    (group,) = group_runs(load_summaries(paths))
    md = report([group])
    assert "agreement 70.00 ± 14.14 %, pairwise KL 0.1500 nats, ensemble gain over the best peer 1.50 ± 0.71" in md
    # peer 1 differs on 1 of 5 samples, peer 2 on 1 of 5, the ensemble on none
    assert (
        "(share of validation samples whose predicted class differs, mean over pairs of runs): peer 1 20.00 %, " in md
    )
    assert "peer 2 20.00 %, ensemble 0.00 %." in md


def test_a_summary_from_before_a_key_existed_groups_with_its_defaults(tmp_path):
    """An older summary lacks the keys added since (``normalize``, ``frozen``, ...): it ran with their defaults, so
    it groups with a new run that states them; ``loggers`` only says where a run was logged."""
    old = _summary(tmp_path / "old.json", 1, 1.0, [0.6, 0.6], [(0.5, 0.5)], [0.55])
    new = Path(_summary(tmp_path / "new.json", 2, 1.0, [0.6, 0.6], [(0.5, 0.5)], [0.55]))
    s = json.loads(new.read_text())
    s["config"].update(normalize="cifar10", frozen=None, mutual_weights=None, loggers=["tensorboard", "mlflow"])
    new.write_text(json.dumps(s))
    assert len(group_runs(load_summaries([old, str(new)]))) == 1
    s["config"]["normalize"] = "imagenet"
    new.write_text(json.dumps(s))
    assert len(group_runs(load_summaries([old, str(new)]))) == 2
