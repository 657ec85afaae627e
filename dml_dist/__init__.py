"""dml-dist: distributed Deep Mutual Learning, one process per peer."""

__version__ = "0.4.0"

from .config import DEFAULT_CONFIG, create_dml_config  # noqa: E402
from .errors import DMLError  # noqa: E402
from .loss import compute_dml_loss  # noqa: E402
from .models import build_model  # noqa: E402

# Imported on first use, so `python -m dml_dist.evaluate` / `-m dml_dist.train` run their module once.
_LAZY = {
    "DMLTrainingError": "launcher",
    "prepare_dataloaders": "api",
    "train_dml": "api",
    "train_epoch_dml": "api",
    "evaluate_dml_models": "evaluate",
    "evaluate_ensemble": "evaluate",
    "load_dml_models": "evaluate",
    "validate_dml": "evaluate",
}

__all__ = ["DEFAULT_CONFIG", "DMLError", "build_model", "compute_dml_loss", "create_dml_config", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
