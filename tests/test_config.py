import pytest

from dml_dist import DEFAULT_CONFIG, DMLError, create_dml_config
from dml_dist.config import build_config, finalize_config, parse_overrides


def test_defaults_validate_and_names_are_canonical():
    cfg = create_dml_config(model="ResNet32", model_num=2, lr=0.1)
    assert cfg["model"] == "resnet32" and cfg["model_num"] == 2
    assert set(cfg) == set(DEFAULT_CONFIG)


@pytest.mark.parametrize("kwargs,match", [
    ({"lerning_rate": 0.1}, "unknown config key.*'lerning_rate'"),
    ({"epoch": 3}, "did you mean 'epochs'"),
    ({"batch_size": 0}, "batch_size must be >= 1"),
    ({"lr": -0.1}, "lr must be >= 0"),
    ({"epochs": "ten"}, "epochs must be an integer"),
    ({"augment": "yes"}, r"augment: unknown augmentation\(s\) \['yes'\]; choose from rrc, crop, flip, rotate, jitter"),
    ({"augment": ["crop", "blur"]}, r"unknown augmentation\(s\) \['blur'\]"),
    ({"temperature": 0}, "temperature must be > 0"),
    ({"val_fraction": 1.5}, "val_fraction must be < 1"),
    ({"dataset": "mnist"}, "dataset must be one of imagefolder|cifar10|cifar100"),
    ({"model": "resnet18"}, "unknown model 'resnet18'; choose one of"),
    ({"model": ["resnet20", "resnet32"], "model_num": 3}, "model lists 2 architectures"),
])
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
    from pathlib import Path
    for f in sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")):
        build_config(str(f))
