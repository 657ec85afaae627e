"""Beyond plain DML: a frozen teacher in the cohort, mutual_weights, init_from, a timm peer, the exported ensemble,
the MLflow and wandb trackers, and what the cohort agrees on.

Three launches: a 2-peer run whose checkpoints the others start from (``teacher``); a 3-peer cohort of a CIFAR
ResNet, a timm model and the frozen teacher, weighted, over ``all_gather`` (``cohort``); the same cohort's first
epoch over ``all_reduce``, logging to a real MLflow server started here and to wandb offline (``tracked``).
"""

import importlib.metadata
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import (
    CI,
    base_args,
    error_lines,
    make_image_folder,
    read_summary,
    requires,
    run_cmd,
    torchrun,
)

from dml_dist.engine import agreement, score_logits
from dml_dist.errors import DMLError
from dml_dist.models import build_model
from dml_dist.weights import apply_statistics, load_init, peer_statistics

HAVE = {m: __import__("importlib").util.find_spec(m) is not None for m in ("timm", "mlflow", "wandb", "onnxruntime")}
COHORT = {
    "model": "[resnet20,timm.test_resnet,resnet20]",
    "frozen": "[false,false,true]",
    "mutual_weights": "[1.0,1.0,2.0]",
    "epochs": 2,
    "save_freq": 1,
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort")
    data = make_image_folder(root / "data", n_train=32, n_val=12, noise=110)  # the peers do not reach 100 %
    teacher = root / "teacher"
    r = torchrun(2, base_args(teacher, data, experiment_name="a"))
    assert r.returncode == 0, r.stderr[-3000:]
    return {"root": root, "data": data, "teacher": teacher}


def cohort_args(runs, out: Path, **extra) -> list[str]:
    init = f"[{runs['teacher'] / 'ckpt' / 'a_model2_final.pth'},null,{runs['teacher'] / 'ckpt' / 'a_model1_final.pth'}]"
    return base_args(out, runs["data"], **{**COHORT, "init_from": init, **extra})


@pytest.fixture(scope="module")
def cohort(runs):
    if not HAVE["timm"]:
        pytest.skip("timm is not installed (pip install 'dml-dist[timm]')")
    out = runs["root"] / "cohort"
    r = torchrun(3, cohort_args(runs, out, exchange="all_gather"))
    assert r.returncode == 0, r.stderr[-3000:]
    return {"out": out, "summary": read_summary(out), "stdout": r.stdout}


requires_timm = requires(HAVE["timm"], "timm is not installed (pip install 'dml-dist[timm]')")


@requires_timm
def test_a_frozen_teacher_never_changes_and_the_learners_learn_from_it(runs, cohort):
    """The teacher (peer 3, from an earlier run's checkpoint) is bit-identical at the end, has no epoch files,
    its accuracy is logged once; the learners' mutual term is not zero; the timm peer trained next to the CIFAR
    ResNet; the summary says where every peer's weights came from."""
    ckpt = cohort["out"] / "ckpt"
    source = torch.load(runs["teacher"] / "ckpt" / "a_model1_final.pth", weights_only=True)
    for tag in ("best", "final"):
        end = torch.load(ckpt / f"t_model3_{tag}.pth", weights_only=True)
        assert end["frozen"] and end["init_from"]["path"].endswith("a_model1_final.pth")
        assert source["model"].keys() == end["model"].keys()
        assert all(torch.equal(source["model"][k], end["model"][k]) for k in source["model"])
    assert not list(ckpt.glob("t_model3_epoch_*.pth")) and len(list(ckpt.glob("t_model1_epoch_*.pth"))) == 2
    s = cohort["summary"]
    assert s["resolved"]["frozen"] == [False, False, True]
    assert (
        s["resolved"]["init_from"][0]["path"].endswith("a_model2_final.pth") and s["resolved"]["init_from"][1] is None
    )
    assert s["config"]["model"] == ["resnet20", "timm.test_resnet", "resnet20"]
    for h in s["history"]:
        assert min(h["train_kl"][:2]) > 1e-3, h["train_kl"]
    timm_peer = torch.load(ckpt / "t_model2_final.pth", weights_only=True)
    start = build_model("timm.test_resnet", 3)
    assert any(not torch.equal(v, start.state_dict()[k]) for k, v in timm_peer["model"].items())  # it trained
    epoch_lines = [ln for ln in cohort["stdout"].splitlines() if ln.startswith("epoch ") and "ensemble val acc" in ln]
    assert "peer3 resnet20 frozen train" in epoch_lines[0] and epoch_lines[1].count("peer3 resnet20 frozen |") == 1


@requires_timm
def test_init_from_gives_the_checkpoints_weights_and_refuses_a_mismatch_in_one_line(runs, tmp_path):
    peer_file = runs["teacher"] / "ckpt" / "a_model2_final.pth"
    want = torch.load(peer_file, weights_only=True)["model"]
    model = build_model("resnet20", 3)
    record = load_init(str(peer_file), model, "resnet20", 3)
    assert record["kind"] == "peer" and record["epoch"] == 2 and record["statistics"] is not None
    assert all(torch.equal(model.state_dict()[k], want[k]) for k in want)
    plain = tmp_path / "plain.pth"
    torch.save({f"module.{k}": v for k, v in want.items()}, plain)  # a DDP-saved state dict
    fresh = build_model("resnet20", 3)
    assert load_init(str(plain), fresh, "resnet20", 3)["kind"] == "state_dict"
    assert all(torch.equal(fresh.state_dict()[k], want[k]) for k in want)
    cases = {
        (str(peer_file), "resnet32"): "holds a resnet20, but this peer is a resnet32",
        (str(peer_file), "resnet20", 10): "trained for 3 classes, this data has 10",
        (str(plain), "resnet32"): "does not fit resnet32",
        (str(runs["teacher"] / "ckpt" / "a_latest.pth"), "resnet20"): "is a cohort checkpoint",
    }
    for (path, arch, *classes), words in cases.items():
        with pytest.raises(DMLError) as e:
            load_init(path, build_model(arch, classes[0] if classes else 3), arch, classes[0] if classes else 3)
        assert words in str(e.value) and "\n" not in str(e.value), str(e.value)
    # launched, the trainer prefixes the peer ("peer 1: init_from ..."), raised on that peer's ranks alone like
    # build_model's errors (tests/test_train_distributed.py launches those)


def test_peer_statistics_and_the_input_map():
    """A peer sees its inputs normalised with its own statistics, although the data path normalises with
    CIFAR-10's; pretrained torchvision/timm weights bring their own; CIFAR-10's add no hook at all."""
    from dml_dist.config import build_config
    from dml_dist.data import normalize

    cfg = build_config(normalize="imagenet")
    stats, why = peer_statistics(cfg, "resnet20", None)
    assert stats == [[0.485, 0.456, 0.406], [0.229, 0.224, 0.225]] and "imagenet" in why
    assert peer_statistics(build_config(), "resnet20", None)[0][0] == [0.4914, 0.4822, 0.4465]
    tv = peer_statistics(build_config(pretrained=True, model="torchvision.resnet18"), "torchvision.resnet18", None)
    assert tv[0] == stats and "pretrained" in tv[1]
    if HAVE["timm"]:
        assert peer_statistics(build_config(pretrained=True), "timm.convnext_atto", None)[0] == stats
    record = {"path": "x.pth", "kind": "peer", "statistics": [[0.5] * 3, [0.25] * 3]}
    assert peer_statistics(cfg, "resnet20", record) == ([[0.5] * 3, [0.25] * 3], "those x.pth was trained with")
    seen = []
    probe = torch.nn.Identity()
    probe.register_forward_hook(lambda m, args, out: seen.append(out))
    u8 = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    assert apply_statistics(probe, [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616], torch.device("cpu")) is None
    apply_statistics(probe, *stats, torch.device("cpu"))
    probe(normalize(u8))
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in stats)
    assert torch.allclose(seen[0], (u8.float() / 255 - mean) / std, atol=2e-6)
    with pytest.raises(DMLError, match="normalize must be"):
        build_config(normalize=[[0.5, 0.5], [0.2, 0.2, 0.2]])


def test_agreement_figures_against_a_direct_computation():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 40, 5, generator=g) * 2
    logits[:, :10] = torch.tensor([9.0, 0, 0, 0, 0])  # every peer predicts class 0 on the first 10
    labels = torch.randint(0, 5, (40,), generator=g)
    preds = logits.argmax(-1)
    direct_agree = sum(bool((preds[:, i] == preds[0, i]).all()) for i in range(40)) / 40
    p = logits.double().softmax(-1)
    kls = [(p[j] * (p[j].log() - p[i].log())).sum(-1).mean() for i in range(3) for j in range(3) if i != j]
    a = agreement(logits)
    assert a["agreement"] == pytest.approx(direct_agree) and direct_agree >= 0.25
    assert a["pairwise_kl"] == pytest.approx(float(sum(kls) / len(kls)), rel=1e-9)
    s = score_logits(logits, labels)
    ens = int((logits.softmax(-1).mean(0).argmax(1) == labels).sum()) / 40
    assert s["ensemble_gain"] == pytest.approx(ens - max(int((preds[k] == labels).sum()) for k in range(3)) / 40)
    assert s["predictions"].tolist() == [*preds.tolist(), logits.softmax(-1).mean(0).argmax(1).tolist()]
    assert agreement(logits[:1]) == {"agreement": 1.0, "pairwise_kl": 0.0}


@requires_timm
def test_agreement_reaches_the_summary_and_tensorboard(cohort):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    s = cohort["summary"]
    assert set(s["cohort"]) == {"agreement", "pairwise_kl", "ensemble_gain"}
    assert s["cohort"]["agreement"] == s["history"][-1]["agreement"] and 0 <= s["cohort"]["agreement"] <= 1
    assert len(s["final_predictions"]) == 4 and len(s["final_predictions"][0]) == 36
    acc = EventAccumulator(str(cohort["out"] / "logs" / "t"))
    acc.Reload()
    for tag in ("cohort/agreement", "cohort/pairwise_kl", "cohort/ensemble_gain"):
        values = [e.value for e in acc.Scalars(tag)]
        assert values == pytest.approx([h[tag.split("/")[1]] for h in s["history"]], abs=1e-6)


EXPORT_CHECK = r"""
import json, sys
sys.modules["dml_dist"] = None  # this interpreter cannot import dml_dist
try:
    import dml_dist  # noqa: F401
    raise SystemExit("dml_dist is importable")
except ImportError:
    pass
import numpy as np, torch
from PIL import Image
from pathlib import Path

val, programs = Path(sys.argv[1]), sys.argv[2:]  # then pairs: FILE FORMAT
classes = sorted(d.name for d in val.iterdir())
files = [(f, c) for c, name in enumerate(classes) for f in sorted((val / name).iterdir())]
x = torch.from_numpy(np.stack([np.asarray(Image.open(f).convert("RGB")) for f, _ in files])).permute(0, 3, 1, 2)
y = torch.tensor([c for _, c in files])
for program, fmt in zip(programs[::2], programs[1::2]):
    if fmt == "pt2":
        extra = {"dml_dist.json": ""}
        probs = torch.export.load(program, extra_files=extra).module()(x.contiguous())
        meta = json.loads(extra["dml_dist.json"])
    else:
        import onnxruntime
        session = onnxruntime.InferenceSession(program)
        probs = torch.from_numpy(session.run(None, {"images": x.contiguous().numpy()})[0])
        meta = json.loads(session.get_modelmeta().custom_metadata_map["dml_dist"])
    assert meta["classes"] == classes, (meta["classes"], classes)
    print(json.dumps({"format": fmt, "accuracy": float((probs.argmax(1) == y).float().mean()), "n": len(y),
                      "sums": float((probs.sum(1) - 1).abs().max()), "meta": meta}))
"""


@requires_timm
def test_the_exported_ensemble_runs_without_dml_dist_and_scores_as_dml_eval(runs, cohort, tmp_path, capsys):
    from dml_dist.evaluate import main as dml_eval
    from dml_dist.tools.export import main as dml_export

    ckpts = [str(cohort["out"] / "ckpt" / f"t_model{k}_final.pth") for k in (1, 2, 3)]
    script = tmp_path / "check.py"
    script.write_text(EXPORT_CHECK)
    argv = ["--checkpoints", *ckpts, "--data-dir", str(runs["data"]), "--split", "val", "--device", "cpu"]
    assert dml_eval(argv) == 0
    table = capsys.readouterr().out
    want = float(next(ln for ln in table.splitlines() if ln.startswith("ensemble")).split()[2])
    formats = ["pt2"] + (["onnx"] if HAVE["onnxruntime"] or CI else [])
    programs = []
    for fmt in formats:
        out = tmp_path / f"ensemble.{fmt}"
        assert dml_export([*ckpts, "--out", str(out), "--format", fmt]) == 0
        printed = capsys.readouterr().out
        assert "uint8 [B, 3, 16, 16]" in printed and "the mean of 3 peers' softmaxes" in printed
        programs += [str(out), fmt]
    # one fresh interpreter reads every exported file
    r = run_cmd([sys.executable, str(script), str(runs["data"] / "val"), *programs], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    results = [json.loads(line) for line in r.stdout.strip().splitlines() if line.startswith("{")]
    assert [got["format"] for got in results] == formats, r.stdout[-2000:]
    for got in results:
        assert got["n"] == 36 and got["sums"] < 1e-5
        assert round(got["accuracy"], 4) == want, (got["format"], got["accuracy"], table)
        assert [p["arch"] for p in got["meta"]["peers"]] == ["resnet20", "timm.test_resnet", "resnet20"]
    assert dml_export([ckpts[0], "--peer", "2", "--out", str(tmp_path / "x.pt2")]) == 1
    refused = "dml-dist: error: --peer 2: the checkpoints hold 1 peer(s); give 1..1"
    assert error_lines(capsys.readouterr().err) == [refused]
    # the console script is installed, and names this main through its cli (end_with)
    (script_entry,) = importlib.metadata.entry_points(group="console_scripts", name="dml-export")
    assert script_entry.value == "dml_dist.tools.export:cli" and (Path(sys.executable).parent / "dml-export").is_file()


@requires_timm
def test_the_trainer_weighs_the_mutual_term_with_mutual_weights(runs, cohort, tmp_path):
    """Without ``mutual_weights`` the same cohort's first epoch has other mutual terms than with [1, 1, 2]: the
    trainer hands the weights to the step (the all_gather/all_reduce comparison cannot see a dropped key)."""
    r = torchrun(3, cohort_args(runs, tmp_path, exchange="all_gather", epochs=1, mutual_weights="null"))
    assert r.returncode == 0, r.stderr[-3000:]
    plain, weighted = read_summary(tmp_path)["history"][0], cohort["summary"]["history"][0]
    assert plain["train_ce"][2] == pytest.approx(weighted["train_ce"][2], rel=1e-6)  # the same teacher
    for k in (0, 1):
        assert abs(plain["train_kl"][k] - weighted["train_kl"][k]) > 1e-3 * weighted["train_kl"][k], (plain, weighted)


def test_a_resume_keeps_the_statistics_and_the_frozen_flags(runs):
    """A resume whose peers would get other input statistics, or other frozen flags, than the checkpoint's is
    refused on rank 0 in one line (the batches would mean something else to the peers)."""
    from dml_dist.checkpoint.files import check_cohort_checkpoint, load_checkpoint
    from dml_dist.config import build_config
    from dml_dist.world import finalize_config

    path = str(runs["teacher"] / "ckpt" / "a_latest.pth")
    ckpt = load_checkpoint(path)
    cfg = finalize_config(build_config(model="resnet20"), 2)
    run = dict(ckpt["resolved"])
    check_cohort_checkpoint(ckpt, path, cfg, ["resnet20"] * 2, 3, run)  # as it ran
    imagenet = {**run, "normalize": [[[0.485, 0.456, 0.406], [0.229, 0.224, 0.225]]] * 2,
                "normalize_why": ["normalize=imagenet"] * 2}  # fmt: skip
    with pytest.raises(DMLError, match=r"peer 1 was trained on inputs normalised with mean \[0.4914") as e:
        check_cohort_checkpoint(ckpt, path, cfg, ["resnet20"] * 2, 3, imagenet)
    assert "normalize=imagenet" in str(e.value) and "\n" not in str(e.value)
    old = {k: v for k, v in ckpt.items() if k != "resolved"}  # a checkpoint from before these fields: CIFAR-10's
    check_cohort_checkpoint({**old, "resolved": {}}, path, cfg, ["resnet20"] * 2, 3, run)
    with pytest.raises(DMLError, match="peer 2 was a learner there; set frozen as the run had it"):
        check_cohort_checkpoint(ckpt, path, cfg, ["resnet20"] * 2, 3, {**run, "frozen": [False, True]})
    teacher = {**ckpt, "resolved": {**ckpt["resolved"], "frozen": [False, True]}}
    with pytest.raises(DMLError, match="peer 2 was frozen there"):
        check_cohort_checkpoint(teacher, path, cfg, ["resnet20"] * 2, 3, {**run, "frozen": [False, False]})


def test_a_tracker_that_cannot_start_is_one_line_and_a_fresh_run_forgets_the_old_run_id(tmp_path, monkeypatch):
    if not HAVE["mlflow"]:
        pytest.skip("mlflow is not installed")
    from dml_dist.logger import RunLogger

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_free_port()}")  # nobody listens there
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    (tmp_path / "t.mlflow_run").write_text("an-old-run")
    log = RunLogger(str(tmp_path), "t", progress_bar=False, loggers=["mlflow"])
    try:
        error = log.start_run({"lr": 0.1}, {"amp": "off"}, resumed=False)
    finally:
        log.close()
    assert error.startswith("loggers: mlflow could not start a run (") and "leave mlflow out of loggers" in error
    assert "\n" not in error and not (tmp_path / "t.mlflow_run").exists()  # a fresh start: not the old run


# ------------------------------------------------------------------------------------------------- trackers
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wandb_records(path: Path) -> list:
    """The records of a wandb transaction log (``run-<id>.wandb``), decoded with wandb's own protobuf schema:
    a 7-byte header, then LevelDB-log records (crc32c, length, type; FULL/FIRST/MIDDLE/LAST) in 32 KiB blocks."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, records, pos, parts = path.read_bytes(), [], 7, b""
    assert data[:4] == b":W&B", data[:7]
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += left  # zero padding to the block's end
            continue
        parts += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL, LAST
            rec = pb.Record()
            rec.ParseFromString(parts)
            records.append(rec)
            parts = b""
    return records


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    if not HAVE["mlflow"]:
        pytest.skip("mlflow is not installed")
    root, port = tmp_path_factory.mktemp("mlflow"), _free_port()
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'db.sqlite'}", "--artifacts-destination", str(root / "art")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        # The server's job runner (huey consumers, ~10 processes) is not what the test reads back, and it took
        # 30 CPU-s of this 2-core machine in its first half-minute (8 s for the server without it).
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )  # fmt: skip
    yield {"uri": f"http://127.0.0.1:{port}", "proc": proc, "log": root / "server.log"}
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(30)


def _wait_healthy(server) -> None:
    for _ in range(120):
        try:
            urllib.request.urlopen(server["uri"] + "/health", timeout=2)
            return
        except OSError:
            assert server["proc"].poll() is None, server["log"].read_text()[-2000:]
            time.sleep(0.5)
    raise AssertionError("mlflow server did not start: " + server["log"].read_text()[-2000:])


@requires(HAVE["mlflow"] and HAVE["wandb"] and HAVE["timm"], "mlflow, wandb and timm are not installed")
def test_all_reduce_gives_the_weighted_losses_and_the_trackers_read_back(runs, cohort, mlflow_server, tmp_path):
    """The same cohort's first epoch over ``all_reduce`` gives all_gather's weighted losses; it logs to a real
    MLflow server (read back with MlflowClient) and to wandb offline (its transaction log read back)."""
    from mlflow.tracking import MlflowClient

    _wait_healthy(mlflow_server)
    env = {"MLFLOW_TRACKING_URI": mlflow_server["uri"], "MLFLOW_EXPERIMENT_NAME": "cohort", "WANDB_MODE": "offline"}
    args = cohort_args(runs, tmp_path, exchange="all_reduce", epochs=1, loggers="[tensorboard,mlflow,wandb]")
    r = torchrun(3, args, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    s, want = read_summary(tmp_path), cohort["summary"]["history"][0]
    got = s["history"][0]
    assert s["resolved"]["exchange"] == "all_reduce"
    for key in ("train_loss", "train_kl", "val_loss"):
        assert got[key] == pytest.approx(want[key], rel=1e-3, abs=1e-5), key

    client = MlflowClient(mlflow_server["uri"])
    (run,) = client.search_runs([client.get_experiment_by_name("cohort").experiment_id])
    assert run.info.run_name == "t" and run.data.params["config.mutual_weights"] == "[1.0, 1.0, 2.0]"
    hist = client.get_metric_history(run.info.run_id, "cohort/agreement")
    assert [(m.step, m.value) for m in hist] == [(1, pytest.approx(got["agreement"]))]
    assert client.get_metric_history(run.info.run_id, "peer1/val_acc")[0].value == pytest.approx(got["val_acc"][0])
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.json", "resolved.json", "t_summary.json", "t_model1_best.pth"} <= names, names
    resolved = client.download_artifacts(run.info.run_id, "resolved.json", str(tmp_path))
    assert json.loads(Path(resolved).read_text())["exchange"] == "all_reduce"

    (log,) = (tmp_path / "logs" / "wandb").glob("offline-run-*/run-*.wandb")
    records = wandb_records(log)

    def items(rows) -> dict:
        return {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rows}

    history = [items(rec.history.item) for rec in records if rec.history.item]
    (epoch1,) = [h for h in history if "cohort/agreement" in h]
    assert epoch1["cohort/agreement"] == pytest.approx(got["agreement"]) and epoch1["_step"] == 1
    config = items(i for rec in records for i in (*rec.run.config.update, *rec.config.update))
    assert config["config"]["frozen"] == [False, False, True] and config["resolved"]["exchange"] == "all_reduce"
    artifacts = [rec.artifact for rec in records if rec.WhichOneof("record_type") == "artifact"]
    assert artifacts and {"t_summary.json", "t_model1_best.pth"} <= {e.path for e in artifacts[0].manifest.contents}


def test_a_missing_tracker_or_timm_is_one_line(monkeypatch):
    import importlib.util

    from dml_dist.config import build_config

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(DMLError, match=r"mlflow is not installed; pip install 'dml-dist\[mlflow\]'"):
        build_config(loggers=["mlflow"])
    with pytest.raises(DMLError, match="loggers must be a list of tensorboard, mlflow, wandb"):
        build_config(loggers=["neptune"])
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(DMLError, match=r"timm is not installed; pip install 'dml-dist\[timm\]'"):
        build_config(model="timm.resnet18")


def test_frozen_and_per_peer_keys_are_checked_against_the_cohort():
    from dml_dist.config import build_config
    from dml_dist.world import finalize_config

    with pytest.raises(DMLError, match="peer 2 is frozen but would start from random weights"):
        finalize_config(build_config(frozen=[False, True]), 2)
    with pytest.raises(DMLError, match="every peer is frozen"):
        build_config(frozen=[True, True])
    with pytest.raises(DMLError, match="mutual_weights lists 3 entries for 2 peers"):
        finalize_config(build_config(mutual_weights=[1, 1, 2], model_num=None), 2)
    with pytest.raises(DMLError, match="mutual_weights must be a list with one number > 0 per peer"):
        build_config(mutual_weights=[1, 0])
    assert finalize_config(build_config(init_from=["a.pth", None, "b.pth"]), 3)["model_num"] == 3
