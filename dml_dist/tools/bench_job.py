"""The data path's whole-job figures for ``dml-bench --data``: CPU time of every process of a job (1 node and 2
localhost nodes) against one model alone, start-up to the first step, and evaluation decode work."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile

from ..config import build_config
from ..errors import DMLError


def _job_cpu(cmds: list) -> float:
    """CPU seconds (user + system) of every process that ``cmds`` start, all their descendants included:
    each level waits for its children (the shell for torchrun, torchrun for its ranks, a rank for its
    DataLoader workers), so ``RUSAGE_CHILDREN`` counts them all, the exited ones too."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    # PASSIVE: idle OpenMP threads sleep instead of spinning (a one-rank job gets 2 threads here, and their
    # spinning would count as data-path CPU)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "OMP_WAIT_POLICY": "PASSIVE",
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
    }
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for c in cmds]
    outs = [p.communicate() for p in procs]
    for p, (_, err) in zip(procs, outs):
        if p.returncode != 0:
            raise DMLError(
                f"job-cpu probe failed: {err.strip().splitlines()[-1][:300] if err.strip() else p.returncode}"
            )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def _probe_cmds(nodes: int, nproc: int, keys: dict) -> list:
    args = [f"{k}={v}" for k, v in keys.items()]
    if nodes == 1:
        return [
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc_per_node={nproc}",
                "-m",
                "dml_dist.tools.probe",
                *args,
            ]
        ]
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return [
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nnodes={nodes}",
            f"--nproc_per_node={nproc}",
            "--rdzv_backend=c10d",
            f"--rdzv_endpoint=127.0.0.1:{port}",
            f"--rdzv_id=bench{port}",
            f"--rdzv_conf=is_host={int(n == 0)}",
            "-m",
            "dml_dist.tools.probe",
            *args,
        ]
        for n in range(nodes)
    ]


def job_cpu(b: dict, cache_dir: str) -> dict:
    """The data path's CPU time per step for the whole job (every process, workers included) against one
    model alone: long runs minus short runs, so start-up cancels. Stream path, rrc + flip, 1 worker per rank."""
    common = {
        "data_dir": b["data_dir"],
        "loader": "stream",
        "image_size": b["image_size"],
        "batch_size": b["batch_size"],
        "augment": "[rrc,flip]",
        "num_workers": 1,
        "cache_dir": cache_dir,
        "consistency_check_every": 0,
    }
    layouts = {
        "one_model": (1, 1, {"model_num": 1}),
        "1_node_2_peers": (1, 2, {"model_num": 2}),
        "2_nodes_2_peers_x_2_replicas": (2, 2, {"model_num": 2, "replicas": 2}),
    }
    short, long = b["job_steps"]
    _job_cpu(_probe_cmds(1, 1, {**common, "model_num": 1, "steps": 1}))  # fill the caches (manifest, val/) once
    rows = {}
    for name, (nodes, nproc, keys) in layouts.items():
        per_step = []
        for _ in range(b["job_repeats"]):  # start-up costs seconds of CPU and varies: the median of repeats
            cpu = {n: _job_cpu(_probe_cmds(nodes, nproc, {**common, **keys, "steps": n})) for n in (short, long)}
            per_step.append((cpu[long] - cpu[short]) / (long - short))
        rows[name] = {
            "cpu_s_per_step": round(sorted(per_step)[len(per_step) // 2], 4),
            "runs": [round(x, 4) for x in per_step],
        }
    alone = rows["one_model"]["cpu_s_per_step"]
    for row in rows.values():
        row["vs_one_model"] = round(row["cpu_s_per_step"] / alone, 3)
    return rows


def startup(b: dict) -> dict:
    """Process start to the first batch, 2 ranks, stream path, on a folder of ``startup_files`` files
    (copies of one small JPEG): the first start lists the folder, a restart reads the manifest."""
    import numpy as np
    from PIL import Image

    with tempfile.TemporaryDirectory() as root:
        classes = 1000
        per_class = max(1, b["startup_files"] // classes)
        buf = os.path.join(root, "one.jpg")
        Image.fromarray(np.full((40, 48, 3), 90, np.uint8)).save(buf, quality=90)
        data = open(buf, "rb").read()
        for c in range(classes):
            d = os.path.join(root, "data", "train", f"n{c:08d}")
            os.makedirs(d)
            for i in range(per_class):
                with open(os.path.join(d, f"n{c:08d}_{i}.JPEG"), "wb") as f:
                    f.write(data)
        out = {"files": classes * per_class}
        for kind in ("first_start", "restart"):
            res = probe_run(
                2,
                data_dir=os.path.join(root, "data"),
                loader="stream",
                image_size=32,
                batch_size=32,
                augment="[rrc,flip]",
                num_workers=1,
                steps=2,
                cache_dir=os.path.join(root, "cache"),
                val_fraction=0.01,
            )
            out[f"{kind}_s"] = max(r["first_batch_s"] for r in res["ranks"])
        return out


def eval_decode(b: dict) -> dict:
    """Validation images decoded per start on the stream path (cache_eval): the first start decodes val/
    once into the cache, a restart none; every evaluation scores the cached set from the device."""
    from ..data import build_datasets

    with tempfile.TemporaryDirectory() as cache:
        out = {}
        for kind in ("first_start", "restart"):
            log: list = []
            cfg = build_config(
                overrides={
                    "data_dir": b["data_dir"],
                    "loader": "stream",
                    "image_size": b["image_size"],
                    "augment": ["rrc", "flip"],
                    "cache_dir": cache,
                }
            )
            data = build_datasets(cfg, log=log.append)
            built = [line for line in log if line.startswith("cache: decoded") and " into " in line]
            out[f"{kind}_images_decoded"] = sum(
                int(line.split()[2])
                for line in built
                if os.path.basename(line.split(" into ")[1].split(" in ")[0]).startswith("val_")
            )
        out["val_images"] = len(data.val)
        out["per_evaluation_images_decoded"] = 0 if "from the cache" in data.why else len(data.val)
        return out


def probe_run(nproc: int, **kw) -> dict:
    """One ``dml_dist.tools.probe`` run under torchrun on this node."""
    (cmd,) = _probe_cmds(1, nproc, kw)
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if r.returncode != 0:
        raise DMLError(f"probe with {nproc} rank(s) failed: {r.stderr.strip().splitlines()[-1][:300]}")
    return json.loads(r.stdout.strip().splitlines()[-1])
