"""eval_metrics: pairwise accuracy with ties, symmetric ECE on calibrated / overconfident
synthetic preference data and against a loop reference, temperature scaling recovering a
known scale, explained variance, and input validation."""

import math

import pytest
import torch

from rlhf_engine.algos.eval_metrics import (
    expected_calibration_error,
    explained_variance,
    fit_temperature,
    pairwise_accuracy,
)


def synthetic_preferences(n, *, spread=2.0):
    """Pairs labelled by a Bradley-Terry model with true rewards ``r``: response a is chosen
    over b with probability σ(r_a − r_b). Returns (chosen, rejected) true rewards, so
    σ(r_c − r_r) is a perfectly calibrated win probability."""
    a = torch.randn(n, dtype=torch.float64) * spread
    b = torch.randn(n, dtype=torch.float64) * spread
    a_wins = torch.rand(n, dtype=torch.float64) < torch.sigmoid(a - b)
    return torch.where(a_wins, a, b), torch.where(a_wins, b, a)


def ece_reference(chosen, rejected, bins, temperature=1.0):
    preds, outcomes = [], []
    for c, r in zip(chosen.double().tolist(), rejected.double().tolist()):
        p = 1.0 / (1.0 + math.exp(-(c - r) / temperature))
        preds += [p, 1.0 - p]
        outcomes += [1.0, 0.0]
    total = 0.0
    for k in range(bins):
        members = [i for i, p in enumerate(preds) if min(int(p * bins), bins - 1) == k]
        if members:
            conf = sum(preds[i] for i in members) / len(members)
            acc = sum(outcomes[i] for i in members) / len(members)
            total += len(members) / len(preds) * abs(acc - conf)
    return total


def test_pairwise_accuracy_hand_cases():
    assert pairwise_accuracy(torch.tensor([2.0, 1.0, 0.0, 5.0]), torch.tensor([1.0, 1.0, 1.0, -5.0])) == 0.625
    assert pairwise_accuracy(torch.zeros(7), torch.zeros(7)) == 0.5
    assert pairwise_accuracy(torch.tensor([1.0], dtype=torch.bfloat16), torch.tensor([0.0], dtype=torch.bfloat16)) == 1.0


@pytest.mark.parametrize("bins", [1, 3, 10, 15])
def test_ece_matches_loop_reference(bins):
    chosen, rejected = torch.randn(300) * 2, torch.randn(300) * 2
    got = expected_calibration_error(chosen, rejected, bins=bins)
    assert got == pytest.approx(ece_reference(chosen, rejected, bins), abs=1e-12)
    got_t = expected_calibration_error(chosen, rejected, bins=bins, temperature=2.5)
    assert got_t == pytest.approx(ece_reference(chosen, rejected, bins, 2.5), abs=1e-12)


def test_ece_hand_case():
    # Every pair at p = σ(log 3) = 0.75 and every label "chosen": a model that says 0.75 for
    # outcomes that happen every time is off by 0.25 in both orientations.
    chosen = torch.full((4,), math.log(3.0))
    assert expected_calibration_error(chosen, torch.zeros(4)) == pytest.approx(0.25)
    # With one bin the two orientations average to ½ prediction and ½ outcome: ECE 0.
    assert expected_calibration_error(chosen, torch.zeros(4), bins=1) == pytest.approx(0.0)


def test_ece_calibrated_data_is_near_zero():
    chosen, rejected = synthetic_preferences(200_000)
    # Binomial noise over ~20 populated bins of ~20k predictions: well under 0.01.
    assert expected_calibration_error(chosen, rejected) < 0.01
    # The one-sided form (p against outcome 1 only) would call this data badly calibrated:
    # guard that the symmetric form is what is computed.
    one_sided = float((1.0 - torch.sigmoid(chosen - rejected)).mean())
    assert one_sided > 0.1


def test_ece_overconfident_data_is_large():
    chosen, rejected = synthetic_preferences(50_000)
    assert expected_calibration_error(chosen * 5, rejected * 5) > 0.1
    # And an underconfident model too.
    assert expected_calibration_error(chosen / 5, rejected / 5) > 0.1


def test_fit_temperature_recovers_the_scale():
    chosen, rejected = synthetic_preferences(100_000)
    scale = 3.0
    t = fit_temperature(chosen * scale, rejected * scale)
    assert t == pytest.approx(scale, rel=0.05)
    assert expected_calibration_error(chosen * scale, rejected * scale, temperature=t) < 0.01
    assert expected_calibration_error(chosen * scale, rejected * scale) > 0.1


def test_fit_temperature_is_the_nll_minimum():
    chosen, rejected = torch.randn(500) + 0.5, torch.randn(500)
    t = fit_temperature(chosen, rejected)
    d = (chosen - rejected).double()

    def nll(temp):
        return float(torch.nn.functional.softplus(-d / temp).mean())

    grid = torch.logspace(-2, 2, 4001, dtype=torch.float64).tolist()
    best = min(grid, key=nll)
    assert t == pytest.approx(best, rel=0.01)
    assert nll(t) <= nll(best) + 1e-12


def test_fit_temperature_separable_data_hits_the_bound():
    chosen, rejected = torch.rand(50) + 1.0, -torch.rand(50)
    assert fit_temperature(chosen, rejected, bounds=(0.01, 10.0)) == pytest.approx(0.01, rel=1e-6)
    assert fit_temperature(rejected, chosen, bounds=(0.01, 10.0)) == pytest.approx(10.0, rel=1e-6)


def test_explained_variance_hand_cases():
    returns = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert explained_variance(returns.clone(), returns) == pytest.approx(1.0)
    assert explained_variance(torch.full_like(returns, 2.5), returns) == pytest.approx(0.0)
    # values off by a constant explain everything that varies.
    assert explained_variance(returns + 7.0, returns) == pytest.approx(1.0)
    # Var[R − V] = Var[R − (−R)] = 4 Var[R]: 1 − 4 = −3.
    assert explained_variance(-returns, returns) == pytest.approx(-3.0)
    # Constant returns, or nothing masked in: undefined -> nan.
    assert math.isnan(explained_variance(torch.randn(5), torch.ones(5)))
    assert math.isnan(explained_variance(torch.randn(5), torch.randn(5), torch.zeros(5, dtype=torch.bool)))


@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
def test_explained_variance_matches_formula(mask_kind):
    B, T = 6, 17
    returns = torch.randn(B, T) * 3 + 10  # an offset: two-pass variance must not care
    values = returns + torch.randn(B, T)
    mask = {"none": None, "bool": torch.rand(B, T) > 0.3, "float": (torch.rand(B, T) > 0.3).float()}[mask_kind]
    # Garbage on padded tokens must not leak in.
    if mask is not None:
        values = torch.where(mask.bool(), values, torch.full_like(values, 1e6))
    keep = torch.ones(B, T, dtype=torch.bool) if mask is None else mask.bool()
    r, v = returns[keep].double().tolist(), values[keep].double().tolist()
    n = len(r)
    mean_r = sum(r) / n
    res = [a - b for a, b in zip(r, v)]
    mean_res = sum(res) / n
    expected = 1 - (sum((x - mean_res) ** 2 for x in res) / n) / (sum((x - mean_r) ** 2 for x in r) / n)
    assert explained_variance(values, returns, mask) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(
    "call,exc,words",
    [
        (lambda: pairwise_accuracy(torch.zeros(3), torch.zeros(2)), ValueError, "rejected_rewards"),
        (lambda: pairwise_accuracy(torch.zeros(0), torch.zeros(0)), ValueError, "chosen_rewards"),
        (lambda: pairwise_accuracy(torch.zeros(2, 2), torch.zeros(2, 2)), ValueError, "chosen_rewards"),
        (lambda: pairwise_accuracy(torch.zeros(2, dtype=torch.long), torch.zeros(2)), TypeError, "chosen_rewards"),
        (lambda: expected_calibration_error(torch.zeros(3), torch.zeros(3), bins=0), ValueError, "bins"),
        (lambda: expected_calibration_error(torch.zeros(3), torch.zeros(3), bins=2.0), ValueError, "bins"),
        (lambda: expected_calibration_error(torch.zeros(3), torch.zeros(3), temperature=0.0), ValueError, "temperature"),
        (lambda: fit_temperature(torch.zeros(3), torch.zeros(3), bounds=(1.0, 0.5)), ValueError, "bounds"),
        (lambda: fit_temperature(torch.zeros(3), torch.zeros(3), bounds=(0.0, 1.0)), ValueError, "bounds"),
        (lambda: fit_temperature(torch.zeros(3), torch.zeros(3), bounds=1.0), TypeError, "bounds"),
        (lambda: fit_temperature(torch.zeros(3), torch.zeros(3), iters=0), ValueError, "iters"),
        (lambda: explained_variance(torch.zeros(3), torch.zeros(4)), ValueError, "returns"),
        (lambda: explained_variance(torch.zeros(3), torch.zeros(3), torch.ones(4)), ValueError, "mask"),
        (lambda: explained_variance(torch.zeros(3, dtype=torch.long), torch.zeros(3)), TypeError, "values"),
    ],
)
def test_bad_input_names_the_argument(call, exc, words):
    with pytest.raises(exc, match=words):
        call()
