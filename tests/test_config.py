"""params.yaml validation: defaults, and one-line errors that name the key, the value and what is allowed."""

from pathlib import Path

import pytest
import yaml

from sophon.config import load_params, validate_params
from sophon.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


CLS, GEN = "experiments.quick-classification", "experiments.quick-generation"


def base():
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def C(config):
    return config["experiments"]["quick-classification"]


def G(config):
    return config["experiments"]["quick-generation"]


def error_for(config) -> str:
    with pytest.raises(ConfigError) as err:
        validate_params(config)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_shipped_profiles_validate_and_fill_defaults():
    quick = load_params(ROOT / "params.yaml")
    assert C(quick)["attacks"]["direct_all"]["method"] == "finetune" and G(quick)["task"] == "diffusion"
    paper = load_params(ROOT / "configs" / "paper.yaml")["experiments"]["paper-classification"]
    assert paper["model"]["arch"] == "caformer_m36" and paper["original"]["domain"] == "imagenette"
    search = {"starts": ["sophon"], "space": {"strategies": ["direct+all"], "optimizers": ["sgd"],
                                              "lrs": {"sgd": {"low": 0.01, "high": 0.1}}, "batch_sizes": [64]}}
    minimal = validate_params({"experiments": {"x": {
        "task": "classification", "seeds": [0], "original": {"domain": "shapes10"}, "restricted": {"domain": "mnist5k"},
        "model": {"arch": "test_resnet"}, "attacks": {"a": {"strategy": "direct+all", "optimizer": "sgd", "lr": 0.1}},
        "search": search}}})["experiments"]["x"]
    assert minimal["sophon"]["suppression"] == "ice" and minimal["data"]["image_size"] == 28
    assert minimal["search"]["space"]["lrs"]["sgd"]["count"] == 5 and minimal["search"]["epochs"] == 50
    assert minimal["split"]["original_val_samples"] == 1000 and minimal["search"]["space"]["schedules"] == ["constant"]


@pytest.mark.parametrize("change, expected", [
    (lambda c: C(c)["attacks"]["direct_all"].update(optimizer="lbfgs"), f"key '{CLS}.attacks.direct_all.optimizer' = lbfgs: 'lbfgs' is not one of"),
    (lambda c: C(c)["sophon"].update(loops=0), f"key '{CLS}.sophon.loops' = 0: 0 is less than the minimum of 1"),
    (lambda c: C(c)["sophon"].update(suppression="mse"), f"key '{CLS}.sophon.suppression' = mse"),
    (lambda c: G(c)["sophon"].update(alpha=-1), f"key '{GEN}.sophon.alpha' = -1: -1 is less than the minimum of 0"),
    (lambda c: C(c)["seeds"].append(0), f"key '{CLS}.seeds'"),
    (lambda c: C(c)["sophon"].update(alhpa=3), f"'alhpa' was unexpected) under key '{CLS}.sophon'; allowed keys: alpha"),
    (lambda c: C(c)["restricted"].update(domain="cifar11"), f"key '{CLS}.restricted.domain' = cifar11: unknown domain; known: "),
    (lambda c: C(c)["model"].update(arch="resnet_nope"), f"key '{CLS}.model.arch' = resnet_nope: unknown model"),
    (lambda c: C(c).pop("attacks"), f"key '{CLS}': 'attacks' is a required property"),
    (lambda c: C(c).update(task="regression"), f"key '{CLS}.task' = regression"),
    (lambda c: C(c)["attacks"]["direct_all"].update(lr="fast"), f"key '{CLS}.attacks.direct_all.lr' = fast"),
    (lambda c: C(c)["search"]["space"]["strategies"].append("reinit0+all"),
     f"key '{CLS}.search.space.strategies' = reinit0+all: fine-tuning strategy 'reinit0+all' is not allowed"),
    (lambda c: G(c)["search"]["space"]["strategies"].append("initFC+all"),
     f"key '{GEN}.search.space.strategies' = initFC+all"),
    (lambda c: C(c)["search"]["space"]["optimizers"].append("sgd") or C(c)["search"]["space"]["lrs"].pop("sgd"),
     f"key '{CLS}.search.space.lrs' has no range for optimizer sgd"),
    (lambda c: C(c)["search"]["space"]["lrs"]["adam"].update(low=0.1, high=0.01), f"key '{CLS}.search.space.lrs.adam': low 0.1 is above high"),
    (lambda c: C(c)["search"]["space"]["lrs"]["adam"].update(count=0), f"key '{CLS}.search.space.lrs.adam.count' = 0"),
    (lambda c: C(c)["search"]["space"]["batch_sizes"].append(0), f"key '{CLS}.search.space.batch_sizes.4' = 0"),
    (lambda c: C(c)["search"].update(candidate_epochs=[1, 40]), f"key '{CLS}.search.candidate_epochs' = 40: beyond"),
    (lambda c: C(c)["search"].update(retest_seeds=[5, 2]), f"key '{CLS}.search.retest_seeds' = 2: also in"),
    (lambda c: G(c)["search"].update(retest_seeds=[-1]), f"key '{GEN}.search.retest_seeds.0' = -1"),
    (lambda c: C(c)["search"]["space"].update(preparations=["melt"]), f"key '{CLS}.search.space.preparations.0' = melt"),
    (lambda c: C(c)["redteam"]["attacks"]["reinit3_adam"].update(strategy="reinit+all"),
     f"key '{CLS}.redteam.attacks.reinit3_adam.strategy' = reinit+all"),
    (lambda c: G(c)["redteam"]["attacks"]["adam_small_batch_clipped"].update(label_smoothing=0.1),
     f"key '{GEN}.redteam.attacks.adam_small_batch_clipped': label_smoothing"),
    (lambda c: C(c)["redteam"].update(starts=["scratch"]), f"key '{CLS}.redteam.starts.0' = scratch"),
    (lambda c: C(c)["search"]["space"].update(schedules=["linear"]), f"key '{CLS}.search.space.schedules.0' = linear"),
    (lambda c: C(c)["search"].update(starts=["scratch"]), f"key '{CLS}.search.starts.0' = scratch"),
    (lambda c: G(c)["search"].update(starts=["ntl", "sophon"]), f"key '{GEN}.search.starts' = ntl"),
    (lambda c: C(c)["search"].update(trials=-1), f"key '{CLS}.search.trials' = -1"),
    (lambda c: C(c)["restricted"].update(adversary_samples=1), f"key '{CLS}.restricted.adversary_samples' = 1"),
    (lambda c: C(c)["original"].update(adversary_samples=100), f"key '{CLS}.original.adversary_samples'"),
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


def test_name_checks_are_stamped_per_content(tmp_path, monkeypatch):
    """The Snakefile's load: a file that passed the name checks under this code skips them next time; a changed
    file is checked again (and a bad name still fails)."""
    import sophon.config as config_module

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    path, stamps = tmp_path / "params.yaml", tmp_path / "checked"
    path.write_text(yaml.safe_dump(params))
    calls = []
    real = config_module._check_names
    monkeypatch.setattr(config_module, "_check_names", lambda config, source: (calls.append(source), real(config, source)))
    first = load_params(path, checked=stamps)
    assert load_params(path, checked=stamps) == first and len(calls) == 1 and len(list(stamps.iterdir())) == 1
    params["experiments"]["quick-classification"]["restricted"]["domain"] = "nope"
    path.write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError, match="restricted.domain' = nope: unknown domain"):
        load_params(path, checked=stamps)
    assert len(calls) == 2 and len(list(stamps.iterdir())) == 1  # no stamp for a file that failed


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    assert load_params(path)["experiments"]
