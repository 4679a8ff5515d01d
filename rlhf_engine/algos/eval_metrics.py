"""Evaluation metrics for reward models and critics: held-out pairwise accuracy,
expected calibration error, temperature scaling, and a value function's explained variance.

These run at evaluation time and return Python floats (so they read the device once, on
purpose). Everything is computed in float64 whatever the input dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from rlhf_engine._checks import MASK_DTYPES, check_number, check_same_device, check_same_shape, check_tensor


def _pair_margins(op: str, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Validate ``[B]`` chosen / rejected rewards (B >= 1) and return ``r_c − r_r`` in float64."""
    check_tensor(op, "chosen_rewards", chosen_rewards)
    check_tensor(op, "rejected_rewards", rejected_rewards)
    if chosen_rewards.dim() != 1 or chosen_rewards.numel() == 0:
        raise ValueError(f"{op}: chosen_rewards must be 1-D [B] with B >= 1, got shape {tuple(chosen_rewards.shape)}")
    check_same_shape(op, "chosen_rewards", chosen_rewards, rejected_rewards=rejected_rewards)
    check_same_device(op, "chosen_rewards", chosen_rewards, rejected_rewards=rejected_rewards)
    return chosen_rewards.detach().double() - rejected_rewards.detach().double()


def pairwise_accuracy(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> float:
    """Fraction of pairs the reward model orders like the labels: ``mean[1(r_c > r_r) + ½·1(r_c = r_r)]``.

    A tie counts half (a model that scores everything the same reads 0.5, chance level).

    Args:
        chosen_rewards, rejected_rewards: ``[B]`` float, ``B >= 1``.

    Returns:
        float in ``[0, 1]``.
    """
    d = _pair_margins("pairwise_accuracy", chosen_rewards, rejected_rewards)
    return float(((d > 0).double() + 0.5 * (d == 0).double()).mean())


def expected_calibration_error(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    *,
    bins: int = 10,
    temperature: float = 1.0,
) -> float:
    """Expected calibration error (Naeini et al. 2015; Guo et al. 2017) of the Bradley-Terry
    win probability ``p = σ((r_c − r_r)/T)`` that the chosen response wins.

    Every label says "chosen wins", so scoring ``p`` against outcome 1 alone would rate a
    model that always says ``p = 1`` as perfectly calibrated. The ECE is therefore taken
    over **both orientations** of every pair (deterministic, unlike randomly flipping
    pairs): ``p_i`` with outcome 1 for ``(c, r)`` and ``1 − p_i = σ((r_r − r_c)/T)`` with
    outcome 0 for ``(r, c)``. Over those ``2B`` predictions, with ``bins`` equal-width bins
    on ``[0, 1]`` (``p = 1`` falls in the last bin)::

        ECE = Σ_b (n_b / 2B) · | mean outcome in b − mean prediction in b |

    Args:
        chosen_rewards, rejected_rewards: ``[B]`` float, ``B >= 1``.
        bins: number of equal-width bins, ``>= 1``.
        temperature: ``T > 0`` (e.g. from :func:`fit_temperature`).

    Returns:
        float in ``[0, 1]``.
    """
    op = "expected_calibration_error"
    d = _pair_margins(op, chosen_rewards, rejected_rewards)
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"{op}: bins must be an int >= 1, got {bins!r}")
    temperature = check_number(op, "temperature", temperature, positive=True)

    z = d / temperature
    # σ(−z) rather than 1 − σ(z): keeps the small probabilities exact.
    prob = torch.cat([torch.sigmoid(z), torch.sigmoid(-z)])
    outcome = torch.cat([torch.ones_like(z), torch.zeros_like(z)])
    idx = (prob * bins).long().clamp_(0, bins - 1)
    gap = torch.zeros(bins, dtype=torch.float64, device=d.device).index_add_(0, idx, outcome - prob)
    # Σ_b (n_b/N)·|mean_b(outcome − prob)| = Σ_b |Σ_{i∈b}(outcome_i − prob_i)| / N
    return float(gap.abs().sum() / prob.numel())


def fit_temperature(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    *,
    bounds: tuple[float, float] = (1e-3, 1e3),
    iters: int = 100,
) -> float:
    """Temperature scaling (Guo et al. 2017) for a Bradley-Terry reward model.

    Finds ``T`` minimising the held-out negative log-likelihood of the labels,
    ``NLL(T) = mean_i −log σ((r_c,i − r_r,i)/T)``. That NLL is convex in ``1/T`` (a
    softplus of a linear function), hence unimodal in ``log T``, and a golden-section
    search over ``log T`` in ``bounds`` finds its minimum without derivatives or tuning.
    When the model orders every pair correctly the NLL keeps falling as ``T → 0`` and the
    result is the lower bound; when it orders every pair wrongly it is the upper bound.

    Args:
        chosen_rewards, rejected_rewards: ``[B]`` float, ``B >= 1``.
        bounds: ``(T_min, T_max)`` with ``0 < T_min < T_max``.
        iters: golden-section steps (each shrinks the bracket by 0.618).

    Returns:
        float ``T``; use ``r / T`` (or ``expected_calibration_error(..., temperature=T)``).
    """
    op = "fit_temperature"
    d = _pair_margins(op, chosen_rewards, rejected_rewards)
    if not (isinstance(bounds, (tuple, list)) and len(bounds) == 2):
        raise TypeError(f"{op}: bounds must be a pair (T_min, T_max), got {bounds!r}")
    lo = check_number(op, "bounds[0]", bounds[0], positive=True)
    hi = check_number(op, "bounds[1]", bounds[1], positive=True)
    if not lo < hi:
        raise ValueError(f"{op}: bounds must satisfy T_min < T_max, got {bounds!r}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"{op}: iters must be an int >= 1, got {iters!r}")

    def nll(log_t: float) -> float:
        return float(-F.logsigmoid(d * math.exp(-log_t)).mean())

    inv_phi = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = math.log(lo), math.log(hi)
    x1, x2 = b - inv_phi * (b - a), a + inv_phi * (b - a)
    f1, f2 = nll(x1), nll(x2)
    for _ in range(iters):
        if f1 <= f2:
            b, x2, f2 = x2, x1, f1
            x1 = b - inv_phi * (b - a)
            f1 = nll(x1)
        else:
            a, x1, f1 = x1, x2, f2
            x2 = a + inv_phi * (b - a)
            f2 = nll(x2)
    return math.exp((a + b) / 2.0)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Explained variance of a critic: ``1 − Var[R − V] / Var[R]`` over the masked tokens.

    1 is a perfect critic, 0 one no better than predicting the mean return, negative worse
    than that. Variances are population variances, two-pass (centred). When ``Var[R] = 0``
    (or no token is masked in) the ratio is undefined and the result is ``nan`` — like
    Stable-Baselines3's ``explained_variance`` — rather than a number that looks like a score.

    Args:
        values: ``V``, float, any shape (e.g. ``[B, T]`` or flat ``[N]``).
        returns: ``R``, float, the shape of ``values``.
        mask: ``None`` (all tokens) or bool / float of that shape; nonzero = counts.

    Returns:
        float (``nan`` when undefined).
    """
    op = "explained_variance"
    check_tensor(op, "values", values)
    check_tensor(op, "returns", returns)
    check_same_shape(op, "values", values, returns=returns, mask=mask)
    check_same_device(op, "values", values, returns=returns, mask=mask)
    if mask is not None:
        check_tensor(op, "mask", mask, MASK_DTYPES)

    v = values.detach().double().reshape(-1)
    r = returns.detach().double().reshape(-1)
    if mask is not None:
        keep = mask.reshape(-1) != 0
        v, r = v[keep], r[keep]
    if r.numel() == 0:
        return math.nan

    def var(x: torch.Tensor) -> float:
        return float((x - x.mean()).square().mean())

    var_r = var(r)
    if var_r == 0.0:
        return math.nan
    return 1.0 - var(r - v) / var_r
