"""Importing a user's model as the original (original.checkpoint) and releasing models in timm's and diffusers'
own formats (sophon.models, sophon.diffusion behind sophon.tasks). Offline and fast: timm's test_resnet and a
tiny UNet."""

import json

import pytest
import torch
from safetensors.torch import save_file

from sophon.errors import ConfigError
from sophon.io import read_json, sha256_file
from sophon.tasks import get_task, load_model

EXP = "imp"
KEY = f"experiments.{EXP}.original.checkpoint"
TINY = {"block_out_channels": [8, 16], "layers_per_block": 1, "attention": False, "norm_num_groups": 4}


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # models/<experiment>/… are relative to the project folder


def classification(checkpoint, arch="test_resnet", num_classes=10, channels=3) -> dict:
    return {"name": EXP, "task": "classification", "model": {"arch": arch, "num_classes": num_classes},
            "data": {"channels": channels, "image_size": 28},
            "original": {"domain": "shapes10", "checkpoint": str(checkpoint)}, "restricted": {"domain": "mnist5k"},
            "pretrain": {}}


def diffusion(checkpoint, image_size=8, channels=1) -> dict:
    return {"name": EXP, "task": "diffusion", "unet": {"block_out_channels": [16, 32, 64]},
            "data": {"channels": channels, "image_size": image_size},
            "original": {"domain": "mnist5k", "checkpoint": str(checkpoint)}, "restricted": {"domain": "lfw_faces"},
            "pretrain": {}}


def timm_file(path, arch="test_resnet", num_classes=10, in_chans=3, seed=0):
    import timm

    torch.manual_seed(seed)
    net = timm.create_model(arch, num_classes=num_classes, in_chans=in_chans).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return net


def unet_folder(folder, config=TINY, size=8, channels=1, seed=0):
    from sophon.diffusion import build_unet

    torch.manual_seed(seed)
    unet = build_unet(config, size, channels).eval()
    unet.save_pretrained(str(folder), safe_serialization=True)
    return unet


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- classification ----------------------------------------------------------------------------------------

def test_timm_import_keeps_the_weights_and_the_card_names_the_source(tmp_path):
    path = tmp_path / "user" / "resnet.safetensors"
    net = timm_file(path)
    task, exp = get_task("classification"), classification(path)
    model, source = task.imported(exp)
    assert same_tensors(model.net.state_dict(), net.state_dict())
    assert source == {"kind": "timm-safetensors", "path": str(path), "sha256": sha256_file(path)}
    task.save(model, exp, "original", "pretrain", {"source": source})
    loaded, card = load_model(exp, "original")
    assert card["source"] == source
    x = torch.rand(4, 3, 28, 28)
    with torch.no_grad():  # the project's classifier normalises [0, 1] images itself (mean = std = 0.5)
        assert torch.allclose(loaded.eval()(x), net((x - 0.5) / 0.5), atol=1e-5)


@pytest.mark.parametrize("change, message", [
    ({"num_classes": 100}, f"{KEY}: .* has 100 classes \\(fc.weight\\), model.num_classes is 10$"),
    ({"arch": "resnet10t"}, f"{KEY}: .* is not a state dict of model.arch = test_resnet \\(missing "),
    ({"in_chans": 1}, f"{KEY}: .* holds conv1.0.weight of shape \\(16, 1, 3, 3\\); it takes 1 input channels, "
                      "data.channels is 3$"),
])
def test_timm_import_mismatch_is_a_one_line_config_error(tmp_path, change, message):
    path = tmp_path / "user.safetensors"
    timm_file(path, **change)
    with pytest.raises(ConfigError, match=message) as err:
        get_task("classification").imported(classification(path))
    assert "\n" not in str(err.value)


def test_timm_import_refuses_missing_and_pickled_files(tmp_path):
    with pytest.raises(ConfigError, match=f"{KEY}: .*missing.safetensors: file not found"):
        get_task("classification").imported(classification(tmp_path / "missing.safetensors"))
    (tmp_path / "model.pth").write_bytes(b"not read")
    with pytest.raises(ConfigError, match=f"{KEY}: .* is not a .safetensors file .*never pickles"):
        get_task("classification").imported(classification(tmp_path / "model.pth"))


def test_released_classifier_loads_in_timm_like_the_project_loader(tmp_path):
    import timm
    from timm.data import resolve_data_config

    task, exp = get_task("classification"), classification(tmp_path / "unused.safetensors")
    torch.manual_seed(1)
    model = task.build(exp)
    task.save(model, exp, "sophon", "sophon")
    task.release(model, exp, "sophon")
    ours, _ = load_model(exp, "sophon")
    folder = tmp_path / "models" / EXP / "sophon" / "release"
    config = read_json(folder / "config.json")
    assert config["architecture"] == "test_resnet" and config["num_classes"] == 10
    assert config["pretrained_cfg"]["mean"] == [0.5] * 3 and "license" not in config["pretrained_cfg"]
    by_folder = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    by_file = timm.create_model("test_resnet", pretrained=True, num_classes=10, pretrained_cfg_overlay=dict(
        file=str(folder / "model.safetensors"), num_classes=10)).eval()
    data = resolve_data_config({}, model=by_folder)
    assert data["mean"] == (0.5,) * 3 or list(data["mean"]) == [0.5] * 3
    x = torch.rand(4, 3, 28, 28)
    mean, std = torch.tensor(data["mean"]).view(1, 3, 1, 1), torch.tensor(data["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = ours.eval()(x)
        for released in (by_folder, by_file):
            assert torch.allclose(released((x - mean) / std), expected, atol=1e-5)
    # A released model imports as an original of another experiment, normalisation included.
    again, _ = task.imported(classification(folder / "model.safetensors"))
    assert same_tensors(again.net.state_dict(), ours.net.state_dict()) and again.normalization == ours.normalization


# --- diffusion ---------------------------------------------------------------------------------------------

def test_diffusers_import_keeps_the_weights_and_rebuilds_from_the_card(tmp_path):
    folder = tmp_path / "user-unet"
    unet = unet_folder(folder)  # not the experiment's `unet` section: the card keeps diffusers' own config
    task, exp = get_task("diffusion"), diffusion(folder)
    model, source = task.imported(exp)
    assert same_tensors(model.state_dict(), unet.state_dict())
    assert source == {"kind": "diffusers-folder", "path": str(folder),
                      "sha256": sha256_file(folder / "diffusion_pytorch_model.safetensors")}
    task.save(model, exp, "original", "pretrain", {"source": source})
    loaded, card = load_model(exp, "original")
    assert card["source"] == source and card["diffusers_config"]["block_out_channels"] == [8, 16]
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 500])
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x, t).sample, unet(x, t).sample)


@pytest.mark.parametrize("exp_change, message", [
    ({"image_size": 16}, f"{KEY}: .* has sample_size 8, data.image_size is 16$"),
    ({"channels": 3}, f"{KEY}: .* has in_channels 1, data.channels is 3$"),
])
def test_diffusers_import_mismatch_is_a_one_line_config_error(tmp_path, exp_change, message):
    unet_folder(tmp_path / "u")
    with pytest.raises(ConfigError, match=message):
        get_task("diffusion").imported(diffusion(tmp_path / "u", **exp_change))


def test_diffusers_import_needs_safetensors_weights_that_fit(tmp_path):
    unet_folder(tmp_path / "u")
    (tmp_path / "u" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ConfigError, match=f"{KEY}: .* holds no diffusion_pytorch_model.safetensors .*never pickles"):
        get_task("diffusion").imported(diffusion(tmp_path / "u"))
    unet_folder(tmp_path / "v")
    config = read_json(tmp_path / "v" / "config.json")
    (tmp_path / "v" / "config.json").write_text(json.dumps({**config, "layers_per_block": 2}))
    with pytest.raises(ConfigError, match=f"{KEY}: .*"):
        get_task("diffusion").imported(diffusion(tmp_path / "v"))


def test_released_unet_loads_with_from_pretrained(tmp_path):
    from diffusers import UNet2DModel

    folder = tmp_path / "user-unet"
    unet_folder(folder)
    task, exp = get_task("diffusion"), diffusion(folder)
    model, source = task.imported(exp)
    task.save(model, exp, "sophon", "sophon", {"source": source})
    task.release(model, exp, "sophon")
    release = tmp_path / "models" / EXP / "sophon" / "release"
    released = UNet2DModel.from_pretrained(str(release), use_safetensors=True).eval()
    ours, _ = load_model(exp, "sophon")
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 900])
    with torch.no_grad():
        assert torch.equal(released(x, t).sample, ours.eval()(x, t).sample)
    assert read_json(release / "sophon.json")["noise_schedule"]["num_train_timesteps"] == 1000
    assert not list(release.parent.glob(".release.*"))  # no temporary folder left behind


# --- the stages ----------------------------------------------------------------------------------------------

def test_pretrain_stage_imports_and_protect_releases(tmp_path):
    """`python -m stages.pretrain` with original.checkpoint set imports the file (no training), writes the card,
    the history and the release; protect releases the protected model and logs the release with its run; the
    Snakemake rule takes the checkpoint as an input. About 30 s."""
    import sqlite3

    import yaml

    from tests.pipeline_helpers import copy_project, run, snakemake_dry_run, tiny_params

    (tmp_path / "project").mkdir()
    root = copy_project(tmp_path / "project")
    params = tiny_params(root / "params.yaml")
    cls = "quick-classification"
    checkpoint = root / "user" / "model.safetensors"
    net = timm_file(checkpoint, seed=3)
    params["experiments"] = {cls: params["experiments"][cls]}
    params["experiments"][cls]["original"]["checkpoint"] = "user/model.safetensors"
    params["experiments"][cls]["sophon"].update(loops=1, check_every=1)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    jobs = {job["rule"]: job for job in snakemake_dry_run(root, "--forceall", "all")}
    assert "user/model.safetensors" in jobs["pretrain"]["input"]
    assert f"models/{cls}/original/release" in jobs["pretrain"]["output"]
    assert f"models/{cls}/sophon/release" in jobs["protect"]["output"]
    for stage in ("split", "pretrain", "protect"):
        run(["python", "-m", f"stages.{stage}", "--experiment", cls], root)
    card = read_json(root / "models" / cls / "original" / "model.json")
    assert card["source"] == {"kind": "timm-safetensors", "path": "user/model.safetensors",
                              "sha256": sha256_file(checkpoint)}
    history = read_json(root / "results" / cls / "training" / "original.json")
    assert history["imported"] is True and history["train_loss"] == [] and "original_test_accuracy" in history
    from safetensors.torch import load_file

    original = load_file(str(root / "models" / cls / "original" / "release" / "model.safetensors"))
    assert same_tensors(original, net.state_dict())
    assert (root / "models" / cls / "sophon" / "release" / "config.json").exists()
    with sqlite3.connect(root / "mlflow.db") as db:
        protect_runs = [row[0] for row in db.execute(
            "select run_uuid from tags where key = 'sophon.stage' and value = 'protect'")]
    artifacts = root / "mlartifacts"
    assert len(protect_runs) == 1 and list(artifacts.rglob(f"{protect_runs[0]}/artifacts/release/model.safetensors"))
    # A mismatch stops the stage with one line naming the key.
    params["experiments"][cls]["model"]["num_classes"] = 5
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    failed = run(["python", "-m", "stages.pretrain", "--experiment", cls], root, check=False)
    assert failed.returncode == 2
    assert failed.stderr.strip().splitlines()[-1] == (f"error: experiments.{cls}.original.checkpoint: user/model.safetensors "
                                                      "has 10 classes (fc.weight), model.num_classes is 5")


def test_snakemake_imports_another_experiments_release_after_making_it(tmp_path):
    """A checkpoint inside another experiment's release folder (a directory output): the pretrain job depends on
    that folder, so Snakemake makes it first (a file inside a directory output matches no rule)."""
    import copy

    import yaml

    from tests.pipeline_helpers import PROJECT, copy_project, snakemake_dry_run

    (tmp_path / "project").mkdir()
    root = copy_project(tmp_path / "project")
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    mine = copy.deepcopy(params["experiments"]["quick-classification"])
    mine["original"]["checkpoint"] = "models/quick-classification/original/release/model.safetensors"
    params["experiments"] = {"quick-classification": params["experiments"]["quick-classification"], "my-resnet": mine}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    jobs = snakemake_dry_run(root, "models/my-resnet/original/model.json")
    made = {job["output"][0]: job for job in jobs if job["rule"] == "pretrain"}
    assert "models/quick-classification/original/release" in made["models/my-resnet/original/model.safetensors"]["input"]
    assert "models/quick-classification/original/model.safetensors" in made
