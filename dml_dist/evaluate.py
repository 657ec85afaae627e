"""Load trained peers from their checkpoints and evaluate them and their ensemble.

    dml-eval --checkpoints checkpoints/exp_model1_best.pth checkpoints/exp_model2_best.pth \
        --data-dir ../shared/data/cifar10-small --split val
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from .checkpoint.files import load_checkpoint, recorded_statistics
from .data import build_datasets, make_eval_loader
from .engine import predict_many, score_logits
from .errors import DMLError
from .models import build_model, channels_last_choice
from .weights import apply_statistics


def resolve_device(device="auto") -> torch.device:
    """'auto' | 'cpu' | 'cuda[:i]' | torch.device -> torch.device ('auto': CUDA when available)."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_dml_models(checkpoint_paths: Sequence[str], device: str = "auto", renormalize: bool = True) -> dict:
    """Rebuild each peer from the architecture recorded in its checkpoint.

    Accepts per-peer files (``<exp>_model<k>_best|final|epoch_<e>.pth``) and cohort files
    (``<exp>_latest.pth``, which yields every peer). Returns ``{'models', 'configs', 'device'}``; the
    models are in eval mode on ``device``; each config's ``statistics`` is the [mean, std] its inputs were
    normalised with, which the model applies itself to the data path's inputs unless ``renormalize`` is
    False. Files are read with ``weights_only=True``."""
    if isinstance(checkpoint_paths, str):
        checkpoint_paths = [checkpoint_paths]
    dev = resolve_device(device)
    models, configs = [], []
    for path in checkpoint_paths:
        ckpt = load_checkpoint(path)
        entries = ckpt["peers"] if ckpt.get("kind") == "cohort" else [ckpt]
        ran = ckpt.get("resolved") or {}  # how the run ran them (amp, memory format), beside the config as given
        for i, entry in enumerate(entries):
            k = ckpt.get("peer", i + 1) - 1
            as_run = {"amp": ran["amp"], "channels_last": ran["channels_last"][k]} if ran else {}
            model = build_model(
                entry["arch"],
                ckpt["num_classes"],
                image_size=ckpt.get("image_size", ckpt["config"].get("image_size", 32)),
            )
            try:
                model.load_state_dict(entry["model"])
            except RuntimeError as e:
                raise DMLError(
                    f"checkpoint {path}: weights do not fit {entry['arch']} ({str(e).splitlines()[0][:160]})"
                ) from None
            model = model.to(dev).eval()
            stats = recorded_statistics(ckpt, k)
            if renormalize:
                apply_statistics(model, *stats, dev)
            models.append(model)
            configs.append(
                {
                    **ckpt["config"],
                    **as_run,
                    "arch": entry["arch"],
                    "classes": ckpt["classes"],
                    "num_classes": ckpt["num_classes"],
                    "checkpoint": str(path),
                    "statistics": stats,
                }
            )
    return {"models": models, "configs": configs, "device": dev}


def evaluate_dml_models(models, data_loader, device="auto", config: dict | None = None) -> list[dict]:
    """One entry per model (``model_idx`` 1..N, like the checkpoint names) and a last one for the ensemble
    (``model_idx='ensemble'``, the mean of the peers' softmaxes): accuracy (fraction), loss (mean NLL),
    correct, total; scored exactly as the trainer scores validation. One pass over the loader, every batch
    through every model, so a shuffled loader scores every model on the same labels. ``config`` (the
    original API's argument) may set ``amp``/``channels_last``."""
    dev = resolve_device(device)
    cfg = config or {}
    amp = cfg.get("amp", "off") if dev.type == "cuda" and cfg.get("amp") not in (None, "auto") else "off"
    models = [m.to(dev) for m in models]
    # the trainer's rule (auto: NHWC for convolutional models under AMP on CUDA), decided on the first model
    channels_last = channels_last_choice(cfg.get("channels_last", False), models[0], dev, amp)[0]
    logits, labels = predict_many(models, data_loader, dev, amp, channels_last)
    s = score_logits(logits, labels)
    rows = [
        {
            "model_idx": k + 1,
            "accuracy": s["peer_acc"][k],
            "loss": s["peer_loss"][k],
            "correct": s["peer_correct"][k],
            "total": s["total"],
        }
        for k in range(len(models))
    ]
    rows.append(
        {
            "model_idx": "ensemble",
            "accuracy": s["ensemble_acc"],
            "loss": s["ensemble_loss"],
            "correct": s["ensemble_correct"],
            "total": s["total"],
        }
    )
    return rows


def evaluate_ensemble(models, data_loader, device="auto", config: dict | None = None) -> dict:
    """The ensemble's entry of ``evaluate_dml_models`` alone."""
    return evaluate_dml_models(models, data_loader, device, config)[-1]


def validate_dml(models, val_loader, device="auto", config: dict | None = None) -> list[dict]:
    """Single-process building block (original API): ``evaluate_dml_models`` on the validation loader."""
    return evaluate_dml_models(models, val_loader, device, config)


def format_table(rows: list[dict], archs: Sequence[str] = ()) -> str:
    lines = [f"{'model':<10} {'arch':<10} {'accuracy':>9} {'loss':>8} {'correct':>9}"]
    for r in rows:
        name = "ensemble" if r["model_idx"] == "ensemble" else f"model{r['model_idx']}"
        arch = archs[r["model_idx"] - 1] if r["model_idx"] != "ensemble" and archs else "-"
        lines.append(f"{name:<10} {arch:<10} {r['accuracy']:>9.4f} {r['loss']:>8.4f} {r['correct']:>5}/{r['total']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="dml-eval", description="Evaluate DML peers and their ensemble.")
    p.add_argument("--checkpoints", nargs="+", required=True, help="per-peer .pth files (or a _latest.pth)")
    p.add_argument("--data-dir", required=True, help="data root, laid out as for training")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    try:
        loaded = load_dml_models(args.checkpoints, args.device)
        cfg0 = loaded["configs"][0]
        for c in loaded["configs"][1:]:
            if c["classes"] != cfg0["classes"]:
                raise DMLError(f"{c['checkpoint']} was trained on other classes than {cfg0['checkpoint']}")
        # The trainer's own splits: same data code, same seed and val_fraction as the checkpoint recorded.
        cfg = {**cfg0, "data_dir": args.data_dir, "augment": False, "download": False}
        data = build_datasets(cfg)
        ds = {"train": data.train, "val": data.val, "test": data.test}[args.split]
        if ds is None:
            raise DMLError(f"{args.data_dir} has no {args.split} split; use --split val")
        if data.classes != cfg0["classes"]:
            raise DMLError(f"classes in {args.data_dir} {data.classes} differ from the checkpoint's {cfg0['classes']}")
        if hasattr(ds, "augment"):
            ds.augment = False
        rows = evaluate_dml_models(loaded["models"], make_eval_loader(ds, args.batch_size), loaded["device"])
        print(f"{args.split}: {len(ds)} images, {len(data.classes)} classes")
        print(format_table(rows, [c["arch"] for c in loaded["configs"]]))
    except DMLError as e:
        print(f"dml-dist: error: {e}", file=sys.stderr)
        return 1
    return 0


def cli() -> None:
    """The ``dml-eval`` command (``python -m dml_dist.evaluate`` alike): ``main``, ended by ``end_with``."""
    from dml_dist.errors import end_with

    end_with(main)


if __name__ == "__main__":
    cli()
