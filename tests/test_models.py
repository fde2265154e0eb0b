"""Model registry, head reset (initFC) and safetensors checkpoints with their cards."""

import json

import pytest
import torch

from sophon.errors import CheckpointError, UnknownNameError
from sophon.models import (build_classifier, count_parameters, head_parameter_names, load_classifier,
                           save_checkpoint)
from sophon.strategies import prepare

CARD = {"kind": "classifier", "architecture": "test_resnet", "num_classes": 10, "in_chans": 3,
        "normalization": {"mean": [0.5] * 3, "std": [0.5] * 3}}


def test_timm_and_paper_models_build():
    assert build_classifier("test_resnet", 10)(torch.rand(2, 3, 28, 28)).shape == (2, 10)
    vgg = build_classifier("paper_vgg", 10)
    assert vgg(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    assert 9.4e6 < count_parameters(vgg) < 9.8e6  # the paper quotes 9.6 M


def test_unknown_model_is_named():
    with pytest.raises(UnknownNameError, match="unknown model 'resnet_nope'"):
        build_classifier("resnet_nope", 10)


def test_reset_head_changes_only_the_head():
    torch.manual_seed(0)
    model = build_classifier("test_resnet", 10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    head = head_parameter_names(model)
    assert head == {"net.fc.weight", "net.fc.bias"}
    prepare(model, "initFC+all", seed=0)  # the paper's initFC (sophon.strategies)
    after = model.state_dict()
    for name in before:
        changed = not torch.equal(before[name], after[name])
        assert changed == (name in head), name


def test_checkpoint_round_trip(tmp_path):
    model = build_classifier("test_resnet", 10)
    save_checkpoint(model, tmp_path / "m", CARD)
    loaded, card = load_classifier(tmp_path / "m")
    assert card["architecture"] == "test_resnet" and len(card["weights_sha256"]) == 64
    # what decides the rounding beyond the seeds, so a user can tell why two machines train different weights
    assert card["compute"] == {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    x = torch.rand(3, 3, 28, 28)
    model.eval(), loaded.eval()
    assert torch.equal(model(x), loaded(x))
    assert not list(tmp_path.glob("m/.*tmp"))  # no temporary files left behind


def test_corrupted_checkpoint_is_a_one_line_error(tmp_path):
    save_checkpoint(build_classifier("test_resnet", 10), tmp_path / "m", CARD)
    weights = tmp_path / "m" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted") as err:
        load_classifier(tmp_path / "m")
    assert "\n" not in str(err.value)


def test_truncated_weights_without_hash_and_bad_cards(tmp_path):
    save_checkpoint(build_classifier("test_resnet", 10), tmp_path / "m", CARD)
    card_path = tmp_path / "m" / "model.json"
    card = json.loads(card_path.read_text())
    card.pop("weights_sha256")
    card_path.write_text(json.dumps(card))
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_classifier(tmp_path / "m")
    card_path.write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_classifier(tmp_path / "m")
    with pytest.raises(CheckpointError, match="card missing"):
        load_classifier(tmp_path / "nothing")


def test_card_that_does_not_fit_the_weights(tmp_path):
    save_checkpoint(build_classifier("test_resnet", 10), tmp_path / "m", CARD)
    card_path = tmp_path / "m" / "model.json"
    card = json.loads(card_path.read_text())
    card["num_classes"] = 7
    card_path.write_text(json.dumps(card))
    with pytest.raises(CheckpointError, match="does not fit"):
        load_classifier(tmp_path / "m")


def test_checkpoint_files_keep_the_umask_permissions(tmp_path):
    import os

    from sophon.io import write_json

    old = os.umask(0o022)
    try:
        save_checkpoint(build_classifier("test_resnet", 10, 3), tmp_path / "m", {"kind": "classifier"})
        write_json(tmp_path / "r.json", {"a": 1})
    finally:
        os.umask(old)
    for path in (tmp_path / "m" / "model.safetensors", tmp_path / "m" / "model.json", tmp_path / "r.json"):
        assert path.stat().st_mode & 0o777 == 0o644, path
    assert not list(tmp_path.rglob("*.tmp"))
