import pytest

from dml_dist import DEFAULT_CONFIG, DMLError, create_dml_config
from dml_dist.config import build_config, parse_overrides
from dml_dist.world import finalize_config


def test_defaults_validate_and_names_are_canonical():
    cfg = create_dml_config(model="ResNet32", model_num=2, lr=0.1)
    assert cfg["model"] == "resnet32" and cfg["model_num"] == 2
    assert set(cfg) == set(DEFAULT_CONFIG)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"lerning_rate": 0.1}, "unknown config key.*'lerning_rate'"),
        ({"epoch": 3}, "did you mean 'epochs'"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"lr": -0.1}, "lr must be >= 0"),
        ({"epochs": "ten"}, "epochs must be an integer"),
        (
            {"augment": "yes"},
            r"augment: unknown augmentation\(s\) \['yes'\]; choose from rrc, crop, flip, rotate, jitter",
        ),
        ({"augment": ["crop", "blur"]}, r"unknown augmentation\(s\) \['blur'\]"),
        ({"temperature": 0}, "temperature must be > 0"),
        ({"val_fraction": 1.5}, "val_fraction must be < 1"),
        ({"dataset": "mnist"}, "dataset must be one of imagefolder|cifar10|cifar100"),
        ({"model": "resnet18"}, "unknown model 'resnet18'; choose one of"),
        ({"model": ["resnet20", "resnet32"], "model_num": 3}, "model lists 2 architectures"),
        (
            {"compile": "fast"},
            "compile must be false, true .* reduce-overhead .* max-autotune-no-cudagraphs, got 'fast'",
        ),
        ({"compile": 0}, "compile must be false, true .*, got 0"),  # not eager: torch.compile(mode=0) compiles
        ({"compile": 1}, "compile must be false, true .*, got 1"),
    ],
)
def test_bad_values_are_one_line_errors(kwargs, match):
    with pytest.raises(DMLError, match=match) as e:
        create_dml_config(**kwargs)
    assert "\n" not in str(e.value)


def test_precedence_cli_over_yaml_over_defaults(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("epochs: 7\nlr: 0.01\nmodel: resnet20\n")
    cfg = build_config(str(f), parse_overrides(["lr=0.5", "model=[resnet20,resnet44]", "experiment_name=x"]))
    assert cfg["epochs"] == 7 and cfg["lr"] == 0.5 and cfg["model"] == ["resnet20", "resnet44"]
    assert cfg["momentum"] == DEFAULT_CONFIG["momentum"]


def test_yaml_unknown_key_and_bad_override(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("epochs: 3\nlearning_rate: 0.1\n")
    with pytest.raises(DMLError, match=r"unknown config key\(s\): 'learning_rate' \(did you mean 'lr'\?\)") as e:
        build_config(str(f))
    assert "\n" not in str(e.value)
    with pytest.raises(DMLError, match="not found"):
        build_config("/nonexistent.yaml")
    with pytest.raises(DMLError, match="key=value"):
        parse_overrides(["epochs"])


def test_model_num_defaults_to_world_and_must_match():
    cfg = create_dml_config()
    assert finalize_config(cfg, 3)["model_num"] == 3
    assert finalize_config(cfg, 3)["experiment_name"] == "dml_resnet32_3peers"
    with pytest.raises(DMLError, match=r"model_num=2 but 3 process\(es\).*--nproc_per_node=2"):
        finalize_config(create_dml_config(model_num=2), 3)


def test_shipped_configs_validate():
    """Every file in configs/ builds, and what it sets is what the run gets (numbers and switches as written)."""
    from pathlib import Path

    import yaml

    files = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert {"quickstart.yaml", "imagenet_resnet18.yaml", "paper_cifar100_resnet32.yaml"} <= {f.name for f in files}
    for f in files:
        given, cfg = yaml.safe_load(f.read_text()) or {}, build_config(str(f))
        for k, v in given.items():
            if isinstance(v, (int, float, bool)) and isinstance(cfg[k], (int, float, bool)):
                assert cfg[k] == v, (f.name, k)


def test_timeout_comes_from_the_config_then_the_environment_then_600(monkeypatch):
    """README promise (issue 25): ``timeout: null`` -> ``$DML_DIST_TIMEOUT`` -> 600 s; a bad value is one
    line; the process groups wait a margin longer than the stall detection."""
    from datetime import timedelta

    from dml_dist.distributed import collective_timeout, stall_margin

    monkeypatch.delenv("DML_DIST_TIMEOUT", raising=False)
    assert collective_timeout({"timeout": None}) == timedelta(seconds=600)
    monkeypatch.setenv("DML_DIST_TIMEOUT", "45")
    assert collective_timeout({"timeout": None}) == timedelta(seconds=45)
    assert collective_timeout({"timeout": 20}) == timedelta(seconds=20)  # the config wins
    for bad in ("4", "ten", "-5"):
        monkeypatch.setenv("DML_DIST_TIMEOUT", bad)
        with pytest.raises(DMLError, match="DML_DIST_TIMEOUT=.* is not a whole number of seconds >= 5"):
            collective_timeout({"timeout": None})
    assert stall_margin(timedelta(seconds=20)) == timedelta(seconds=10)
    assert stall_margin(timedelta(seconds=600)) == timedelta(seconds=60)
    with pytest.raises(DMLError, match="timeout must be a whole number of seconds >= 5"):
        create_dml_config(timeout=3)


def test_the_cache_falls_back_to_the_user_cache_for_a_read_only_data_dir(tmp_path, monkeypatch):
    """README promise: <data_dir>/.dml-cache when writable, else $XDG_CACHE_HOME/dml-dist (a folder without
    write bits counts as read-only for root too)."""
    from dml_dist.data.cache import default_cache_dir

    data = tmp_path / "data"
    data.mkdir()
    assert default_cache_dir(str(data)) == str(data / ".dml-cache")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    data.chmod(0o555)
    try:
        assert default_cache_dir(str(data)) == str(tmp_path / "xdg" / "dml-dist")
    finally:
        data.chmod(0o755)


def test_make_imagenet_folder_writes_the_shape_it_promises(tmp_path):
    """benchmarks/make_imagenet_folder.py (README): train/ and val/ class folders of 400-600 x 300-450
    JPEGs, the same files for the same arguments."""
    import subprocess
    import sys

    from conftest import REPO
    from PIL import Image

    for out in ("a", "b"):
        subprocess.run(
            [
                sys.executable,
                str(REPO / "benchmarks" / "make_imagenet_folder.py"),
                str(tmp_path / out),
                "--train",
                "6",
                "--val",
                "2",
                "--classes",
                "2",
            ],
            check=True,
            capture_output=True,
        )
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.JPEG"))
    assert len(files) == 8 and {p.parts[0] for p in files} == {"train", "val"} and len({p.parts[1] for p in files}) == 2
    for p in files:
        with Image.open(tmp_path / "a" / p) as im:
            assert im.format == "JPEG" and 400 <= im.width <= 600 and 300 <= im.height <= 450
        assert (tmp_path / "a" / p).read_bytes() == (tmp_path / "b" / p).read_bytes()


def test_the_trainer_starts_without_importing_torchvision():
    """Importing torchvision (and the torch._dynamo it pulls in) costs every process seconds at start: the
    trainer imports it only where a transform needs it (a resize to another size, the per-sample reference)."""
    import subprocess
    import sys

    code = "import sys, dml_dist.train, dml_dist.api; sys.exit('torchvision' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
