"""The attacker's envelope and the numbers stated about it, on hand-made curves (no training)."""

from __future__ import annotations

import math

import pytest

from sophon.envelope import (CONSTANT_ANSWER, EnvelopeInputError, advantage, best_so_far, cost_ratio, covers,
                             default_target, envelope, head_start, holds, removed, retest, score, slice_table,
                             steps_to_reach, with_constant_answer)


def _env(mean, std=None):
    return {"mean": list(mean), "std": list(std if std is not None else [0.0] * len(mean)), "config": ["c"] * len(mean)}


# --- score ------------------------------------------------------------------------------------------------------

def test_score_is_mean_over_epochs_1_to_E_oriented():
    assert score([100.0, 10.0, 20.0, 30.0], True) == pytest.approx(20.0)
    assert score([0.0, 1.0, 0.5, 0.3], False) == pytest.approx(-0.6)
    with pytest.raises(EnvelopeInputError):
        score([5.0], True)


# --- envelope ---------------------------------------------------------------------------------------------------

def test_envelope_accuracy_switches_config_mid_way():
    runs = {
        "fast": [[10, 50, 55, 56], [10, 54, 57, 58]],   # means 10, 52, 56, 57
        "slow": [[10, 20, 60, 80], [10, 30, 70, 90]],   # means 10, 25, 65, 85
    }
    env = envelope(runs, True)
    assert env["config"] == ["fast", "fast", "slow", "slow"]  # epoch 0 tie -> first in dict order
    assert env["mean"] == pytest.approx([10, 52, 65, 85])
    assert env["std"] == pytest.approx([0, 2, 5, 5])  # population std over the chosen config's seeds


def test_envelope_mse_picks_lowest_and_single_seed_std_is_zero():
    runs = {
        "a": [[1.0, 0.5, 0.40, 0.35]],
        "b": [[1.0, 0.7, 0.30, 0.20]],
        "c": [[2.0, 0.6, 0.50, 0.10]],
    }
    env = envelope(runs, False)
    assert env["config"] == ["a", "a", "b", "c"]
    assert env["mean"] == pytest.approx([1.0, 0.5, 0.3, 0.1])
    assert env["std"] == [0.0, 0.0, 0.0, 0.0]
    # the same numbers read as accuracy pick the other extreme
    assert envelope(runs, True)["config"] == ["c", "b", "c", "a"]


def test_best_so_far_keeps_the_best_checkpoint_in_both_directions():
    assert best_so_far([10, 50, 40, 60, 55], True) == [10, 50, 50, 60, 60]
    assert best_so_far([1.0, 0.5, 0.7, 0.3], False) == [1.0, 0.5, 0.5, 0.3]
    nan = best_so_far([float("nan"), 0.9, float("nan"), 0.95], True)
    assert math.isnan(nan[0]) and nan[1:] == [0.9, 0.9, 0.95]


def test_envelope_keep_best_evens_out_a_dip_before_choosing():
    # "dips" is best at epoch 2 by its last checkpoint only if its dip is ignored: keep_best holds its epoch-1 peak.
    runs = {"dips": [[10, 90, 60, 91], [10, 80, 70, 89]],   # best so far: means 10, 85, 85, 90
            "steady": [[10, 70, 80, 85], [10, 70, 80, 85]]}
    last = envelope(runs, True)
    assert last["config"] == ["dips", "dips", "steady", "dips"] and last["mean"] == pytest.approx([10, 85, 80, 90])
    kept = envelope(runs, True, keep_best=True)
    assert kept["config"] == ["dips"] * 4 and kept["mean"] == pytest.approx([10, 85, 85, 90])
    assert kept["std"] == pytest.approx([0, 5, 5, 1])  # seeds hold 90 and 80 at epoch 2, then 91 and 89


def test_envelope_keep_best_is_a_budget_a_short_horizon_holds_its_best_beyond_it():
    # "short" was confirmed for 2 epochs and holds 90; "long" reaches only 85 by epoch 4. With a budget of 3 or 4
    # epochs the attacker may stop after 2: the envelope keeps 90 there and never falls.
    runs = {"long": [[10, 40, 60, 70, 85], [10, 40, 60, 70, 85]], "short": [[10, 50, 92], [10, 60, 88]]}
    kept = envelope(runs, True, keep_best=True)
    assert kept["config"] == ["long", "short", "short", "short", "short"]
    assert kept["mean"] == pytest.approx([10, 55, 90, 90, 90]) and kept["std"] == pytest.approx([0, 5, 2, 2, 2])
    # Read by last checkpoint only the configurations that ran that long compete.
    assert envelope(runs, True)["config"][3:] == ["long", "long"]


def test_retest_keeps_each_epochs_pick_and_reads_it_at_the_other_seeds():
    # On the picking seeds "lucky" wins epochs 1-2 by a hair (50 against 48); at other seeds it reaches 30 and
    # 40, and "steady" is not read at all where it was not picked. A short horizon holds its final best beyond it.
    runs = {"steady": [[10, 48, 60, 70], [10, 48, 60, 70]], "lucky": [[10, 50, 52], [10, 50, 52]]}
    chosen = envelope(runs, True, keep_best=True)
    assert chosen["config"] == ["steady", "lucky", "steady", "steady"]
    again = {"steady": [[10, 45, 58, 66], [10, 47, 62, 60]], "lucky": [[10, 30, 20], [10, 40, 44]]}
    out = retest(chosen, again, True)
    assert out["config"] == chosen["config"]
    # epoch 1: lucky's 30 and 40; epoch 2: steady's 58 and 62; epoch 3: steady's best so far, 66 and 62.
    assert out["mean"] == pytest.approx([10, 35, 60, 64]) and out["std"] == pytest.approx([0, 5, 2, 2])
    # Beyond a pick's horizon its final best is kept; lower is better for MSE.
    late = retest({"config": ["lucky"] * 5}, again, True)
    assert late["mean"] == pytest.approx([10, 35, 37, 37, 37])  # best so far: 30, 30 and 40, 44
    assert retest({"config": ["a", "a"]}, {"a": [[0.9, 0.5], [0.7, 0.8]]}, False)["mean"] == pytest.approx([0.8, 0.6])
    with pytest.raises(EnvelopeInputError, match="lucky"):
        retest(chosen, {"steady": again["steady"]}, True)


def test_envelope_never_prefers_nan_and_rejects_ragged_seeds():
    env = envelope({"diverged": [[1.0, float("nan"), float("nan")]], "ok": [[1.0, 0.9, 0.8]]}, False)
    assert env["config"] == ["diverged", "ok", "ok"]
    with pytest.raises(EnvelopeInputError):
        envelope({"a": [[1, 2, 3], [1, 2]]}, True)  # one configuration's seeds must agree
    with pytest.raises(EnvelopeInputError):
        envelope({}, True)


def test_a_configuration_of_a_shorter_horizon_speaks_only_for_its_epochs():
    env = envelope({"long": [[0, 10, 20, 30, 40]], "short": [[0, 50, 60], [0, 30, 60]]}, True)
    assert env["config"] == ["long", "short", "short", "long", "long"]
    assert env["mean"] == [0, 40, 60, 30, 40] and env["std"] == [0, 10, 0, 0, 0]


def test_head_start_and_the_share_removed():
    original, scratch, sophon = _env([10, 60, 90, 95]), _env([10, 30, 70, 94]), _env([10, 35, 90, 94])
    for e in (original, scratch, sophon):
        e["std"] = [0.0, 2.0, 2.0, 2.0]
    head = head_start(original, scratch, True)
    assert head["per_epoch"] == pytest.approx([0, 30, 20, 1]) and head["value"] == pytest.approx(30)
    assert head["epoch"] == 1 and head["beyond_spread"] == [1, 2] and head["something_to_protect"]
    assert removed(original, scratch, sophon, True) == pytest.approx([None, 25 / 30, 0.0, None])
    # MSE: lower is better for the attacker; the same orientation.
    mse = head_start(_env([1.0, 0.2]), _env([1.0, 0.6]), False)
    assert mse["per_epoch"] == pytest.approx([0.0, 0.4]) and mse["something_to_protect"]
    assert removed(_env([1.0, 0.2]), _env([1.0, 0.6]), _env([1.0, 0.7]), False) == pytest.approx([None, 1.25])
    within = head_start(_env([10, 31], std=[0, 2]), _env([10, 30], std=[0, 2]), True)
    assert not within["something_to_protect"] and within["beyond_spread"] == []  # 1 point < the spread of 2.8


def test_covers_compares_an_attack_with_the_envelope_within_the_spread():
    env = {"mean": [10.0, 50.0, 80.0, 90.0], "std": [0.0, 1.0, 1.0, 1.0]}
    inside = covers(env, [[10, 49, 80], [10, 51, 81]], True)  # shorter attack: judged on its epochs
    assert inside["covered"] and inside["violations"] == [] and len(inside["excess"]) == 3
    above = covers(env, [[10, 70, 70], [10, 72, 75]], True)
    assert not above["covered"] and above["violations"] == [1] and above["max_excess"] == pytest.approx(21)
    assert above["mean"] == pytest.approx([10, 71, 72.5])  # best checkpoint so far, then the seed mean


# --- advantage --------------------------------------------------------------------------------------------------

def test_advantage_accuracy_is_sophon_minus_scratch():
    adv = advantage(_env([10, 30, 60, 60]), _env([10, 40, 50, 55]), True)
    assert adv["per_epoch"] == pytest.approx([0, -10, 10, 5])
    assert adv["value"] == pytest.approx(10) and adv["epoch"] == 2


def test_advantage_mse_is_scratch_minus_sophon_first_epoch_on_ties():
    adv = advantage(_env([1.0, 0.5, 0.2, 0.3]), _env([1.0, 0.6, 0.4, 0.5]), False)
    assert adv["per_epoch"] == pytest.approx([0.0, 0.1, 0.2, 0.2])
    assert adv["value"] == pytest.approx(0.2) and adv["epoch"] == 2


def test_advantage_negative_when_sophon_hurts_attacker():
    adv = advantage(_env([10, 10, 11]), _env([10, 40, 50]), True)
    assert adv["value"] == 0 and adv["epoch"] == 0
    assert max(adv["per_epoch"][1:]) < 0


# --- holds ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("higher_is_better", [True, False])
def test_holds_at_the_spread_boundary(higher_is_better):
    sign = 1.0 if higher_is_better else -1.0
    scratch = _env([10.0, 20.0, 30.0], [0.0, 4.0, 4.0])
    sophon_std = [0.0, 3.0, 3.0]  # spread sqrt(3^2 + 4^2) = 5 at epochs 1, 2
    at_boundary = _env([10.0, 20.0 + sign * 5.0, 30.0 - sign * 7.0], sophon_std)
    result = holds(at_boundary, scratch, higher_is_better)
    assert result["holds"] is True and result["violations"] == []
    assert isinstance(result["rule"], str) and "spread" in result["rule"]

    beyond = _env([10.0, 20.0 + sign * 5.5, 30.0 + sign * 5.0], sophon_std)
    result = holds(beyond, scratch, higher_is_better)
    assert result["holds"] is False and result["violations"] == [1]
    # a wider k tolerates it
    assert holds(beyond, scratch, higher_is_better, k=1.2)["holds"] is True


def test_holds_zero_spread_any_positive_gain_violates():
    result = holds(_env([10.0, 20.0, 21.0]), _env([10.0, 20.0, 20.0]), True)
    assert result == {"holds": False, "violations": [2], "rule": result["rule"]}


# --- steps_to_reach / cost_ratio ----------------------------------------------------------------------------------

def test_steps_to_reach_both_directions():
    assert steps_to_reach([10, 30, 60, 80], 100, 60, True) == 200
    assert steps_to_reach([10, 30, 60, 80], 100, 90, True) is None
    assert steps_to_reach([10, 30, 60, 80], 100, 5, True) == 0
    assert steps_to_reach([1.0, 0.5, 0.2], 7, 0.5, False) == 7
    assert steps_to_reach([1.0, 0.5, 0.2], 7, 0.1, False) is None
    assert steps_to_reach([float("nan"), 0.5], 7, 0.6, False) == 7


def test_cost_ratio_min_over_configs_and_none_cases():
    scratch = [([10, 50, 80, 90], 100), ([10, 40, 70, 75], 50)]      # reach 80 at 200 and None -> 200
    sophon = [([10, 10, 20, 80], 100), ([10, 10, 10, 85], 300)]       # reach 80 at 300 and 900 -> 300
    assert cost_ratio(sophon, scratch, 80, True) == pytest.approx(1.5)
    assert cost_ratio([([10, 10, 10, 10], 100)], scratch, 80, True) is None   # Sophon never reaches it
    assert cost_ratio(sophon, [([10, 10, 10, 10], 100)], 80, True) is None    # scratch never reaches it
    # target met by scratch at step 0: ratio undefined unless Sophon also meets it at step 0
    assert cost_ratio(sophon, [([90, 90], 10)], 80, True) is None
    assert cost_ratio([([85, 90], 10)], [([90, 90], 10)], 80, True) == 1.0
    # MSE
    assert cost_ratio([([1.0, 0.8, 0.4], 10)], [([1.0, 0.4, 0.2], 10)], 0.5, False) == pytest.approx(2.0)


def test_default_target():
    assert default_target(_env([10, 50, 80, 70]), True) == pytest.approx(72.0)
    assert default_target(_env([1.0, 0.5, 0.18, 0.2]), False) == pytest.approx(0.2)
    assert default_target(_env([10, float("nan"), 60]), True, fraction=0.5) == pytest.approx(30.0)
    with pytest.raises(EnvelopeInputError):
        default_target(_env([1.0]), True, fraction=0.0)


# --- slice_table ------------------------------------------------------------------------------------------------

def _record(start, optimizer, lr, curve):
    return {"start": start, "name": f"{optimizer}-lr{lr}", "config": {"optimizer": optimizer, "lr": lr, "batch_size": 64},
            "curve": curve}


def test_slice_table_on_a_planted_table():
    records = [
        _record("scratch", "sgd", 0.1, [10, 20, 30]),    # score 25
        _record("scratch", "sgd", 0.01, [10, 40, 50]),   # score 45  <- best sgd
        _record("scratch", "adam", 0.1, [10, 15, 15]),   # score 15
        _record("scratch", "adam", 0.01, [10, 30, 40]),  # score 35  <- best adam, best lr 0.01 is sgd
        _record("sophon", "sgd", 0.1, [10, 10, 12]),     # score 11
        _record("sophon", "sgd", 0.01, [10, 10, 10]),    # score 10
        _record("sophon", "adam", 0.1, [10, 60, 80]),    # score 70  <- the planted break
        _record("sophon", "adam", 0.01, [10, 11, 11]),   # score 11
    ]
    by_opt = slice_table(records, "optimizer", True)
    assert list(by_opt) == ["scratch", "sophon"]
    assert list(by_opt["scratch"]) == ["adam", "sgd"]
    assert by_opt["scratch"]["sgd"] == {"score": pytest.approx(45), "config": "sgd-lr0.01"}
    assert by_opt["scratch"]["adam"] == {"score": pytest.approx(35), "config": "adam-lr0.01"}
    assert by_opt["sophon"]["adam"] == {"score": pytest.approx(70), "config": "adam-lr0.1"}
    assert by_opt["sophon"]["sgd"]["config"] == "sgd-lr0.1"

    by_lr = slice_table(records, "lr", True)
    assert list(by_lr["scratch"]) == [0.01, 0.1]
    assert by_lr["scratch"][0.01]["config"] == "sgd-lr0.01"
    assert by_lr["scratch"][0.1]["config"] == "sgd-lr0.1"
    assert by_lr["sophon"][0.1] == {"score": pytest.approx(70), "config": "adam-lr0.1"}

    assert slice_table(records, "batch_size", True)["sophon"] == {64: {"score": pytest.approx(70), "config": "adam-lr0.1"}}
    with pytest.raises(EnvelopeInputError):
        slice_table(records, "schedule", True)


def test_slice_table_mse_prefers_lowest():
    records = [_record("sophon", "sgd", 0.1, [1.0, 0.9, 0.9]), _record("sophon", "sgd", 0.01, [1.0, 0.3, 0.1])]
    table = slice_table(records, "optimizer", False)
    assert table["sophon"]["sgd"] == {"score": pytest.approx(-0.2), "config": "sgd-lr0.01"}


# --- figure -----------------------------------------------------------------------------------------------------

def test_envelopes_figure_writes_png(tmp_path):
    from sophon.report.figures import envelopes

    doc = {"starts": {
        "scratch": envelope({"a": [[10, 40, 60], [10, 44, 62]]}, True),
        "original": envelope({"a": [[12, 70, 80]]}, True),
        "ntl": envelope({"a": [[10, 30, 50]]}, True),
        "sophon": envelope({"a": [[10, 11, float("nan")]], "b": [[10, 12, 13]]}, True),
    }, "chance_level": 11.0}
    path = tmp_path / "figs" / "envelope.png"
    envelopes(doc, path, ylabel="restricted-domain accuracy (%)", title="attacker envelope")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert not math.isnan(doc["starts"]["sophon"]["mean"][2])


def test_the_constant_answer_replaces_only_the_epochs_it_beats():
    chosen = {"mean": [9.0, 12.0, 11.5, float("nan")], "std": [1.0, 2.0, 0.5, 0.0], "config": ["a", "b", "b", "b"],
              "best": "b"}
    out = with_constant_answer(chosen, 11.5, True)
    assert out["mean"] == [11.5, 12.0, 11.5, 11.5] and out["std"] == [0.0, 2.0, 0.5, 0.0]
    assert out["config"] == [CONSTANT_ANSWER, "b", "b", CONSTANT_ANSWER] and out["best"] == "b"  # a tie keeps the pick
    assert chosen["mean"][0] == 9.0 and chosen["config"][0] == "a"  # the input is not changed
    mse = with_constant_answer({"mean": [1.2, 0.9], "std": [0.1, 0.1], "config": ["a", "a"]}, 1.0, False)
    assert mse["mean"] == [1.0, 0.9] and mse["config"] == [CONSTANT_ANSWER, "a"]
