"""Preference losses: reward-model training (Bradley-Terry, Plackett-Luce, InstructGPT's
K-choose-2 pairs) and direct alignment (the DPO family).

Pure PyTorch math on per-pair (or per-list) scalars, so there are no kernels behind it:
the work is O(B) next to the forward passes that produced the rewards / logprobs.
Inputs in fp16/bf16 are upcast to fp32 and everything is computed in fp32 (fp64 inputs
stay fp64, which the tests use). Log-probabilities of sigmoids go through
``F.logsigmoid`` and ranked-list normalisers through ``logcumsumexp``, never
``log(sigmoid(x))`` or ``log(sum(exp(x)))``, so large reward gaps neither overflow nor
lose the gradient.

Metrics are detached 0-d tensors (no ``.item()``: nothing here forces a host sync).
Pairwise accuracies count a tie as half right, like ``eval_metrics.pairwise_accuracy``
(so policy == reference at the start of DPO reads 0.5, not 0).

Data-dependent checks (non-negative weights, ranking indices in range) run on CPU
tensors only; on the GPU they would be a host sync.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from rlhf_engine._checks import INDEX_DTYPES, check_choice, check_number, check_same_device, check_same_shape, check_tensor

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _check_pair_vectors(op: str, first: str, ref: torch.Tensor, **others) -> None:
    """``ref`` and every tensor in ``others``: floating 1-D ``[B]`` with B >= 1, same shape and device."""
    check_tensor(op, first, ref)
    for name, t in others.items():
        if t is not None:
            check_tensor(op, name, t)
    if ref.dim() != 1 or ref.numel() == 0:
        raise ValueError(f"{op}: {first} must be 1-D [B] with B >= 1, got shape {tuple(ref.shape)}")
    check_same_shape(op, first, ref, **others)
    check_same_device(op, first, ref, **others)


def _tie_half_accuracy(diff: torch.Tensor) -> torch.Tensor:
    """Per pair: 1 where diff > 0, 0.5 where diff == 0, 0 where diff < 0."""
    return (diff > 0).to(diff.dtype) + 0.5 * (diff == 0).to(diff.dtype)


# --------------------------------------------------------------------------- reward models


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    *,
    margin: torch.Tensor | float | None = None,
    weights: torch.Tensor | None = None,
    center_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Bradley-Terry reward-model loss over ``B`` preference pairs.

    Per pair ``i``, with ``d_i = r_w,i − r_l,i``::

        ℓ_i = −log σ(d_i − m_i) + c · (r_w,i + r_l,i)²

    * ``m`` — margin (Llama 2, Touvron et al. 2023, eq. 2): the chosen reward must beat the
      rejected one by ``m`` (e.g. larger for "significantly better" labels). ``None`` = 0.
    * ``c = center_coef`` — TRL's ``center_rewards_coefficient`` (Eisenstein et al. 2023):
      pulls the reward of each pair towards zero mean, which the pairwise term leaves
      undetermined.

    The loss is the weighted mean ``Σ w_i ℓ_i / Σ w_i`` (plain mean without ``weights``).
    With the weights from :func:`k_choose_2_pairs` (``1/C(K,2)`` per pair, summing to 1 per
    prompt) this is InstructGPT's loss: the mean over prompts of each prompt's mean over its
    ``C(K,2)`` pairs. All-zero weights give a loss of 0.

    Args:
        chosen_rewards: ``[B]`` float, ``r_w`` (reward at the last non-pad token of the
            preferred response).
        rejected_rewards: ``[B]`` float, ``r_l``.
        margin: ``None``, a number, or a ``[B]`` float tensor.
        weights: ``None`` or a ``[B]`` float tensor of non-negative per-pair weights.
        center_coef: ``c >= 0``.

    Returns:
        ``(loss, metrics)``: ``loss`` a 0-d tensor in fp32 (fp64 for fp64 inputs);
        ``metrics`` detached 0-d tensors, weighted like the loss: ``accuracy`` (fraction with
        ``r_w > r_l``, ties 0.5), ``margin`` (mean ``r_w − r_l``), ``chosen_reward``,
        ``rejected_reward`` (means).
    """
    op = "bradley_terry_loss"
    margin_is_tensor = isinstance(margin, torch.Tensor)
    _check_pair_vectors(
        op, "chosen_rewards", chosen_rewards, rejected_rewards=rejected_rewards, weights=weights,
        margin=margin if margin_is_tensor else None,
    )
    if margin is not None and not margin_is_tensor:
        margin = check_number(op, "margin", margin)
    center_coef = check_number(op, "center_coef", center_coef, nonnegative=True)
    if weights is not None and weights.device.type == "cpu" and bool((weights < 0).any()):
        raise ValueError(f"{op}: weights must be non-negative")

    dtype = _compute_dtype(chosen_rewards)
    r_w = chosen_rewards.to(dtype)
    r_l = rejected_rewards.to(dtype)
    diff = r_w - r_l
    logits = diff if margin is None else diff - (margin.to(dtype) if margin_is_tensor else margin)
    per_pair = -F.logsigmoid(logits)
    if center_coef != 0.0:
        per_pair = per_pair + center_coef * (r_w + r_l).square()

    if weights is None:
        def reduce(x):
            return x.mean()
    else:
        w = weights.to(dtype)
        # clamp: all-zero weights give 0 instead of 0/0.
        w = w / w.sum().clamp_min(torch.finfo(dtype).tiny)

        def reduce(x):
            return (w * x).sum()

    loss = reduce(per_pair)
    with torch.no_grad():
        metrics = {
            "accuracy": reduce(_tie_half_accuracy(diff)),
            "margin": reduce(diff),
            "chosen_reward": reduce(r_w),
            "rejected_reward": reduce(r_l),
        }
    return loss, {k: v.detach() for k, v in metrics.items()}


def plackett_luce_loss(rewards: torch.Tensor, *, mask: torch.Tensor | None = None) -> torch.Tensor:
    """K-wise Plackett-Luce ranking loss (Zhu, Jordan & Jiao 2023; used for Starling-RM).

    Each row holds the rewards of one prompt's responses **in ranked order, best first**.
    The negative log-likelihood of that ranking under Plackett-Luce is::

        ℓ = −Σ_k [ r_σ(k) − logsumexp_{j ≥ k} r_σ(j) ]

    (pick the best of all, then the best of the rest, ...). The last term is always 0, and
    for K = 2 the loss is Bradley-Terry's ``−log σ(r_1 − r_2)``.

    Variable K: ``mask[b, k]`` is True where row ``b`` has a response at position ``k``;
    masked positions are dropped from both the sum and the normalisers, so the valid
    entries of a row (in column order) are its ranking, wherever the padding sits. A row
    with fewer than two valid entries contributes 0 (and still counts in the mean).

    Args:
        rewards: ``[B, K]`` float, ranked best first.
        mask: ``None`` or ``[B, K]`` bool (True = present).

    Returns:
        0-d tensor, the mean over rows of ``ℓ``, fp32 (fp64 for fp64 inputs).
    """
    op = "plackett_luce_loss"
    check_tensor(op, "rewards", rewards)
    if rewards.dim() != 2 or rewards.shape[0] == 0:
        raise ValueError(f"{op}: rewards must be 2-D [B, K] with B >= 1, got shape {tuple(rewards.shape)}")
    if mask is not None:
        check_tensor(op, "mask", mask, (torch.bool,))
        check_same_shape(op, "rewards", rewards, mask=mask)
        check_same_device(op, "rewards", rewards, mask=mask)

    dtype = _compute_dtype(rewards)
    r = rewards.to(dtype)
    if mask is not None:
        # A very negative finite fill (not −inf): exp(fill − lse) is exactly 0, and the
        # logcumsumexp backward stays NaN-free for rows that are masked at the tail.
        r = torch.where(mask, r, torch.full_like(r, torch.finfo(dtype).min / 4))
    suffix_lse = torch.logcumsumexp(r.flip(-1), dim=-1).flip(-1)  # logsumexp_{j >= k} r_j
    terms = r - suffix_lse
    if mask is not None:
        terms = torch.where(mask, terms, torch.zeros_like(terms))
    return -terms.sum(-1).mean()


class RankedPairs(NamedTuple):
    """All ``C(K,2)`` (better, worse) pairs of a batch of rankings; see :func:`k_choose_2_pairs`."""

    chosen_index: torch.Tensor
    rejected_index: torch.Tensor
    weight: torch.Tensor


def k_choose_2_pairs(rankings: torch.Tensor) -> RankedPairs:
    """InstructGPT's K-choose-2 pairs (Ouyang et al. 2022, eq. 1) for ``P`` ranked prompts.

    ``rankings[p]`` lists the indices (into a flat reward vector) of prompt ``p``'s
    responses, best first; ``-1`` pads prompts with fewer than ``K`` responses (a padding
    entry may sit anywhere; the valid entries keep their order). For every prompt and
    every column pair ``a < b`` the output holds the pair (``rankings[p, a]`` preferred
    over ``rankings[p, b]``) with weight ``1 / C(k_p, 2)``, ``k_p`` the prompt's number of
    valid responses, so each prompt's weights sum to 1 (0 for prompts with fewer than two).
    Pairs touching padding are kept with weight 0 and index 0, so the output has the fixed
    size ``P · C(K,2)`` (row-major: prompt, then pair) and no host sync is needed::

        pairs = k_choose_2_pairs(rankings)
        loss, m = bradley_terry_loss(rewards[pairs.chosen_index], rewards[pairs.rejected_index],
                                     weights=pairs.weight)

    Args:
        rankings: ``[P, K]`` int32/int64, entries >= -1.

    Returns:
        :class:`RankedPairs` ``(chosen_index, rejected_index, weight)``: two int64
        ``[P·C(K,2)]`` index tensors and the fp32 ``[P·C(K,2)]`` weights.
    """
    op = "k_choose_2_pairs"
    check_tensor(op, "rankings", rankings, INDEX_DTYPES)
    if rankings.dim() != 2:
        raise ValueError(f"{op}: rankings must be 2-D [P, K], got shape {tuple(rankings.shape)}")
    if rankings.device.type == "cpu" and bool((rankings < -1).any()):
        raise ValueError(f"{op}: rankings entries must be response indices >= 0 or -1 (padding)")

    P, K = rankings.shape
    a, b = torch.triu_indices(K, K, offset=1, device=rankings.device)
    chosen = rankings[:, a].long()  # [P, C]
    rejected = rankings[:, b].long()
    valid_pair = (chosen >= 0) & (rejected >= 0)
    k = (rankings >= 0).sum(-1, keepdim=True).to(torch.float32)  # [P, 1]
    n_pairs = k * (k - 1) / 2
    weight = torch.where(valid_pair, 1.0 / n_pairs.clamp_min(1.0), torch.zeros((), device=rankings.device))
    return RankedPairs(
        chosen.clamp_min(0).reshape(-1), rejected.clamp_min(0).reshape(-1), weight.reshape(-1)
    )


# --------------------------------------------------------------------------- DPO family


def dpo_loss(
    policy_chosen_logp: torch.Tensor,
    policy_rejected_logp: torch.Tensor,
    ref_chosen_logp: torch.Tensor,
    ref_rejected_logp: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    nll_loss: torch.Tensor | None = None,
    nll_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Direct-alignment losses of the DPO family over ``B`` preference pairs.

    With sequence-summed logprobs ``lp`` (policy) and ``ref`` (frozen reference)::

        h = β · [(lp_w − ref_w) − (lp_l − ref_l)]

    ``loss_type``:

    * ``"sigmoid"`` — DPO (Rafailov et al. 2023): ``−log σ(h)``. With
      ``label_smoothing = ε`` (conservative DPO, Mitchell 2023): ``−(1−ε)·log σ(h) − ε·log σ(−h)``.
    * ``"ipo"`` — IPO (Azar et al. 2023): ``(h/β − 1/(2β))²``. (TRL feeds IPO length-averaged
      logprobs; pass those here to match it.)
    * ``"hinge"`` — SLiC-HF (Zhao et al. 2023): ``max(0, 1 − h)``.

    The loss is the mean over pairs, plus ``nll_coef · nll_loss`` when ``nll_loss`` is given:
    RPO / DPO+NLL (Pang et al. 2024) adds ``α · NLL(y_w)/|y_w|``; the caller computes that
    length-normalised NLL of the chosen responses (it needs the token logprobs and lengths,
    which this function does not see) and passes it as a 0-d tensor.

    Args:
        policy_chosen_logp, policy_rejected_logp, ref_chosen_logp, ref_rejected_logp:
            ``[B]`` float, summed response logprobs.
        beta: ``β > 0``.
        loss_type: one of ``"sigmoid"``, ``"ipo"``, ``"hinge"``.
        label_smoothing: ``ε`` in ``[0, 0.5)``; only with ``loss_type="sigmoid"``.
        nll_loss: ``None`` or a 0-d float tensor; required when ``nll_coef != 0``.
        nll_coef: ``α >= 0``.

    Returns:
        ``(loss, metrics)``: ``loss`` a 0-d tensor in fp32 (fp64 for fp64 inputs); ``metrics``
        detached 0-d tensors, means over pairs: ``chosen_reward`` = ``β(lp_w − ref_w)``,
        ``rejected_reward`` = ``β(lp_l − ref_l)``, ``reward_margin`` (their difference, ``h``),
        ``reward_accuracy`` (fraction with ``h > 0``, ties 0.5), plus ``nll_loss`` when given.
    """
    op = "dpo_loss"
    _check_pair_vectors(
        op, "policy_chosen_logp", policy_chosen_logp, policy_rejected_logp=policy_rejected_logp,
        ref_chosen_logp=ref_chosen_logp, ref_rejected_logp=ref_rejected_logp,
    )
    beta = check_number(op, "beta", beta, positive=True)
    check_choice(op, "loss_type", loss_type, DPO_LOSS_TYPES)
    label_smoothing = check_number(op, "label_smoothing", label_smoothing)
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"{op}: label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing != 0.0 and loss_type != "sigmoid":
        raise ValueError(f"{op}: label_smoothing applies to loss_type='sigmoid' only, got loss_type={loss_type!r}")
    nll_coef = check_number(op, "nll_coef", nll_coef, nonnegative=True)
    if nll_loss is not None:
        check_tensor(op, "nll_loss", nll_loss)
        if nll_loss.dim() != 0:
            raise ValueError(f"{op}: nll_loss must be a 0-d tensor, got shape {tuple(nll_loss.shape)}")
    elif nll_coef != 0.0:
        raise ValueError(f"{op}: nll_coef={nll_coef} needs nll_loss (a 0-d tensor)")

    dtype = _compute_dtype(policy_chosen_logp)
    chosen_reward = beta * (policy_chosen_logp.to(dtype) - ref_chosen_logp.to(dtype))
    rejected_reward = beta * (policy_rejected_logp.to(dtype) - ref_rejected_logp.to(dtype))
    h = chosen_reward - rejected_reward

    if loss_type == "sigmoid":
        per_pair = -F.logsigmoid(h)
        if label_smoothing != 0.0:
            per_pair = (1.0 - label_smoothing) * per_pair - label_smoothing * F.logsigmoid(-h)
    elif loss_type == "ipo":
        per_pair = (h / beta - 1.0 / (2.0 * beta)).square()
    else:
        per_pair = F.relu(1.0 - h)
    loss = per_pair.mean()
    if nll_loss is not None:
        loss = loss + nll_coef * nll_loss.to(dtype)

    with torch.no_grad():
        metrics = {
            "chosen_reward": chosen_reward.mean(),
            "rejected_reward": rejected_reward.mean(),
            "reward_margin": h.mean(),
            "reward_accuracy": _tie_half_accuracy(h).mean(),
        }
        if nll_loss is not None:
            metrics["nll_loss"] = nll_loss.to(dtype)
    return loss, {k: v.detach() for k, v in metrics.items()}
