"""params.yaml validation: defaults, and one-line errors that name the key, the value and what is allowed."""

from pathlib import Path

import pytest
import yaml

from sophon.config import load_params, validate_params
from sophon.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def base():
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def error_for(config) -> str:
    with pytest.raises(ConfigError) as err:
        validate_params(config)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_shipped_profiles_validate_and_fill_defaults():
    quick = load_params(ROOT / "params.yaml")
    assert quick["attacks"]["direct_all"]["method"] == "finetune"
    paper = load_params(ROOT / "profiles" / "paper" / "params.yaml")
    assert paper["model"]["arch"] == "caformer_m36" and paper["original"]["domain"] == "imagenette"
    minimal = validate_params({"experiment": "x", "seeds": [0], "original": {"domain": "shapes10"},
                               "restricted": {"domain": "mnist5k"}, "model": {"arch": "test_resnet"},
                               "attacks": {"a": {"strategy": "direct+all", "optimizer": "sgd", "lr": 0.1}},
                               "search": {"starts": ["sophon"], "space": {
                                   "strategies": ["direct+all"], "optimizers": ["sgd"],
                                   "lrs": {"sgd": {"low": 0.01, "high": 0.1}}, "batch_sizes": [64]}}})
    assert minimal["sophon"]["suppression"] == "ice" and minimal["data"]["image_size"] == 28
    assert minimal["search"]["space"]["lrs"]["sgd"]["count"] == 3 and minimal["search"]["epochs"] == 50
    assert minimal["generation"]["search"]["space"]["optimizers"] == ["adam", "adamw", "momentum"]


@pytest.mark.parametrize("change, expected", [
    (lambda c: c["attacks"]["direct_all"].update(optimizer="lbfgs"), "key 'attacks.direct_all.optimizer' = lbfgs: 'lbfgs' is not one of"),
    (lambda c: c["sophon"].update(loops=0), "key 'sophon.loops' = 0: 0 is less than the minimum of 1"),
    (lambda c: c["sophon"].update(suppression="mse"), "key 'sophon.suppression' = mse"),
    (lambda c: c["seeds"].append(0), "key 'seeds'"),
    (lambda c: c["sophon"].update(alhpa=3), "'alhpa' was unexpected) under key 'sophon'; allowed keys: alpha"),
    (lambda c: c["restricted"].update(domain="cifar11"), "key 'restricted.domain' = cifar11: unknown domain; known: "),
    (lambda c: c["model"].update(arch="resnet_nope"), "key 'model.arch' = resnet_nope: unknown model"),
    (lambda c: c.pop("attacks"), "'attacks' is a required property"),
    (lambda c: c["attacks"]["direct_all"].update(lr="fast"), "key 'attacks.direct_all.lr' = fast"),
    (lambda c: c["search"]["space"]["strategies"].append("reinit0+all"),
     "key 'search.space.strategies' = reinit0+all: fine-tuning strategy 'reinit0+all' is not allowed"),
    (lambda c: c["generation"]["search"]["space"]["strategies"].append("initFC+all"),
     "key 'generation.search.space.strategies' = initFC+all"),
    (lambda c: c["search"]["space"]["optimizers"].append("sgd") or c["search"]["space"]["lrs"].pop("sgd"),
     "key 'search.space.lrs' has no range for optimizer sgd"),
    (lambda c: c["search"]["space"]["lrs"]["adam"].update(low=0.1, high=0.01), "key 'search.space.lrs.adam': low 0.1 is above high"),
    (lambda c: c["search"]["space"]["lrs"]["adam"].update(count=0), "key 'search.space.lrs.adam.count' = 0"),
    (lambda c: c["search"]["space"]["batch_sizes"].append(0), "key 'search.space.batch_sizes.2' = 0"),
    (lambda c: c["search"]["space"].update(schedules=["linear"]), "key 'search.space.schedules.0' = linear"),
    (lambda c: c["search"].update(starts=["scratch"]), "key 'search.starts.0' = scratch"),
    (lambda c: c["generation"]["search"].update(starts=["ntl", "sophon"]), "key 'generation.search.starts' = ntl"),
    (lambda c: c["search"].update(trials=-1), "key 'search.trials' = -1"),
])
def test_bad_values_name_the_key(change, expected):
    config = base()
    change(config)
    assert expected in error_for(config)


def test_malformed_yaml_names_the_line(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("experiment: x\nseeds: [0, 1\n")
    with pytest.raises(ConfigError, match=r"not valid YAML at line \d+"):
        load_params(bad)
    with pytest.raises(ConfigError, match="file not found"):
        load_params(tmp_path / "missing.yaml")
    bad.write_text("- just a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_params(bad)
