"""Fine-tuning strategies: each one re-initialises and trains exactly the parameters it claims."""

import pytest
import torch
from torch import nn

from sophon.diffusion import QUICK_UNET, build_unet
from sophon.errors import ConfigError
from sophon.models import Classifier, build_classifier
from sophon.strategies import (check_strategy, get_stage, model_stages, prepare, recalibrate_batchnorm, shrink_perturb,
                               shrinkable)

HEAD = ["net.fc.weight", "net.fc.bias"]


def trained(model: nn.Module) -> nn.Module:
    """Move every parameter off its init value (BN's weight starts at 1, as after a reset), so a reset shows."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def classifier() -> Classifier:
    torch.manual_seed(0)
    model = trained(build_classifier("test_resnet", 10, 3))
    with torch.no_grad():  # BN running stats off their defaults too
        model.train()(torch.rand(4, 3, 32, 32))
    return model


def unet():
    torch.manual_seed(0)
    return trained(build_unet(QUICK_UNET, 16, 1))


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def names_under(model: nn.Module, *prefixes: str) -> list[str]:
    return [n for n, _ in model.named_parameters() if n.startswith(prefixes)]


def check_reinitialised(before: dict, model: nn.Module, expected: list[str]) -> None:
    """Exactly `expected` parameters changed; every other parameter, and the buffers of modules that were not
    reset, are bit-identical."""
    after = model.state_dict()
    reset_modules = {name.rsplit(".", 1)[0] for name in expected}
    for name, value in before.items():
        if name in expected:
            assert not torch.equal(value, after[name]), name
        elif name.rsplit(".", 1)[0] not in reset_modules:
            assert torch.equal(value, after[name]), name


def assert_trainable(prepared, expected: list[str]) -> None:
    named = dict(prepared.model.named_parameters())
    assert [id(p) for p in prepared.trainable] == [id(named[n]) for n in expected]
    assert sorted(n for n, p in named.items() if p.requires_grad) == sorted(expected)


def test_direct_all_changes_nothing_and_trains_everything():
    model = classifier()
    before = snapshot(model)
    prepared = prepare(model, "direct+all", seed=0)
    assert prepared.model is model and prepared.reinitialised == [] and prepared.merged() is model
    assert_trainable(prepared, [n for n, _ in model.named_parameters()])
    check_reinitialised(before, model, [])


@pytest.mark.parametrize("strategy", ["initFC+all", "initFC+FC"])
def test_init_fc_resets_the_head_in_place(strategy):
    model = classifier()
    before, all_names = snapshot(model), [n for n, _ in model.named_parameters()]
    prepared = prepare(model, strategy, seed=1)
    assert prepared.reinitialised == HEAD
    check_reinitialised(before, model, HEAD)
    assert_trainable(prepared, all_names if strategy.endswith("all") else HEAD)
    assert [n for n, _ in model.named_parameters()] == all_names  # the head was reset, not replaced


@pytest.mark.parametrize("k, stages", [(1, ("net.layer4.",)), (2, ("net.layer3.", "net.layer4."))])
def test_reinit_k_resets_the_last_k_stages_and_the_head(k, stages):
    model = classifier()
    before = snapshot(model)
    prepared = prepare(model, f"reinit{k}+all", seed=2)
    expected = names_under(model, *stages) + HEAD
    assert prepared.reinitialised == expected and len(expected) == {1: 11, 2: 23}[k]
    check_reinitialised(before, model, expected)
    assert_trainable(prepared, [n for n, _ in model.named_parameters()])
    bn = model.net.layer4[0].bn1
    assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean)) and int(bn.num_batches_tracked) == 0
    assert not torch.equal(model.net.layer2[0].bn1.running_mean, torch.zeros_like(model.net.layer2[0].bn1.running_mean))


def test_same_seed_same_values_other_seed_other_values():
    def values(seed):
        prepared = prepare(classifier(), "reinit2+all", seed=seed)
        params = dict(prepared.model.named_parameters())
        return [params[n].detach() for n in prepared.reinitialised]

    a, b, c = values(5), values(5), values(6)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not any(torch.equal(x, z) for x, z in zip(a, c) if x.std() > 0)


def test_stages_per_family():
    assert model_stages(classifier()) == ["net.layer1", "net.layer2", "net.layer3", "net.layer4"]
    with torch.device("meta"):  # 9.6 M parameters: structure only, no values needed (and no init time)
        vgg = build_classifier("paper_vgg", 10, 3)
    stages = model_stages(vgg)
    assert len(stages) == 5 and stages[-1] == "net.features.0[28:34]"
    last = get_stage(vgg, stages[-1])
    assert [type(m).__name__ for m in last] == ["Conv2d", "BatchNorm2d", "ReLU"] * 2
    prepared = prepare(vgg, "reinit1+all", seed=0)
    assert prepared.reinitialised == names_under(vgg, *(f"net.features.0.{i}." for i in range(28, 34))) + HEAD
    assert model_stages(unet()) == ["down_blocks.0", "down_blocks.1", "down_blocks.2", "mid_block",
                                    "up_blocks.0", "up_blocks.1", "up_blocks.2"]


def test_stages_need_feature_info_or_a_known_family():
    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def get_classifier(self):
            return self.fc

    model = Classifier(Plain(), {"mean": [0.5] * 3, "std": [0.5] * 3})
    with pytest.raises(ConfigError, match="Plain"):
        prepare(model, "reinit1+all", seed=0)
    with pytest.raises(ConfigError, match="only 4 stages"):
        prepare(classifier(), "reinit5+all", seed=0)


def test_reinit_up_resets_the_last_up_block():
    model = unet()
    before = snapshot(model)
    prepared = prepare(model, "reinit_up+all", seed=0)
    expected = names_under(model, f"up_blocks.{len(model.up_blocks) - 1}.")
    assert prepared.reinitialised == expected and len(expected) == 24
    check_reinitialised(before, model, expected)
    assert_trainable(prepared, [n for n, _ in model.named_parameters()])


def lora_case(task):
    if task == "classification":
        return classifier(), (torch.rand(4, 3, 32, 32),), lambda out: out
    return unet(), (torch.randn(4, 1, 16, 16), torch.tensor([1, 10, 100, 999])), lambda out: out.sample


@pytest.mark.parametrize("task", ["classification", "diffusion"])
def test_lora_trains_only_adapters_and_merges_to_the_same_function(task):
    model, inputs, output = lora_case(task)
    model.eval()
    adapted_layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    original_keys = list(model.state_dict())
    with torch.no_grad():
        reference = output(model(*inputs))
    prepared = prepare(model, "lora", seed=0, lora_rank=2)
    assert prepared.model is model and prepared.reinitialised == []
    expected = [f"{layer}.lora_{ab}.default.weight" for layer in adapted_layers for ab in "AB"]
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == sorted(expected)
    assert len(prepared.trainable) == 2 * len(adapted_layers) == len(expected)
    with torch.no_grad():
        assert torch.allclose(output(model(*inputs)), reference, atol=1e-6)  # lora_B starts at zero

    optimizer = torch.optim.SGD(prepared.trainable, lr=0.5)
    output(model(*inputs)).square().mean().backward()
    optimizer.step()
    with torch.no_grad():
        adapted = output(model(*inputs))
        merged = prepared.merged()
        assert list(merged.state_dict()) == original_keys  # a plain module: loadable as an ordinary checkpoint
        assert not any("lora" in type(m).__module__ for m in merged.modules())
        assert torch.allclose(output(merged(*inputs)), adapted, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(adapted, reference, atol=1e-4)  # the step did change the function


@pytest.mark.parametrize("strategy, task", [
    ("reinit0+all", "classification"), ("initFC+all", "diffusion"), ("foo", "classification"),
    ("reinit1+all", "diffusion"), ("reinit_up+all", "classification"), ("lora+all", "diffusion"),
])
def test_bad_names_are_config_errors_naming_the_strategy(strategy, task):
    with pytest.raises(ConfigError) as info:
        check_strategy(strategy, task)
    message = str(info.value)
    assert repr(strategy) in message and "direct+all" in message and "\n" not in message


def test_prepare_rejects_a_strategy_of_the_other_task():
    with pytest.raises(ConfigError, match="initFC\\+FC"):
        prepare(unet(), "initFC+FC", seed=0)


@pytest.mark.parametrize("strategy, task", [
    ("direct+all", "classification"), ("initFC+all", "classification"), ("initFC+FC", "classification"),
    ("reinit1+all", "classification"), ("reinit12+all", "classification"), ("lora", "classification"),
    ("direct+all", "diffusion"), ("reinit_up+all", "diffusion"), ("lora", "diffusion"),
])
def test_good_names_pass(strategy, task):
    check_strategy(strategy, task)


# --- preparations: shrink-and-perturb, BatchNorm recalibration ---------------------------------------------

def fresh_values(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """What shrink_perturb calls θ_fresh: a copy with every submodule reset under the seed."""
    import copy
    import warnings

    from sophon.strategies import _reinitialise

    copy_ = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _reinitialise(copy_, [copy_], seed)
    return {k: v.detach().clone() for k, v in copy_.named_parameters()}


def test_shrink_perturb_mixes_trained_weights_with_a_seeded_fresh_init():
    model = classifier()
    prepared = prepare(model, "initFC+all", seed=1)
    names = shrinkable(prepared)
    assert names == [n for n, _ in model.named_parameters() if n not in HEAD]  # trained, not just re-initialised
    before, fresh = snapshot(model), fresh_values(model, seed=7)
    changed = shrink_perturb(model, names, 0.4, 0.1, seed=7)
    assert changed == names
    after = model.state_dict()
    for name, value in before.items():
        if name in names:
            assert torch.equal(after[name], value.mul(0.4).add(fresh[name], alpha=0.1)), name
        else:  # the fresh head and every buffer (BN running stats) untouched
            assert torch.equal(after[name], value), name

    def run(seed):
        again = prepare(classifier(), "initFC+all", seed=1)
        shrink_perturb(again.model, shrinkable(again), 0.4, 0.1, seed=seed)
        return again.model.state_dict()

    a, b, c = run(7), run(7), run(8)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(a[k], after[k]) for k in a)
    assert not torch.equal(a["net.layer1.0.conv1.weight"], c["net.layer1.0.conv1.weight"])


def test_shrink_perturb_applies_to_what_the_strategy_trains_only():
    frozen_backbone = prepare(classifier(), "initFC+FC", seed=0)
    assert shrinkable(frozen_backbone) == []  # only the fresh head trains
    reinit = prepare(classifier(), "reinit1+all", seed=0)
    assert shrinkable(reinit) == [n for n, _ in reinit.model.named_parameters() if n not in reinit.reinitialised]
    lora = prepare(classifier(), "lora", seed=0, lora_rank=2)
    assert shrinkable(lora) == []  # adapters are new, the base is frozen
    model = classifier()
    before = snapshot(model)
    assert shrink_perturb(model, [n for n, _ in model.named_parameters()], 1.0, 0.0, seed=0) == []  # off
    check_reinitialised(before, model, [])


def test_recalibrate_batchnorm_sets_the_running_statistics_of_the_data():
    from sophon.data import ImageSet

    torch.manual_seed(0)
    images = torch.randint(0, 256, (40, 3, 6, 6), dtype=torch.uint8)
    data = ImageSet(images, torch.zeros(40, dtype=torch.int64), ("a",))
    model = nn.Sequential(nn.Dropout(0.5), nn.BatchNorm2d(3, momentum=0.3))
    with torch.no_grad():
        model.train()(torch.rand(8, 3, 6, 6) * 5)  # stale statistics
    model.eval()
    assert recalibrate_batchnorm(model, data, batch_size=10) == 1
    x = images.float() / 255
    batches = x.split(10)
    expected_mean = torch.stack([b.mean((0, 2, 3)) for b in batches]).mean(0)
    expected_var = torch.stack([b.var((0, 2, 3), unbiased=True) for b in batches]).mean(0)
    bn = model[1]
    assert torch.allclose(bn.running_mean, x.mean((0, 2, 3)), atol=1e-6)  # equal batches: the data's mean
    assert torch.allclose(bn.running_mean, expected_mean, atol=1e-6)
    assert torch.allclose(bn.running_var, expected_var, atol=1e-6)
    assert int(bn.num_batches_tracked) == 4 and bn.momentum == 0.3  # momentum restored
    assert not model.training and not bn.training  # modes restored


def test_recalibrate_batchnorm_is_a_no_op_without_batchnorm():
    model = unet()
    before = snapshot(model)
    data = type("Data", (), {"images": torch.zeros(4, 1, 16, 16, dtype=torch.uint8)})()
    assert recalibrate_batchnorm(model, data, batch_size=2) == 0
    check_reinitialised(before, model, [])
