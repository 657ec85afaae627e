"""The Python API for notebooks and scripts: ``train_dml`` launches one process per peer and returns the
trained peers in the caller's process; the original single-process module's calls work as documented.

    from dml_dist import create_dml_config, train_dml
    results = train_dml(create_dml_config(model="resnet20", data_dir="data", epochs=5, model_num=2))
"""

from __future__ import annotations

import contextlib
import pickle
import sys

import torch
from torch.utils.data import DataLoader

from .config import DEFAULT_CONFIG, build_config, validate_config
from .data import (
    Datasets,
    FileImageDataset,
    SeededDataset,
    TensorImageDataset,
    build_datasets,
    make_eval_loader,
    sample_dataloader,
    split_indices,
    split_train_val,
)
from .distributed import under_launcher
from .engine import forward, peer_update
from .errors import DMLError
from .evaluate import load_dml_models, resolve_device
from .launcher import DMLTrainingError, launch_local
from .world import default_model_num, finalize_config, world_size_for

__all__ = ["DMLTrainingError", "prepare_dataloaders", "train_dml", "train_epoch_dml"]


def prepare_dataloaders(
    data_dir: str = "data",
    batch_size: int = DEFAULT_CONFIG["batch_size"],
    augment=DEFAULT_CONFIG["augment"],
    num_workers: int = DEFAULT_CONFIG["num_workers"],
    image_size: int = DEFAULT_CONFIG["image_size"],
    val_fraction: float = DEFAULT_CONFIG["val_fraction"],
    seed: int = DEFAULT_CONFIG["seed"],
    dataset: str = DEFAULT_CONFIG["dataset"],
):
    """``(train_loader, val_loader, test_loader)`` over the trainer's own datasets (test_loader is None
    without a ``test/`` split); defaults are ``DEFAULT_CONFIG``'s. The train loader uses the shared-seed
    sampler (the same batches in every process); ``train_epoch_dml`` advances its epoch, or call
    ``loader.batch_sampler.set_epoch(e)`` when iterating it yourself."""
    cfg = build_config(
        overrides=dict(
            data_dir=data_dir,
            batch_size=batch_size,
            augment=augment,
            num_workers=num_workers,
            image_size=image_size,
            val_fraction=val_fraction,
            seed=seed,
            dataset=dataset,
        )
    )
    data = build_datasets(cfg)
    train = sample_dataloader(data.train, batch_size, seed, num_workers)
    val = make_eval_loader(data.val, batch_size, num_workers)
    test = make_eval_loader(data.test, batch_size, num_workers) if data.test is not None else None
    return train, val, test


# ------------------------------------------------------------------------------- single-process building blocks
def _read_opts(config, temperature, kl_weight, print_freq) -> dict:
    """The original form passes a config dict; the project's form passes numbers."""
    base = {"temperature": 1.0, "kl_weight": 1.0, "print_freq": 0, "mutual": "dml", "mutual_weights": None,
            "frozen": None}  # fmt: skip
    if isinstance(config, dict):
        base.update({k: config[k] for k in base if k in config and config[k] is not None})
    elif isinstance(config, (int, float)):
        base["temperature"] = float(config)  # train_epoch_dml(models, opts, loader, device, T, w)
    for k, v in (("temperature", temperature), ("kl_weight", kl_weight), ("print_freq", print_freq)):
        if v is not None:
            base[k] = v
    return base


def train_epoch_dml(
    models,
    optimizers,
    train_loader=None,
    device="auto",
    config=None,
    kl_weight=None,
    *,
    temperature=None,
    print_freq=None,
    data_loader=None,
) -> list[dict]:
    """One epoch of DML for all ``models`` in this process (the original single-process loop):
    every batch goes through every model, then each model takes its step against the others' detached
    predictions, with the same step function as the distributed engine.

    Forms: ``train_epoch_dml(models, optimizers, train_loader, device, config)`` with a config dict
    (temperature, kl_weight, print_freq read from it), or ``(models, optimizers, loader, device,
    temperature, kl_weight)``. A shared-seed loader (``prepare_dataloaders``) is advanced to its next epoch
    after the pass. Returns per model ``{'loss', 'ce', 'kl', 'accuracy'}``. For one process per peer, use
    ``train_dml``."""
    loader = train_loader if train_loader is not None else data_loader
    if loader is None:
        raise DMLError("train_epoch_dml needs a train_loader")
    opts = _read_opts(config, temperature, kl_weight, print_freq)
    dev = resolve_device(device)
    sums = [torch.zeros(5, dtype=torch.float64, device=dev) for _ in models]
    finite = torch.ones((), dtype=torch.bool, device=dev)
    frozen = opts["frozen"] or [False] * len(models)  # a frozen model predicts in eval mode and never steps
    for key, value in (("frozen", frozen), ("mutual_weights", opts["mutual_weights"])):
        if value is not None and len(value) != len(models):
            raise DMLError(f"{key} lists {len(value)} entries for {len(models)} models; give one per model")
    for m, f in zip(models, frozen):
        m.to(dev).train(not f)
    sampler = getattr(loader, "batch_sampler", None)
    for step, (x, y) in enumerate(loader):
        x, y = x.to(dev, non_blocking=True), torch.as_tensor(y).to(dev, non_blocking=True)
        logits = []
        for m, f in zip(models, frozen):
            with torch.no_grad() if f else contextlib.nullcontext():
                logits.append(forward(m, x))
        all_logits = torch.stack([z.detach() for z in logits])
        for i, (opt, z) in enumerate(zip(optimizers, logits)):
            stats, ok = peer_update(
                z, all_logits, i, y, None if frozen[i] else opt, opts["temperature"], opts["kl_weight"],
                opts["mutual"], weights=opts["mutual_weights"],
            )  # fmt: skip
            sums[i] += stats
            finite &= ok
        if opts["print_freq"] and (step + 1) % opts["print_freq"] == 0:
            print(
                f"[{step + 1}/{len(loader)}] "
                + " ".join(
                    f"model{i + 1} loss {float(s[0] / s[4]):.4f} acc {float(s[3] / s[4]):.4f}"
                    for i, s in enumerate(sums)
                ),
                flush=True,
            )
    if hasattr(sampler, "set_epoch") and hasattr(sampler, "epoch"):
        sampler.set_epoch(sampler.epoch + 1)
    if not bool(finite):
        raise DMLError("loss is not finite (nan/inf) in this epoch; lower lr and check the data")
    return [
        {"loss": float(s[0] / s[4]), "ce": float(s[1] / s[4]), "kl": float(s[2] / s[4]), "accuracy": float(s[3] / s[4])}
        for s in (t.cpu() for t in sums)
    ]


# ------------------------------------------------------------------------------------------------ loaders
def _classes(ds) -> list[str]:
    classes = getattr(ds, "classes", None)
    if classes:
        return list(classes)
    base = getattr(ds, "dataset", None)  # Subset and friends
    if base is not None and getattr(base, "classes", None):
        return list(base.classes)
    targets = getattr(ds, "targets", None)
    if targets is None:
        targets = [ds[i][1] for i in range(len(ds))]  # slow path: datasets without classes/targets
    return [str(c) for c in range(int(max(int(t) for t in targets)) + 1)]


def _check_transferable(name: str, obj) -> None:
    """Peers are fresh interpreters: what they get must pickle, and unpickle without the caller's
    ``__main__`` (a notebook cell, the script itself, stdin)."""
    try:
        blob = pickle.dumps(obj)
    except Exception as e:  # pickle raises many types (PicklingError, AttributeError, TypeError)
        raise DMLError(
            f"{name} cannot be pickled ({type(e).__name__}: {str(e)[:120]}); train_dml sends a copy "
            f"to each peer process, so define the dataset and its transforms in an importable module "
            f"(not a lambda or a notebook cell)"
        ) from None
    if b"__main__" in blob:
        raise DMLError(
            f"{name} uses a class or function defined in __main__ (a notebook cell or the calling "
            f"script); the peer processes are fresh interpreters that cannot import it, so define it "
            f"in an importable module"
        )


def _check_loader(name: str, loader) -> None:
    if loader is not None and not isinstance(loader, DataLoader):
        raise DMLError(f"{name} must be a torch.utils.data.DataLoader, got {type(loader).__name__}")


def datasets_from_loaders(cfg: dict, train_loader, val_loader, test_loader) -> tuple[Datasets | None, int | None]:
    """The loaders' datasets for the trainer. Their samplers are replaced: training uses the shared-seed
    sampler (same batches on every peer), evaluation a sequential order (same order on every peer).

    - no ``val_loader``: ``val_fraction`` of the train dataset is held out (by ``seed``), as the CLI does;
    - ``test_loader`` alone: the data comes from ``data_dir``, the test split from the loader;
    - a custom train loader's ``collate_fn`` is kept."""
    for name, loader in (("train_loader", train_loader), ("val_loader", val_loader), ("test_loader", test_loader)):
        _check_loader(name, loader)
    if train_loader is None and val_loader is not None:
        raise DMLError("val_loader was given without train_loader; pass train_loader too (or neither)")
    if train_loader is None:
        if test_loader is None:
            return None, None
        data = build_datasets(cfg)
        data.test = test_loader.dataset
        _check_transferable("test_loader.dataset", data.test)
        return data, None
    train_ds = train_loader.dataset
    classes = _classes(train_ds)
    if val_loader is not None:
        val_ds = val_loader.dataset
    elif isinstance(train_ds, TensorImageDataset):
        train_ds, val_ds = split_train_val(train_ds, cfg["val_fraction"], cfg["seed"])
    else:
        train_idx, val_idx = split_indices(len(train_ds), cfg["val_fraction"], cfg["seed"])
        val_ds = torch.utils.data.Subset(train_ds, val_idx.tolist())
        train_ds = torch.utils.data.Subset(train_ds, train_idx.tolist())
    if not isinstance(train_ds, (TensorImageDataset, SeededDataset)):
        train_ds = SeededDataset(train_ds)
    from torch.utils.data.dataloader import default_collate

    collate = train_loader.collate_fn if train_loader.collate_fn is not default_collate else None
    data = Datasets(
        train_ds,
        val_ds,
        test_loader.dataset if test_loader is not None else None,
        classes,
        collate,
        path="stream" if isinstance(train_ds, FileImageDataset) else "custom",
        why="the datasets of the loaders passed to train_dml",
    )
    for name, obj in (
        ("train_loader.dataset", data.train),
        ("val_loader.dataset", data.val),
        ("test_loader.dataset", data.test),
        ("train_loader.collate_fn", collate),
    ):
        if obj is not None:
            _check_transferable(name, obj)
    batch_size = train_loader.batch_size or getattr(train_loader.batch_sampler, "batch_size", None)
    return data, batch_size


# ------------------------------------------------------------------------------------------------ launch
def _in_torchrun() -> bool:
    return torch.distributed.is_initialized() or under_launcher()


def train_dml(config: dict | None = None, train_loader=None, val_loader=None, test_loader=None) -> dict:
    """Train a DML cohort and return ``{'models', 'best_accuracies', 'avg_best_accuracy',
    'training_history', 'test_results', 'config', 'experiment_name', ...}``.

    - From a plain process, a notebook, ``python -c``, stdin, a script without a main guard: starts
      one local process per replica of every peer (``model_num``, default 2, × ``replicas``, or the sum
      of a ``replicas`` list; fresh interpreters, see
      ``launcher``), streams rank 0's log lines, waits, and returns every trained peer loaded in this
      process. A failing peer raises ``DMLTrainingError`` with that peer's message.
    - Inside a torchrun process group: trains this rank's peer. ``models`` holds all peers on rank 0
      (read back from the final checkpoints rank 0 wrote) and this rank's own peer elsewhere.

    Custom loaders: their datasets are used, their samplers are not (see ``datasets_from_loaders``);
    the train loader's batch size replaces ``batch_size``.
    """
    cfg = validate_config({**DEFAULT_CONFIG, **(config or {})})
    data, batch_size = datasets_from_loaders(cfg, train_loader, val_loader, test_loader)
    cfg["batch_size"] = batch_size or cfg["batch_size"]
    if (config or {}).get("model_num") is None and isinstance(cfg["replicas"], list):
        cfg["model_num"] = len(cfg["replicas"])  # one count per peer
    if _in_torchrun():
        return _train_in_group(cfg, data)
    cfg["model_num"] = default_model_num({**cfg, "model_num": (config or {}).get("model_num")})
    cfg = finalize_config(cfg, world_size_for(cfg))  # fail here, not in the children
    cfg["progress_bar"] = False  # children write to files; the caller streams rank 0's log lines instead
    summary = launch_local(cfg, data, stream=sys.stdout, caller="train_dml")
    models = load_dml_models(summary["checkpoints"]["final"], "cpu")["models"]
    return _results(summary, models)


def _results(summary: dict, models: list) -> dict:
    return {
        "models": models,
        "best_accuracies": summary["best_accuracies"],
        "avg_best_accuracy": summary["avg_best_accuracy"],
        "best_ensemble_accuracy": summary["best_ensemble_accuracy"],
        "training_history": summary["history"],
        "test_results": summary["test_results"],
        "config": summary["config"],
        "experiment_name": summary["experiment_name"],
        "checkpoints": summary["checkpoints"],
        "summary": summary,
    }


def _train_in_group(cfg: dict, data: Datasets | None) -> dict:
    from .train import run

    try:
        res = run(cfg, data)
    except DMLError as e:
        e.store = None  # the caller handles it, not report_error: the group's store must not outlive the group
        raise
    model = res.pop("model")
    if res["rank"] == 0:
        models = load_dml_models(res["checkpoints"]["final"], "cpu")["models"]
    else:
        models = [model.eval()]
    return _results(res, models)
