"""The Python API for notebooks and scripts: ``train_dml`` launches one process per peer and returns the
trained peers in the caller's process.

    from dml_dist import create_dml_config, train_dml
    results = train_dml(create_dml_config(model="resnet20", data_dir="data", epochs=5, model_num=2))
"""
from __future__ import annotations

import os
import pickle
import re
import sys
import tempfile
import threading
import time
import uuid
from typing import Optional

import torch
from torch.utils.data import DataLoader

from .config import DEFAULT_CONFIG, build_config, finalize_config, validate_config
from .data import Datasets, SeededDataset, TensorImageDataset, build_datasets, make_eval_loader, make_train_loader
from .distributed import is_peer_loss
from .errors import DMLError
from .evaluate import load_dml_models, resolve_device
from .loss import compute_dml_loss

NOTEBOOK_MODEL_NUM = 2  # peers started by train_dml from a plain process when model_num is not given


class DMLTrainingError(DMLError):
    """A peer process failed; the message carries that peer's own error."""


def prepare_dataloaders(data_dir: str, batch_size: int = 64, augment: bool = True, num_workers: int = 0,
                        image_size: int = 32, val_fraction: float = 0.1, seed: int = 42,
                        dataset: str = "imagefolder"):
    """``(train_loader, val_loader, test_loader)`` exactly as the trainer builds them (test_loader is None
    without a ``test/`` split). The train loader uses the shared-seed sampler; call
    ``loader.batch_sampler.set_epoch(e)`` between epochs when iterating it yourself."""
    cfg = build_config(overrides=dict(data_dir=data_dir, batch_size=batch_size, augment=augment,
                                      num_workers=num_workers, image_size=image_size, val_fraction=val_fraction,
                                      seed=seed, dataset=dataset))
    data = build_datasets(cfg)
    train = make_train_loader(data.train, batch_size, seed, num_workers)
    val = make_eval_loader(data.val, batch_size, num_workers)
    test = make_eval_loader(data.test, batch_size, num_workers) if data.test is not None else None
    return train, val, test


def train_epoch_dml(models, optimizers, data_loader, device="auto", temperature: float = 1.0,
                    kl_weight: float = 1.0) -> list[dict]:
    """Single-process building block (the original design's loop): one epoch of DML for all ``models``
    in this process. Returns per-model ``{'loss', 'ce', 'kl', 'accuracy'}``. For one process per peer,
    use ``train_dml``."""
    dev = resolve_device(device)
    sums = [[0.0, 0.0, 0.0, 0.0] for _ in models]
    n = 0
    for m in models:
        m.to(dev).train()
    for x, y in data_loader:
        x, y = x.to(dev), torch.as_tensor(y).to(dev)
        logits = [m(x) for m in models]
        for i, (opt, z) in enumerate(zip(optimizers, logits)):
            peers = [l.detach() for j, l in enumerate(logits) if j != i]
            loss = compute_dml_loss(z, peers, y, temperature, kl_weight)
            opt.zero_grad(set_to_none=True)
            loss.total.backward()
            opt.step()
            bs = y.shape[0]
            sums[i][0] += loss.total.item() * bs
            sums[i][1] += loss.ce.item() * bs
            sums[i][2] += loss.kl.item() * bs
            sums[i][3] += (z.argmax(1) == y).sum().item()
        n += y.shape[0]
    return [{"loss": s[0] / n, "ce": s[1] / n, "kl": s[2] / n, "accuracy": s[3] / n} for s in sums]


# ------------------------------------------------------------------------------------------------ loaders
def _classes(ds) -> list[str]:
    classes = getattr(ds, "classes", None)
    if classes:
        return list(classes)
    targets = getattr(ds, "targets", None)
    if targets is None:
        targets = [ds[i][1] for i in range(len(ds))]  # slow path: datasets without classes/targets
    return [str(c) for c in range(int(max(int(t) for t in targets)) + 1)]


def _check_picklable(name: str, obj) -> None:
    try:
        pickle.dumps(obj)
    except Exception as e:  # pickle raises many types (PicklingError, AttributeError, TypeError)
        raise DMLError(f"{name} cannot be pickled ({type(e).__name__}: {str(e)[:120]}); train_dml sends a copy "
                       f"to each peer process, so define the dataset and its transforms in an importable module "
                       f"(not a lambda or a notebook cell)") from None


def datasets_from_loaders(train_loader, val_loader, test_loader) -> tuple[Datasets, int]:
    """The loaders' datasets for the trainer. Their samplers are replaced: training uses the shared-seed
    sampler (same batches on every peer), evaluation a sequential order (same order on every peer)."""
    if val_loader is None:
        raise DMLError("train_loader was given without val_loader; pass both (and optionally test_loader)")
    loaders = {"train_loader": train_loader, "val_loader": val_loader, "test_loader": test_loader}
    for name, loader in loaders.items():
        if loader is not None and not isinstance(loader, DataLoader):
            raise DMLError(f"{name} must be a torch.utils.data.DataLoader, got {type(loader).__name__}")
    train_ds = train_loader.dataset
    if not isinstance(train_ds, (TensorImageDataset, SeededDataset)):
        train_ds = SeededDataset(train_ds)
    data = Datasets(train_ds, val_loader.dataset, test_loader.dataset if test_loader is not None else None,
                    _classes(train_loader.dataset))
    for name, ds in (("train_loader.dataset", data.train), ("val_loader.dataset", data.val),
                     ("test_loader.dataset", data.test)):
        if ds is not None:
            _check_picklable(name, ds)
    batch_size = train_loader.batch_size or getattr(train_loader.batch_sampler, "batch_size", None)
    return data, batch_size


# ------------------------------------------------------------------------------------------------ launch
def _in_torchrun() -> bool:
    return torch.distributed.is_initialized() or ("TORCHELASTIC_RUN_ID" in os.environ and "RANK" in os.environ)


def _worker(cfg: dict, data: Optional[Datasets], error_dir: str):
    """Entry point of each peer process started by ``train_dml`` (one per peer)."""
    from .train import run
    rank = int(os.environ.get("RANK", "0"))
    try:
        res = run(cfg, data)
    except Exception as e:
        # A rank that only lost contact with a failed peer files its note apart: the caller reports the cause.
        kind = "lost" if is_peer_loss(e) else "error"
        with open(os.path.join(error_dir, f"{kind}{rank}.txt"), "w") as f:
            f.write(str(e) if isinstance(e, DMLError) else f"{type(e).__name__}: {str(e).strip()[:500]}")
        raise
    res.pop("model")
    return res if rank == 0 else None


def _tail(path: str, start: int, stop: threading.Event, out) -> None:
    """Stream rank 0's text log into the caller's stdout (a notebook cell shows it as it comes)."""
    pos = start
    while True:
        done = stop.is_set()
        if os.path.exists(path):
            with open(path) as f:
                f.seek(pos)
                chunk = f.read()
                pos = f.tell()
            for line in chunk.splitlines():
                print(line.split(" ", 2)[-1], file=out, flush=True)  # drop the log file's timestamp
        if done:
            return
        time.sleep(0.5)


def train_dml(config: Optional[dict] = None, train_loader=None, val_loader=None, test_loader=None) -> dict:
    """Train a DML cohort and return ``{'models', 'best_accuracies', 'avg_best_accuracy',
    'training_history', 'test_results', 'config', 'experiment_name', ...}``.

    - Inside a torchrun process group: trains this rank's peer. ``models`` holds all peers on rank 0
      (read back from the final checkpoints rank 0 wrote) and this rank's own peer elsewhere.
    - From a plain process or notebook: starts ``model_num`` (default 2) local peer processes with
      PyTorch's elastic launcher, streams rank 0's log lines, waits, and returns every trained peer
      loaded in this process. A failing peer raises ``DMLTrainingError`` with that peer's message.

    Custom loaders: their datasets are used, their samplers are not (see ``datasets_from_loaders``);
    the train loader's batch size replaces ``batch_size``.
    """
    cfg = validate_config({**DEFAULT_CONFIG, **(config or {})})
    data = None
    if train_loader is not None:
        data, batch_size = datasets_from_loaders(train_loader, val_loader, test_loader)
        cfg["batch_size"] = batch_size or cfg["batch_size"]
    if _in_torchrun():
        return _train_in_group(cfg, data)
    return _launch_local(cfg, data)


def _results(summary: dict, models: list) -> dict:
    return {"models": models, "best_accuracies": summary["best_accuracies"],
            "avg_best_accuracy": summary["avg_best_accuracy"],
            "best_ensemble_accuracy": summary["best_ensemble_accuracy"],
            "training_history": summary["history"], "test_results": summary["test_results"],
            "config": summary["config"], "experiment_name": summary["experiment_name"],
            "checkpoints": summary["checkpoints"], "summary": summary}


def _train_in_group(cfg: dict, data: Optional[Datasets]) -> dict:
    from .train import run
    res = run(cfg, data)
    model = res.pop("model")
    if res["rank"] == 0:
        models = load_dml_models(res["checkpoints"]["final"], "cpu")["models"]
    else:
        models = [model.eval()]
    return _results(res, models)


def _launch_local(cfg: dict, data: Optional[Datasets]) -> dict:
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if cfg["model_num"] is None:
        cfg["model_num"] = len(cfg["model"]) if isinstance(cfg["model"], list) else NOTEBOOK_MODEL_NUM
    nproc = cfg["model_num"]
    cfg = finalize_config(cfg, nproc)  # experiment name, model list length: fail here, not in the children
    cfg["progress_bar"] = False  # children write to files; the caller streams rank 0's log lines instead
    # Restarted gloo workers must not read the dead workers' addresses (pytorch/pytorch#135712).
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    log_path = os.path.join(cfg["log_dir"], f"{cfg['experiment_name']}.log")
    start = os.path.getsize(log_path) if os.path.exists(log_path) else 0
    with tempfile.TemporaryDirectory(prefix="dml-launch-") as tmp:
        err_dir = os.path.join(tmp, "errors")
        os.makedirs(err_dir)
        launch = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=uuid.uuid4().hex,
                              rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
                              monitor_interval=0.1, start_method="spawn",
                              logs_specs=DefaultLogsSpecs(log_dir=os.path.join(tmp, "logs"), redirects=Std.ALL))
        stop = threading.Event()
        tail = threading.Thread(target=_tail, args=(log_path, start, stop, sys.stdout), daemon=True)
        tail.start()
        try:
            out = elastic_launch(launch, _worker)(cfg, data, err_dir)
        except ChildFailedError as e:
            msgs = []
            notes = sorted(os.listdir(err_dir))
            for name in [n for n in notes if n.startswith("error")] or notes:
                rank = int(re.search(r"\d+", name).group())
                with open(os.path.join(err_dir, name)) as f:
                    msgs.append(f"peer {rank + 1} (rank {rank}): {f.read().strip()}")
            if not msgs:
                msgs = [f"rank {r}: exit code {f.exitcode}" for r, f in sorted(e.failures.items())]
            raise DMLTrainingError("train_dml failed: " + "; ".join(msgs)) from None
        finally:
            stop.set()
            tail.join(timeout=5)
    summary = out[0]
    models = load_dml_models(summary["checkpoints"]["final"], "cpu")["models"]
    return _results(summary, models)
