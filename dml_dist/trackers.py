"""Experiment trackers beside TensorBoard (config key ``loggers``): MLflow and Weights & Biases, rank 0 only.

Each receives the config as given and as resolved once, the per-epoch scalars (the TensorBoard tags), and at the
end the summary and the best checkpoints as artifacts. Where they send it is theirs to configure: MLflow reads
``MLFLOW_TRACKING_URI`` (a server, or ``./mlruns`` when unset) and ``MLFLOW_EXPERIMENT_NAME``; wandb reads
``WANDB_MODE`` (``offline`` writes under ``log_dir/wandb``), ``WANDB_PROJECT`` and its login. A restarted or resumed
run continues the same tracker run: its id is kept in ``log_dir/<exp>.<tracker>_run``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets

from .errors import DMLError

INSTALL = {"mlflow": "pip install 'dml-dist[mlflow]'", "wandb": "pip install 'dml-dist[wandb]'"}


def check_installed(loggers: list[str]) -> None:
    """Every rank, at config time: a tracker that is not installed is one line saying how to install it."""
    for name in loggers:
        if name in INSTALL and importlib.util.find_spec(name) is None:
            raise DMLError(f"loggers: {name} is not installed; {INSTALL[name]} (or leave {name} out of loggers)")


def _flat(d: dict, prefix: str = "") -> dict:
    """Nested config -> ``{"config.lr": "0.1", ...}`` (trackers' parameters are flat strings)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
    return out


class _Tracker:
    def __init__(self, log_dir: str, experiment: str):
        self.id_file = os.path.join(log_dir, f"{experiment}.{self.name}_run")
        self.log_dir, self.experiment = log_dir, experiment

    def _run_id(self, resumed: bool) -> str | None:
        """The run to continue: a resumed job's (kept in ``id_file``); a fresh start forgets it."""
        if not resumed:
            if os.path.isfile(self.id_file):
                os.remove(self.id_file)
            return None
        return open(self.id_file).read().strip() if os.path.isfile(self.id_file) else None

    def _keep_id(self, run_id: str) -> None:
        with open(self.id_file, "w") as f:
            f.write(run_id)


class MLflowTracker(_Tracker):
    name = "mlflow"

    def start(self, config: dict, resolved: dict, resumed: bool) -> None:
        import mlflow

        self.mlflow = mlflow
        run_id = self._run_id(resumed)
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "dml-dist"))
        self.run = mlflow.start_run(run_id=run_id, run_name=None if run_id else self.experiment)
        self._keep_id(self.run.info.run_id)
        if run_id is None:  # parameters are write-once in MLflow
            mlflow.log_params(_flat({"config": config}))
        mlflow.log_dict(config, "config.json")
        mlflow.log_dict(resolved, "resolved.json")

    def metrics(self, values: dict, step: int) -> None:
        self.mlflow.log_metrics({k: float(v) for k, v in values.items()}, step=step)

    def artifacts(self, paths: list[str]) -> None:
        for path in paths:
            if os.path.isfile(path):
                self.mlflow.log_artifact(path)

    def close(self, failed: bool = False) -> None:
        self.mlflow.end_run(status="FAILED" if failed else "FINISHED")


class WandbTracker(_Tracker):
    name = "wandb"

    def start(self, config: dict, resolved: dict, resumed: bool) -> None:
        import wandb

        self.wandb = wandb
        run_id = self._run_id(resumed) or secrets.token_hex(4)
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "dml-dist"),
            name=self.experiment,
            id=run_id,
            resume="allow",
            dir=self.log_dir,
            config={"config": config, "resolved": resolved},
        )
        self._keep_id(run_id)

    def metrics(self, values: dict, step: int) -> None:
        self.run.log(dict(values), step=step)

    def artifacts(self, paths: list[str]) -> None:
        files = [p for p in paths if os.path.isfile(p)]
        if files:
            artifact = self.wandb.Artifact(f"{self.experiment}-outputs", type="dml-dist")
            for path in files:
                artifact.add_file(path)
            self.run.log_artifact(artifact)

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


TRACKERS = {"mlflow": MLflowTracker, "wandb": WandbTracker}


def make_trackers(loggers: list[str], log_dir: str, experiment: str) -> list[_Tracker]:
    return [TRACKERS[name](log_dir, experiment) for name in loggers if name in TRACKERS]
