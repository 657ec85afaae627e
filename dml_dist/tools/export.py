"""dml-export: the cohort's ensemble (the mean of the peers' softmaxes), or one peer, as one file that loads and runs
without dml-dist.

    dml-export checkpoints/exp_model1_best.pth checkpoints/exp_model2_best.pth --out ensemble.pt2
    dml-export checkpoints/exp_latest.pth --peer 2 --out peer2.pt2
    dml-export checkpoints/exp_model*_best.pth --format onnx --out ensemble.onnx

The program takes decoded RGB images as uint8 ``[B, 3, S, S]`` at the training ``image_size`` S (any batch size)
and returns class probabilities ``[B, C]``; it scales and normalises each peer's input itself, with the statistics
that peer was trained with. What it expects is printed and written into the file: ``torch.export.save``'s extra file
``dml_dist.json`` (``torch.export.load(path, extra_files={"dml_dist.json": ""})`` reads it back), or the ONNX
model's ``metadata_props`` (key ``dml_dist``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

import torch
import torch.nn as nn

from ..errors import DMLError
from ..evaluate import load_dml_models

METADATA = "dml_dist.json"


class Ensemble(nn.Module):
    """uint8 images -> the mean of the peers' softmaxes, each peer's input normalised with its own statistics."""

    def __init__(self, models: list[nn.Module], statistics: list):
        super().__init__()
        self.peers = nn.ModuleList(models)
        self.register_buffer("mean", torch.tensor([m for m, _ in statistics]).view(len(models), 1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([s for _, s in statistics]).view(len(models), 1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0
        probs = [peer((x - self.mean[k]) / self.std[k]).float().softmax(-1) for k, peer in enumerate(self.peers)]
        return torch.stack(probs).mean(0)


def build(checkpoints: list[str], peer: int | None = None) -> tuple[Ensemble, dict]:
    """The module to export and its metadata, from the checkpoints (CPU, eval mode)."""
    loaded = load_dml_models(checkpoints, "cpu", renormalize=False)
    configs, models = loaded["configs"], loaded["models"]
    for c in configs[1:]:
        if c["classes"] != configs[0]["classes"] or c["image_size"] != configs[0]["image_size"]:
            raise DMLError(
                f"{c['checkpoint']} was trained on other classes or image size than {configs[0]['checkpoint']}; "
                f"export peers of one cohort"
            )
    if peer is not None:
        if not 1 <= peer <= len(models):
            raise DMLError(f"--peer {peer}: the checkpoints hold {len(models)} peer(s); give 1..{len(models)}")
        configs, models = [configs[peer - 1]], [models[peer - 1]]
    size = int(configs[0]["image_size"])
    meta = {
        "format": "dml-dist ensemble" if len(models) > 1 else "dml-dist peer",
        "input": f"uint8 [B, 3, {size}, {size}], RGB, 0..255 (decoded, resized and centre-cropped as for evaluation)",
        "output": f"float32 [B, {len(configs[0]['classes'])}]: class probabilities"
        + (f" (the mean of {len(models)} peers' softmaxes)" if len(models) > 1 else " (softmax)"),
        "image_size": size,
        "classes": list(configs[0]["classes"]),
        "peers": [
            {"arch": c["arch"], "checkpoint": c["checkpoint"], "mean": c["statistics"][0], "std": c["statistics"][1]}
            for c in configs
        ],
    }
    return Ensemble(models, [c["statistics"] for c in configs]).eval(), meta


def export(checkpoints: list[str], out: str, fmt: str = "pt2", peer: int | None = None) -> dict:
    """Write the program to ``out`` (``pt2``: ``torch.export``; ``onnx``: torch's ONNX exporter) -> its metadata."""
    module, meta = build(checkpoints, peer)
    size = meta["image_size"]
    example = (torch.zeros(2, 3, size, size, dtype=torch.uint8),)
    batch = {"images": {0: torch.export.Dim("batch", min=1, max=65536)}}
    folder = os.path.dirname(os.path.abspath(out))
    os.makedirs(folder, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".dml-export-", dir=folder)  # written whole, then renamed
    tmp = os.path.join(staging, os.path.basename(out))  # ONNX's external data (> 2 GB) lands beside it
    try:
        _write(module, example, batch, meta, tmp, fmt)
        for name in os.listdir(staging):
            os.replace(os.path.join(staging, name), os.path.join(folder, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return meta


def _write(module: Ensemble, example: tuple, batch: dict, meta: dict, tmp: str, fmt: str) -> None:
    with torch.no_grad():
        if fmt == "pt2":
            program = torch.export.export(module, example, dynamic_shapes=batch)
            torch.export.save(program, tmp, extra_files={METADATA: json.dumps(meta)})
        else:
            try:
                import onnx  # noqa: F401  (the exporter needs onnx and onnxscript)
                import onnxscript  # noqa: F401
            except ImportError:
                raise DMLError("--format onnx needs onnx and onnxscript: pip install 'dml-dist[onnx]'") from None
            program = torch.onnx.export(module, example, dynamic_shapes=batch, input_names=["images"], dynamo=True)
            program.model.metadata_props["dml_dist"] = json.dumps(meta)
            program.save(tmp)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="dml-export", description="Export a DML cohort's ensemble (or one peer).")
    p.add_argument("checkpoints", nargs="+", help="per-peer .pth files (or a cohort's _latest.pth)")
    p.add_argument("--out", required=True, help="the file to write (.pt2 or .onnx)")
    p.add_argument("--format", choices=("pt2", "onnx"), default="pt2")
    p.add_argument("--peer", type=int, default=None, help="export this peer alone (1..N) instead of the ensemble")
    args = p.parse_args(argv)
    try:
        meta = export(args.checkpoints, args.out, args.format, args.peer)
    except DMLError as e:
        print(f"dml-dist: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.out} ({args.format}): {meta['format']} of {len(meta['peers'])} peer(s)")
    print(f"  input:  {meta['input']}")
    print(f"  output: {meta['output']}")
    for k, peer in enumerate(meta["peers"]):
        print(f"  peer {k + 1}: {peer['arch']} from {peer['checkpoint']}, mean {peer['mean']} std {peer['std']}")
    return 0


def cli() -> None:
    """The ``dml-export`` command (``python -m dml_dist.tools.export`` alike): ``main``, ended by ``end_with``."""
    from dml_dist.errors import end_with

    end_with(main)


if __name__ == "__main__":
    cli()
