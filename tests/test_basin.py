"""Linear-mode connectivity (sophon.basin) on cases with a known answer."""

import pytest
import torch
from torch import nn

from sophon.basin import barrier, distance, interpolate, linear_path


def scalar_model(w: float) -> nn.Module:
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(w)
    return model


def weights(w: float) -> dict:
    return {"weight": torch.full((1, 1), w)}


def loss_of(f):
    """The loss as a function of the scalar weight w (the model's output for input 1)."""
    return lambda forward: float(f(forward(torch.ones(1, 1)).squeeze()))


def test_double_well_has_a_barrier_of_one_between_its_minima():
    # loss(w) = (w² − 1)²: minima at w = ±1 (loss 0), a ridge of height 1 at w = 0, reached at α = 0.5.
    model = scalar_model(3.0)
    path = linear_path(model, weights(-1.0), weights(1.0), loss_of(lambda w: (w ** 2 - 1) ** 2), points=11)
    assert path["alphas"][5] == pytest.approx(0.5)
    assert path["losses"][0] == pytest.approx(0) and path["losses"][-1] == pytest.approx(0)
    assert path["barrier"] == pytest.approx(1.0)
    # Every point is the closed form at w = 2α − 1.
    for alpha, value in zip(path["alphas"], path["losses"]):
        assert value == pytest.approx(((2 * alpha - 1) ** 2 - 1) ** 2, abs=1e-6)
    assert model.weight.item() == 3.0  # the model's own weights are untouched


def test_a_convex_loss_is_never_above_its_chord():
    path = linear_path(scalar_model(0.0), weights(-1.0), weights(2.0), loss_of(lambda w: w ** 2), points=7)
    assert path["barrier"] == pytest.approx(0.0, abs=1e-6)  # the ends touch the chord; the rest lies below it
    assert all(v <= (1 - a) * 1.0 + a * 4.0 + 1e-6 for a, v in zip(path["alphas"], path["losses"]))


def test_barrier_is_the_largest_rise_above_the_chord():
    assert barrier([0.0, 0.5, 1.0], [1.0, 4.0, 3.0]) == pytest.approx(2.0)  # chord at 0.5 is 2


def test_interpolation_keeps_integer_buffers_and_distance_is_relative_to_the_second():
    first = {"w": torch.tensor([0.0, 0.0]), "steps": torch.tensor(5)}
    second = {"w": torch.tensor([3.0, 4.0]), "steps": torch.tensor(9)}
    mid = interpolate(first, second, 0.5)
    assert torch.equal(mid["w"], torch.tensor([1.5, 2.0])) and mid["steps"].item() == 5
    assert distance(first, second) == {"l2": pytest.approx(5.0), "relative": pytest.approx(1.0)}
    with pytest.raises(ValueError, match="different keys"):
        interpolate(first, {"w": second["w"]}, 0.5)


def test_the_report_sentence_gives_both_barriers_and_the_distance():
    from sophon.report.render import basin_sentence

    path = {"alphas": [0.0, 0.5, 1.0], "losses": [2.0, 3.5, 1.0], "barrier": 2.0}
    sentence = basin_sentence({"restricted": path, "original": {**path, "barrier": -0.25},
                               "distance": {"l2": 3.0, "relative": 0.125}})
    assert "restricted-domain loss 2 → 1, barrier 2 " in sentence and "barrier -0.25" in sentence
    assert "distance 0.125" in sentence and "3 points" in sentence
    assert "not measured" in basin_sentence(None)
