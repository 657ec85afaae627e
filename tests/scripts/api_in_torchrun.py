"""Run under torchrun by tests/test_api.py: train_dml inside an existing process group.

argv: data_dir out_dir [mode]; mode "loaders": a user's own torchvision ImageFolder loaders with random
transforms and a custom collate_fn (the per-sample path), read by num_workers=2 DataLoader workers."""

import json
import os
import sys

from dml_dist import create_dml_config, train_dml
from dml_dist.errors import exit_process

if __name__ == "__main__":
    data_dir, out_dir = sys.argv[1], sys.argv[2]
    mode = sys.argv[3] if len(sys.argv) > 3 else "default"
    cfg = create_dml_config(
        model="resnet20",
        data_dir=data_dir,
        epochs=1,
        image_size=16,
        batch_size=8,
        num_workers=0,
        progress_bar=False,
        save_dir=os.path.join(out_dir, "ckpt"),
        log_dir=os.path.join(out_dir, "logs"),
        experiment_name="ing",
    )
    if mode == "loaders":
        import torch
        from caller_helpers import marking_collate  # this script's folder is on sys.path
        from torch.utils.data import DataLoader
        from torchvision.datasets import ImageFolder
        from torchvision.transforms import v2 as T

        tf = T.Compose(
            [
                T.RandomResizedCrop(16, scale=(0.5, 1.0)),
                T.RandomHorizontalFlip(),
                T.ToImage(),
                T.ToDtype(torch.float32, scale=True),
            ]
        )
        plain = T.Compose([T.Resize((16, 16)), T.ToImage(), T.ToDtype(torch.float32, scale=True)])
        train = DataLoader(
            ImageFolder(os.path.join(data_dir, "train"), tf), batch_size=8, shuffle=True, collate_fn=marking_collate
        )
        val = DataLoader(ImageFolder(os.path.join(data_dir, "val"), plain), batch_size=8)
        cfg.update(num_workers=2, consistency_check_every=1)
        res = train_dml(cfg, train, val)
    else:
        res = train_dml(cfg)
    rank = os.environ["RANK"]
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"n_models": len(res["models"]), "best": res["best_accuracies"], "pid": os.getpid()}, f)
    exit_process(0)  # as docs/python-api.md advises a torchrun script that ends after train_dml
