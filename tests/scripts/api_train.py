"""Run by tests/test_api.py as a plain `python` process: train_dml, then load + evaluate the checkpoints.

argv: data_dir out_json model_num [mode], mode = default | loaders
Prints nothing of its own but writes out_json.
"""

import json
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from conftest import descendants  # noqa: E402

from dml_dist import (
    DMLError,
    create_dml_config,
    evaluate_dml_models,
    load_dml_models,  # noqa: E402
    prepare_dataloaders,
    train_dml,
)


def main():
    data_dir, out_json, model_num = sys.argv[1], sys.argv[2], int(sys.argv[3])
    mode = sys.argv[4] if len(sys.argv) > 4 else "default"
    cfg = create_dml_config(
        model="resnet20",
        data_dir=data_dir,
        epochs=2,
        model_num=model_num,
        image_size=16,
        batch_size=8,
        lr=0.05,
        num_workers=0,
        print_freq=5,
        consistency_check_every=1,
        experiment_name="api",
    )
    out = {}
    # The caller's own signal handlers: train_dml must leave them as they were (the README's promise).
    handlers = {s: (lambda signum, frame: None) for s in (signal.SIGINT, signal.SIGTERM)}
    for s, h in handlers.items():
        signal.signal(s, h)
    try:
        if mode == "loaders":
            train, val, test = prepare_dataloaders(data_dir, batch_size=8, augment=True, image_size=16)
            res = train_dml(cfg, train, val, test)
        else:
            res = train_dml(cfg)
    except DMLError as e:
        out["error"] = f"{type(e).__name__}: {e}"
    else:
        out.update(
            {
                k: res[k]
                for k in (
                    "best_accuracies",
                    "avg_best_accuracy",
                    "training_history",
                    "test_results",
                    "experiment_name",
                    "checkpoints",
                )
            }
        )
        out["n_models"] = len(res["models"])
        out["model_types"] = sorted({type(m).__name__ for m in res["models"]})
        out["config_model_num"] = res["config"]["model_num"]
        if mode == "loaders":  # the 3-peer run: its checkpoints and returned models, scored again
            loaded = load_dml_models(res["checkpoints"]["best"])
            _, val_loader, test_loader = prepare_dataloaders(data_dir, batch_size=16, augment=False, image_size=16)
            out["eval_best_val"] = evaluate_dml_models(loaded["models"], val_loader)
            final = load_dml_models(res["checkpoints"]["final"])["models"]
            out["eval_returned_test"] = evaluate_dml_models(res["models"], test_loader)
            out["eval_final_test"] = evaluate_dml_models(final, test_loader)
    out["handlers_restored"] = all(signal.getsignal(s) is h for s, h in handlers.items())
    # The spawn start method keeps one multiprocessing resource tracker for the caller's lifetime.
    out["children"] = [
        open(f"/proc/{p}/cmdline").read().replace("\0", " ")
        for p in descendants(os.getpid())
        if "resource_tracker" not in open(f"/proc/{p}/cmdline").read()
    ]
    with open(out_json, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
