"""The ablation stage's verdict of one variant: the search's envelope, and with the red-team suite the attacks it
does not cover and the share of the head start removed against the worst case."""

from __future__ import annotations

from pathlib import Path

import pytest

from sophon.config import experiment, load_params
from sophon import layout
from sophon.errors import ConfigError
from sophon.io import write_json
from stages.ablation import judged, plain_cell, redteam_cell, rejudged, retestable, worst_case, worst_cell
from tests.test_report import SEARCH, SEEDS, _search_doc

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def exp():
    e = experiment(load_params(ROOT / "params.yaml"), "quick-classification")
    e["search"].update(epochs=3, seeds=SEEDS)
    return e


def test_worst_case_takes_the_attackers_best_at_each_epoch():
    envelope = {"mean": [10.0, 20.0, 30.0], "std": [1.0, 1.0, 1.0]}
    assert worst_case(envelope, [[5.0, 25.0, 28.0], [9.0, 19.0]], True) == {"mean": [10.0, 25.0, 30.0],
                                                                          "std": [1.0, 1.0, 1.0]}
    assert worst_case(envelope, [[5.0, 25.0, 28.0]], False)["mean"] == [5.0, 20.0, 28.0]  # MSE: lower is the attacker's


def test_a_variant_is_judged_against_the_red_team_too(exp):
    # Envelopes (seed mean of base and base + 2): scratch 11/51/61/71, original 11/71/81/86, Sophon 11/21/31/41.
    docs = {start: _search_doc(start, SEARCH[start]) for start in ("scratch", "original", "sophon")}
    alone = judged(exp, docs["sophon"], docs["scratch"], docs["original"])
    assert "redteam" not in alone and alone["holds"]
    assert alone["removed_at"]["1"] == pytest.approx((71 - 21) / 20)
    # A red-team attack at 61/71/76 (seed means): above Sophon's envelope and above scratch's.
    strong = {"strong": {"settings": {}, "held_out": True, "seeds": SEEDS,
                         "curves": [[10, 60, 70, 75], [10, 62, 72, 77]]}}
    weak = {"weak": {"settings": {}, "held_out": False, "seeds": SEEDS, "curves": [[10, 12, 13, 14]] * 2}}
    with_red = judged(exp, docs["sophon"], docs["scratch"], docs["original"], {**strong, **weak})
    assert with_red["redteam"] == {"attacks": 2, "uncovered": ["strong"], "above_scratch": ["strong"]}
    assert with_red["holds"] == alone["holds"] and with_red["removed_at"] == alone["removed_at"]  # the search's verdict
    # Against the worst case the share removed is (original − attack) / (original − scratch).
    assert [with_red["worst_removed_at"][str(k)] for k in (1, 2, 3)] == pytest.approx([10 / 20, 10 / 20, 10 / 15])
    assert redteam_cell(with_red["redteam"]) == "strong / strong (of 2)"
    assert worst_cell(with_red["worst_removed_at"]) == "50% / 50% / 67% / – / –"
    covered = judged(exp, docs["sophon"], docs["scratch"], docs["original"], weak)
    assert covered["redteam"]["uncovered"] == [] and redteam_cell(covered["redteam"]) == "none / none (of 1)"
    assert covered["worst_removed_at"] == {k: v for k, v in alone["removed_at"].items()}


def test_a_variant_is_judged_at_the_retest_seeds_too(exp):
    # Sophon's pick retests at 61/71/81 (seed means) where it was picked at 21/31/41: beyond scratch's 51/61/71.
    again = {**SEARCH, "sophon": [10, 60, 70, 80]}
    docs = {}
    for start in ("scratch", "original", "sophon"):
        docs[start] = _search_doc(start, SEARCH[start])
        docs[start]["retest"] = {"seeds": [3, 4], "runs": {"cfg-a": [[v + k * 2 for v in again[start]]
                                                                     for k in (0, 1)]}}
    result = judged(exp, docs["sophon"], docs["scratch"], docs["original"])
    assert result["holds"] and result["retest"]["holds"] is False and result["retest"]["violations"] == [1, 2, 3]
    assert "without_constant_answer" not in result["retest"]
    # With a chance level of 65 % the constant answer lifts every start to it: at epoch 1 (Sophon at 61, scratch at 51)
    # both answer it, so only epochs 2 and 3 (71, 81 against 65, 71) fail; without it epoch 1 fails too, at chance.
    at = judged(exp, docs["sophon"], docs["scratch"], docs["original"], chance=65.0)
    assert at["retest"]["holds"] is False and at["retest"]["violations"] == [2, 3]
    assert at["retest"]["without_constant_answer"] == {"holds": False, "violations": [1, 2, 3], "at_chance": [1],
                                                       "max_gain": pytest.approx(10.0)}
    assert at["holds"] and at["without_constant_answer"]["holds"] and at["without_constant_answer"]["at_chance"] == []
    assert plain_cell(at["retest"]) == "" and plain_cell(at) == ""
    assert plain_cell({"holds": True, **{k: v for k, v in at["retest"].items() if k != "holds"}}) == (
        " (without the constant answer: no, epochs 1, 2, 3)")
    assert result["retest"]["seeds"] == [3, 4] and result["retest"]["gain_at"]["1"] == pytest.approx(10.0)
    assert result["retest"]["removed_at"]["1"] == pytest.approx((71 - 61) / 20)
    # A red-team attack at 41/51/61 (seed means) beats Sophon's picking envelope (21/31/41) but not its retest
    # (61/71/81), nor scratch's (51/61/71): judged, as the report judges it, at the held-out seeds, it is covered.
    between = {"between": {"settings": {}, "held_out": True, "seeds": SEEDS,
                           "curves": [[10, 40, 50, 60], [10, 42, 52, 62]]}}
    red = judged(exp, docs["sophon"], docs["scratch"], docs["original"], between)["redteam"]
    assert red == {"attacks": 1, "uncovered": [], "above_scratch": []}
    without_retest = {start: {k: v for k, v in doc.items() if k != "retest"} for start, doc in docs.items()}
    picked = judged(exp, without_retest["sophon"], without_retest["scratch"], without_retest["original"], between)
    assert picked["redteam"]["uncovered"] == ["between"]  # against the picking seeds' envelope it is not covered


def _retested(docs: dict, start: str, seeds: list[int], sophon_again: list[float]) -> dict:
    again = {**SEARCH, "sophon": sophon_again}
    return {**docs[start], "retest": {"seeds": seeds, "runs": {"cfg-a": [[v + k * 2 for v in again[start]]
                                                                         for k in (0, 1)]}}}


def test_retest_judges_a_variant_again_and_keeps_its_protect_run(exp):
    docs = {start: _search_doc(start, SEARCH[start]) for start in ("scratch", "original", "sophon")}
    first = {s: _retested(docs, s, [3, 4], [10, 60, 70, 80]) for s in docs}  # fails at the first retest seeds
    red = {"weak": {"settings": {}, "held_out": False, "seeds": SEEDS, "curves": [[10, 12, 13, 14]] * 2}}
    row = {"variant": "v", "changes": {"alpha": 3.0}, "protect_seconds": 12.0, "intactness": {"protected": 90.0},
           "search": first["sophon"], "redteam_attacks": red,
           **judged(exp, first["sophon"], first["scratch"], first["original"], red)}
    assert row["retest"]["holds"] is False and row["retest"]["seeds"] == [3, 4]
    again = {s: _retested(docs, s, [5, 6], [10, 20, 30, 40]) for s in docs}  # Sophon's pick retests as picked
    new = rejudged(exp, row, again["sophon"], again["scratch"], again["original"], None)
    assert new["retest"]["holds"] is True and new["retest"]["seeds"] == [5, 6] and new["search"] is again["sophon"]
    assert {k: new[k] for k in ("variant", "changes", "protect_seconds", "intactness", "redteam_attacks")} == {
        k: row[k] for k in ("variant", "changes", "protect_seconds", "intactness", "redteam_attacks")}
    assert new["redteam"] == {"attacks": 1, "uncovered": [], "above_scratch": []}  # the attacks it met, judged again
    assert new == {**new, **judged(exp, again["sophon"], again["scratch"], again["original"], red)}
    # Against a pipeline still at the old seeds the starts' seeds differ, and the verdict says so (no common seeds).
    mixed = rejudged(exp, row, again["sophon"], first["scratch"], first["original"], None)
    assert mixed["retest"]["seeds"] is None


def test_retest_refuses_a_variant_that_has_not_run_or_has_changed(exp, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exp = {**exp, "ablation": {**exp["ablation"], "variants": {"v": {"alpha": 3.0}}}}
    with pytest.raises(ConfigError, match="'nope' is not in quick-classification.ablation.variants"):
        retestable(exp, "nope")
    with pytest.raises(ConfigError, match="variants.v has not run"):
        retestable(exp, "v")
    unseeded = {**exp, "search": {**exp["search"], "retest_seeds": []}}
    with pytest.raises(ConfigError, match="key 'quick-classification.search.retest_seeds' is empty"):
        retestable(unseeded, "v")
    write_json(layout.ablation_result(exp["name"], "v"), {"variant": "v", "changes": {"alpha": 3.0}})
    assert retestable(exp, "v")["changes"] == {"alpha": 3.0}
    changed = {**exp, "ablation": {**exp["ablation"], "variants": {"v": {"alpha": 5.0}}}}
    with pytest.raises(ConfigError, match="key 'quick-classification.ablation.variants.v' changed"):
        retestable(changed, "v")
