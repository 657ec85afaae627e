"""Configuration: defaults < YAML file < ``key=value`` overrides, validated where it is built.

Every key is listed in ``DEFAULT_CONFIG`` (docs/configuration.md has the table). Unknown keys, wrong types and
impossible values raise a DMLError that names the key and the fix.
"""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Iterable
from typing import Any

import yaml

from .data.augment import AUGMENTATIONS
from .data.memory import STATISTICS
from .errors import DMLError
from .models import canonical_model_name
from .trackers import check_installed

DEFAULT_LOCAL_PEERS = 2  # peers that dml-train / train_dml start without torchrun when nothing says otherwise

DEFAULT_CONFIG: dict[str, Any] = {
    # The original single-process module's keys keep its values (batch 32, no augmentation, ...); the DML
    # paper's schedule (batch 64, Nesterov, crop+flip) lives in configs/ and the README's commands.
    # model / cohort
    "model": "ResNet32",  # one name for every peer (case-insensitive), or a list, one per peer
    "model_num": 2,  # peers; when a config leaves it unset: the world size under torchrun, else 2
    "replicas": 1,  # data-parallel replicas per peer (DDP within a peer): world = model_num * replicas;
    # auto: world / model_num (an elastic job that lost a node goes on with fewer);
    # or a list, one count per peer (e.g. [1, 7]: the slow peer gets 7 GPUs), world = sum
    "sync_bn": False,  # replicas > 1: SyncBatchNorm within each peer's replicas (never across peers)
    "rank_order": "auto",  # replicas > 1: peer (a peer's replicas on consecutive ranks) | replica (the peers
    # of one replica index together: each node decodes only its rows) | auto
    "pretrained": False,  # torchvision.<name> / timm.<name> models: start from the library's weights
    "init_from": None,  # one per peer: a dml-dist peer checkpoint or a plain state_dict file, or null
    "frozen": None,  # one bool per peer: a frozen peer (a teacher) only predicts; needs init_from or pretrained
    "mutual_weights": None,  # one number > 0 per peer: how much its prediction counts in the others' mutual term
    "normalize": "cifar10",  # input statistics: cifar10 | imagenet | [[mean x3], [std x3]]; a peer started
    # from pretrained weights takes theirs
    # data
    "dataset": "imagefolder",  # imagefolder | cifar10 | cifar100
    "data_dir": "data",
    "image_size": 32,
    "val_fraction": 0.1,  # held out of train/ when there is no val/ folder (and for CIFAR)
    "train_subset": 0,  # > 0: train on a deterministic subset of this many training images (by seed)
    "augment": False,  # true (crop, flip, rotate, jitter) | false | a list of those and rrc
    "loader": "auto",  # image folders: memory (decoded set on the device) | stream (decode each batch) | auto
    "memory_budget_gb": None,  # auto's limit for the decoded set; None = a quarter of the GPU's (or host's) memory
    "cache_dir": None,  # the memory path's decoded-image cache; None = <data_dir>/.dml-cache, or
    # ~/.cache/dml-dist when data_dir is read-only
    "crop_fraction": 1.0,  # evaluation (and cached) images: shorter side to image_size / crop_fraction,
    # centre crop (ImageNet: 0.875); 1.0 on square files is a plain resize
    "rrc_scale": [0.08, 1.0],  # augment rrc (RandomResizedCrop): area range, torchvision's default
    "rrc_ratio": [0.75, 1.3333333333333333],  # and aspect-ratio range
    "decode_device": "cpu",  # stream path: cpu (TorchCodec in DataLoader workers) | cuda (batched nvJPEG)
    "cache_eval": True,  # stream path: val/test (a fixed transform) decoded once into the cache when they
    # fit memory_budget_gb, instead of at every evaluation
    "cache_keep_days": 14,  # entries superseded by a changed folder and unused this long are removed; 0 = keep
    "bad_images": "stop",  # a file that cannot be read: stop (one line naming it) | skip (a grey stand-in,
    # the file named once in the log and counted in the summary)
    "allow_data_change": False,  # resume on a folder whose file list changed since the checkpoint
    "batch_size": 32,  # per peer (split between its replicas)
    "num_workers": 4,  # DataLoader workers: the stream path's decoders per rank, and custom datasets
    "download": True,  # cifar10/cifar100 only: fetch when missing
    # optimisation (per peer: SGD + StepLR)
    "epochs": 200,
    "lr": 0.1,
    "momentum": 0.9,
    "nesterov": True,
    "weight_decay": 5e-4,
    "step_size": 60,
    "gamma": 0.1,
    # mutual learning
    "mutual": "dml",  # dml: mean KL to each other peer | ensemble: KL to the others' mean prediction
    "temperature": 1.0,
    "kl_weight": 1.0,  # 0 trains the peers independently (the baseline)
    "kl_warmup_epochs": 0,  # ramp the mutual term's weight from 0 to kl_weight over this many epochs
    "exchange": "auto",  # all_gather (every peer's logits) | all_reduce (their softmax sums: bytes
    # constant in N) | auto (all_reduce from 3 peers on; docs/benchmarks.md, "The exchange")
    # runtime
    "seed": 42,
    "device": "auto",  # auto | cpu | cuda
    "backend": "auto",  # auto | nccl | gloo
    "timeout": None,  # seconds a collective waits for the slowest rank; None = $DML_DIST_TIMEOUT or 600
    "amp": "auto",  # auto (bf16 on GPUs that support it, off on CPU) | bf16 | fp16 | off
    "channels_last": "auto",
    "compile": False,  # torch.compile each peer's model: false | true (default mode) | one of COMPILE_MODES
    "consistency_check_every": 100,  # steps between batch fingerprint checks (and the first step); 0 = off
    # logging and checkpoints
    "print_freq": 10,
    "progress_bar": True,
    "save_freq": 10,  # per-peer epoch_<e> checkpoints every save_freq epochs; 0 = none
    "save_every_steps": 0,  # also write <exp>_latest.pth every N steps (exact mid-epoch resume)
    "keep_last": 0,  # keep only the newest K epoch_<e> checkpoints per peer; 0 = keep all
    "save_dir": "checkpoints",
    "log_dir": "logs",
    "experiment_name": None,  # None = dml_<model>_<N>peers
    "resume": None,  # path | auto | None
    "loggers": ["tensorboard"],  # any of tensorboard, mlflow ($MLFLOW_TRACKING_URI), wandb ($WANDB_MODE)
}

_CHOICES = {
    "dataset": ("imagefolder", "cifar10", "cifar100"),
    "device": ("auto", "cpu", "cuda"),
    "backend": ("auto", "nccl", "gloo"),
    "amp": ("auto", "bf16", "fp16", "off"),
    "mutual": ("dml", "ensemble"),
    "exchange": ("auto", "all_gather", "all_reduce"),
    "loader": ("auto", "memory", "stream"),
    "decode_device": ("cpu", "cuda"),
    "rank_order": ("auto", "peer", "replica"),
    "bad_images": ("stop", "skip"),
}
_INT_MIN = {  # integer keys and their smallest allowed value
    "image_size": 8,
    "batch_size": 1,
    "num_workers": 0,
    "epochs": 1,
    "step_size": 1,
    "seed": 0,
    "consistency_check_every": 0,
    "print_freq": 1,
    "save_freq": 0,
    "save_every_steps": 0,
    "keep_last": 0,
    "train_subset": 0,
    "kl_warmup_epochs": 0,
}
_FLOAT_MIN = {  # float keys: (min, inclusive?)
    "lr": (0.0, True),
    "momentum": (0.0, True),
    "weight_decay": (0.0, True),
    "gamma": (0.0, False),
    "temperature": (0.0, False),
    "kl_weight": (0.0, True),
    "val_fraction": (0.0, False),
    "crop_fraction": (0.0, False),
    "cache_keep_days": (0.0, True),
}
# torch.compile's modes (``compile: true`` is "default"); parallel.compile_choice decides where CUDA graphs run
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_BOOL = ("nesterov", "progress_bar", "download", "sync_bn", "pretrained", "allow_data_change", "cache_eval")
_STR_OR_NONE = ("experiment_name", "resume", "cache_dir")


# Names other trainers use for our keys, so the error can point at the right one.
_ALIASES = {
    "learning_rate": "lr",
    "wd": "weight_decay",
    "num_epochs": "epochs",
    "arch": "model",
    "architecture": "model",
    "num_models": "model_num",
    "n_peers": "model_num",
    "peers": "model_num",
    "workers": "num_workers",
    "lr_step": "step_size",
    "milestones": "step_size",
    "T": "temperature",
    "checkpoint_dir": "save_dir",
    "output_dir": "save_dir",
    "name": "experiment_name",
}


def _suggest(key: str) -> str:
    close = [_ALIASES[key]] if key in _ALIASES else difflib.get_close_matches(key, DEFAULT_CONFIG, n=1)
    return f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(DEFAULT_CONFIG)}"


def validate_config(cfg: dict) -> dict:
    """Check every key; return a normalised copy (model names canonical, numbers typed)."""
    unknown = [k for k in cfg if k not in DEFAULT_CONFIG]
    if unknown:
        raise DMLError("unknown config key(s): " + "; ".join(f"{k!r} ({_suggest(k)})" for k in unknown))
    c = dict(cfg)
    c["augment"] = _augmentations(c["augment"])
    for k in _BOOL:
        if not isinstance(c[k], bool):
            raise DMLError(f"{k} must be true or false, got {c[k]!r}")
    for k, lo in _INT_MIN.items():
        if isinstance(c[k], bool) or not isinstance(c[k], int):
            raise DMLError(f"{k} must be an integer, got {c[k]!r}")
        if c[k] < lo:
            raise DMLError(f"{k} must be >= {lo}, got {c[k]}")
    c["replicas"] = _replicas(c["replicas"])
    _per_peer_keys(c)
    for k, (lo, inclusive) in _FLOAT_MIN.items():
        if isinstance(c[k], bool) or not isinstance(c[k], (int, float)):
            raise DMLError(f"{k} must be a number, got {c[k]!r}")
        c[k] = float(c[k])
        if not math.isfinite(c[k]):
            raise DMLError(f"{k} must be a finite number, got {c[k]}")
        if c[k] < lo or (c[k] == lo and not inclusive):
            raise DMLError(f"{k} must be {'>=' if inclusive else '>'} {lo}, got {c[k]}")
    if c["val_fraction"] >= 1:
        raise DMLError(f"val_fraction must be < 1, got {c['val_fraction']}")
    if c["crop_fraction"] > 1:
        raise DMLError(f"crop_fraction must be in (0, 1] (ImageNet's is 0.875), got {c['crop_fraction']}")
    if c["channels_last"] not in (True, False, "auto"):
        raise DMLError(
            f"channels_last must be true, false or auto (on for convolutional peers under AMP on "
            f"CUDA), got {c['channels_last']!r}"
        )
    if not isinstance(c["compile"], bool) and c["compile"] not in COMPILE_MODES:  # 0 and 1 are not booleans here
        raise DMLError(
            f"compile must be false, true (torch.compile's default mode), reduce-overhead (CUDA graphs), "
            f"max-autotune or max-autotune-no-cudagraphs, got {c['compile']!r}"
        )
    t = c["timeout"]
    if t is not None and (isinstance(t, bool) or not isinstance(t, int) or t < 5):
        raise DMLError(
            f"timeout must be a whole number of seconds >= 5 (or null for $DML_DIST_TIMEOUT / 600), got {t!r}"
        )
    mb = c["memory_budget_gb"]
    if mb is not None and (isinstance(mb, bool) or not isinstance(mb, (int, float)) or mb <= 0):
        raise DMLError(f"memory_budget_gb must be a number of GB > 0 (or null for automatic), got {mb!r}")
    for k, hi in (("rrc_scale", 1.0), ("rrc_ratio", None)):
        v = c[k]
        if not (
            isinstance(v, (list, tuple))
            and len(v) == 2
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
            and 0 < v[0] <= v[1]
            and (hi is None or v[1] <= hi)
        ):
            raise DMLError(f"{k} must be [low, high] with 0 < low <= high{' <= 1' if hi else ''}, got {v!r}")
        c[k] = [float(x) for x in v]
    for k, choices in _CHOICES.items():
        if c[k] not in choices:
            raise DMLError(f"{k} must be one of {'|'.join(choices)}, got {c[k]!r}")
    for k in _STR_OR_NONE + ("data_dir", "save_dir", "log_dir"):
        if c[k] is not None and not isinstance(c[k], str):
            raise DMLError(f"{k} must be a string, got {c[k]!r}")
    if c["model_num"] is not None and (
        isinstance(c["model_num"], bool) or not isinstance(c["model_num"], int) or c["model_num"] < 1
    ):
        raise DMLError(f"model_num must be a positive integer (or null for the world size), got {c['model_num']!r}")
    if isinstance(c["model"], (list, tuple)):
        if not c["model"]:
            raise DMLError("model is an empty list; give one model name, or one per peer")
        c["model"] = [canonical_model_name(m) for m in c["model"]]
        if c["model_num"] is not None and len(c["model"]) != c["model_num"]:
            raise DMLError(
                f"model lists {len(c['model'])} architectures but model_num={c['model_num']}; give one per peer"
            )
    elif isinstance(c["model"], str):
        names = [m.strip() for m in c["model"].split(",")]
        c["model"] = canonical_model_name(names[0]) if len(names) == 1 else [canonical_model_name(m) for m in names]
    else:
        raise DMLError(f"model must be a name or a list of names, got {c['model']!r}")
    return c


LOGGERS = ("tensorboard", "mlflow", "wandb")


def _number_list(v, length: int | None = None) -> bool:
    return (
        isinstance(v, (list, tuple))
        and (length is None or len(v) == length)
        and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v)
    )


def _per_peer_keys(c: dict) -> None:
    """``init_from``, ``frozen``, ``mutual_weights`` (one entry per peer or null), ``normalize``, ``loggers``."""
    v = c["init_from"]
    if v is not None and not (
        isinstance(v, (list, tuple)) and v and all(p is None or (isinstance(p, str) and p) for p in v)
    ):
        raise DMLError(f"init_from must be a list with one checkpoint path (or null) per peer, got {v!r}")
    v = c["frozen"]
    if v is not None and not (isinstance(v, (list, tuple)) and v and all(isinstance(x, bool) for x in v)):
        raise DMLError(f"frozen must be a list with one true/false per peer (true: a teacher), got {v!r}")
    if v is not None and all(v):
        raise DMLError(f"frozen={list(v)}: every peer is frozen, so nothing would train; leave one false")
    v = c["mutual_weights"]
    if v is not None and not (_number_list(v) and v and all(x > 0 for x in v)):
        raise DMLError(f"mutual_weights must be a list with one number > 0 per peer, got {v!r}")
    if v is not None:
        c["mutual_weights"] = [float(x) for x in v]
    for k in ("init_from", "frozen"):
        if c[k] is not None:
            c[k] = list(c[k])
    n = c["normalize"]
    if isinstance(n, str):
        if n.lower() not in STATISTICS:
            raise DMLError(
                f"normalize must be {', '.join(STATISTICS)} or [[mean, mean, mean], [std, std, std]], got {n!r}"
            )
        c["normalize"] = n.lower()
    elif not (
        isinstance(n, (list, tuple)) and len(n) == 2 and _number_list(n[0], 3) and _number_list(n[1], 3)
        and all(s > 0 for s in n[1])
    ):  # fmt: skip
        raise DMLError(
            f"normalize must be {', '.join(STATISTICS)} or [[mean, mean, mean], [std, std, std]] (std > 0), got {n!r}"
        )
    else:
        c["normalize"] = [[float(x) for x in n[0]], [float(x) for x in n[1]]]
    lg = c["loggers"]
    if isinstance(lg, str):
        lg = [x.strip() for x in lg.split(",") if x.strip()]
    if not isinstance(lg, (list, tuple)) or not all(isinstance(x, str) and x in LOGGERS for x in lg):
        raise DMLError(f"loggers must be a list of {', '.join(LOGGERS)} (or [] for none), got {c['loggers']!r}")
    c["loggers"] = list(dict.fromkeys(lg))
    check_installed(c["loggers"])


def _augmentations(value) -> list[str]:
    """``true`` -> the four batch augmentations, ``false`` -> none, a list (or ``"crop,flip"``) -> those, in
    canonical order (``rrc``, RandomResizedCrop while decoding, first)."""
    if value is True or value is False:
        return list(AUGMENTATIONS) if value else []
    names = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise DMLError(f"augment must be true, false or a list of {', '.join(AUGMENTATIONS)}; got {value!r}")
    known = ("rrc",) + AUGMENTATIONS
    unknown = [n for n in names if n.lower() not in known]
    if unknown:
        raise DMLError(
            f"augment: unknown augmentation(s) {unknown}; choose from {', '.join(known)} "
            f"(or true for crop, flip, rotate and jitter, false for none)"
        )
    return [a for a in known if a in {n.lower() for n in names}]


def parse_overrides(items: Iterable[str]) -> dict:
    """``['lr=0.05', 'model=[resnet20,resnet32]']`` -> dict, values parsed as YAML."""
    out = {}
    for item in items:
        if "=" not in item:
            raise DMLError(f"cannot parse {item!r}: overrides are key=value (e.g. epochs=5)")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = yaml.safe_load(v) if v != "" else None
        except yaml.YAMLError:
            out[k.strip()] = v
    return out


def parse_tool_keys(argv: Iterable[str], keys: dict, command: str) -> dict:
    """``key=value`` arguments of a tool with keys of its own (``dml-bench --data``, ``--exchange``): its
    defaults, overridden; a key it does not take is refused, naming those it does."""
    b = {**keys, **parse_overrides(argv)}
    unknown = set(b) - set(keys)
    if unknown:
        raise DMLError(f"unknown key(s) {sorted(unknown)}; {command} takes {', '.join(keys)}")
    return b


def load_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise DMLError(f"config file {path} not found; pass an existing file to --config")
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise DMLError(f"config file {path} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise DMLError(f"config file {path} must hold a mapping of key: value")
    return data


def build_config(config_file: str | None = None, overrides: dict | None = None, **kwargs) -> dict:
    """defaults < YAML file < overrides < kwargs, then validated. ``model_num`` stays None ("unset") when
    no layer sets it: ``finalize_config`` then takes the world size under torchrun (2 when this process
    starts the peers itself)."""
    cfg = {**DEFAULT_CONFIG, "model_num": None}
    for layer in (load_yaml(config_file) if config_file else {}, overrides or {}, kwargs):
        cfg.update(layer)
    return validate_config(cfg)


def _replicas(v):
    """An integer >= 1 (every peer), or a non-empty list of them (one per peer)."""

    def ok(x):
        return isinstance(x, int) and not isinstance(x, bool) and x >= 1

    if ok(v) or v == "auto":
        return v
    if isinstance(v, (list, tuple)) and v and all(ok(x) for x in v):
        return list(v)
    raise DMLError(
        f"replicas must be an integer >= 1, auto (the world size / model_num), or a list of integers, "
        f"one per peer (e.g. [1, 3]), got {v!r}"
    )


def create_dml_config(**kwargs) -> dict:
    """Defaults plus ``kwargs``, validated exactly as the CLI validates (notebook entry point)."""
    return build_config(overrides=kwargs)
