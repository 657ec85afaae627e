"""Run under torchrun by tests/test_api.py: train_dml inside an existing process group."""
import json
import os
import sys

from dml_dist import create_dml_config, train_dml

if __name__ == "__main__":
    data_dir, out_dir = sys.argv[1], sys.argv[2]
    cfg = create_dml_config(model="resnet20", data_dir=data_dir, epochs=1, image_size=16, batch_size=8,
                            num_workers=0, progress_bar=False, save_dir=os.path.join(out_dir, "ckpt"),
                            log_dir=os.path.join(out_dir, "logs"), experiment_name="ing")
    res = train_dml(cfg)
    rank = os.environ["RANK"]
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"n_models": len(res["models"]), "best": res["best_accuracies"]}, f)
