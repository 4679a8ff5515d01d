"""preference_losses: each loss against a float64 closed form written out element by element,
hand-computed cases, gradcheck in float64, K = 2 Plackett-Luce == Bradley-Terry,
K-choose-2 weights, and input validation."""

import itertools
import math

import pytest
import torch

from rlhf_engine.algos.preference_losses import (
    bradley_terry_loss,
    dpo_loss,
    k_choose_2_pairs,
    plackett_luce_loss,
)

LOG2 = math.log(2.0)


def _neg_log_sigmoid(x: float) -> float:
    # Written without logsigmoid on purpose: an independent route to the same number.
    return math.log1p(math.exp(-x)) if x >= 0 else -x + math.log1p(math.exp(x))


def _close(actual, expected, *, tol=1e-5):
    actual = float(actual.detach()) if torch.is_tensor(actual) else float(actual)
    assert math.isclose(actual, expected, rel_tol=tol, abs_tol=tol), (actual, expected)


# ----------------------------------------------------------------------------- Bradley-Terry


def bt_reference(chosen, rejected, margin=None, weights=None, center_coef=0.0):
    c, r = chosen.double().tolist(), rejected.double().tolist()
    B = len(c)
    m = [0.0] * B if margin is None else ([float(margin)] * B if not torch.is_tensor(margin) else margin.double().tolist())
    w = [1.0] * B if weights is None else weights.double().tolist()
    per = [_neg_log_sigmoid(c[i] - r[i] - m[i]) + center_coef * (c[i] + r[i]) ** 2 for i in range(B)]
    return sum(w[i] * per[i] for i in range(B)) / sum(w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("variant", ["plain", "float_margin", "tensor_margin", "weights", "center", "all"])
def test_bradley_terry_matches_closed_form(dtype, variant):
    B = 37  # not a power of two; nothing here depends on B, but keep it odd
    chosen = (torch.randn(B) * 3).to(dtype)
    rejected = (torch.randn(B) * 3).to(dtype)
    kw = {}
    if variant in ("float_margin",):
        kw["margin"] = 0.7
    if variant in ("tensor_margin", "all"):
        kw["margin"] = torch.rand(B).to(dtype)
    if variant in ("weights", "all"):
        kw["weights"] = torch.rand(B)
    if variant in ("center", "all"):
        kw["center_coef"] = 0.01
    loss, metrics = bradley_terry_loss(chosen, rejected, **kw)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert loss.dim() == 0
    _close(loss, bt_reference(chosen, rejected, **kw), tol=1e-5 if dtype != torch.float64 else 1e-12)

    w = kw.get("weights", torch.ones(B)).double()
    d = chosen.double() - rejected.double()
    _close(metrics["margin"], float((w * d).sum() / w.sum()), tol=1e-5)
    # bf16 inputs tie often (8-bit mantissa); a tie counts half.
    _close(metrics["accuracy"], float((w * ((d > 0) + 0.5 * (d == 0))).sum() / w.sum()), tol=1e-6)
    _close(metrics["chosen_reward"], float((w * chosen.double()).sum() / w.sum()), tol=1e-5)
    assert all(not v.requires_grad for v in metrics.values())


def test_bradley_terry_hand_cases():
    # Equal rewards: -log σ(0) = log 2.
    _close(bradley_terry_loss(torch.zeros(4), torch.zeros(4))[0], LOG2)
    # A margin equal to the gap puts the pair back at σ(0).
    _close(bradley_terry_loss(torch.tensor([3.0]), torch.tensor([1.0]), margin=2.0)[0], LOG2)
    # Centering: r_w + r_l = 2 adds c * 4.
    _close(bradley_terry_loss(torch.tensor([1.0]), torch.tensor([1.0]), center_coef=0.5)[0], LOG2 + 2.0)
    # Ties count half in the accuracy: one right, one tie, one wrong -> 0.5.
    _, m = bradley_terry_loss(torch.tensor([2.0, 1.0, 0.0]), torch.tensor([1.0, 1.0, 1.0]))
    _close(m["accuracy"], 0.5)
    _close(m["margin"], 0.0)


def test_bradley_terry_large_gaps_stay_finite():
    chosen = torch.tensor([1000.0, -1000.0], requires_grad=True)
    rejected = torch.zeros(2)
    loss, _ = bradley_terry_loss(chosen, rejected)
    # log(sigmoid(-1000)) would be log(0) = -inf; logsigmoid gives -1000.
    _close(loss, 500.0)
    loss.backward()
    assert torch.isfinite(chosen.grad).all()
    assert chosen.grad.tolist() == pytest.approx([0.0, -0.5])


def test_bradley_terry_weights():
    chosen, rejected = torch.randn(8), torch.randn(8)
    plain, _ = bradley_terry_loss(chosen, rejected)
    uniform, _ = bradley_terry_loss(chosen, rejected, weights=torch.full((8,), 3.0))
    _close(uniform, float(plain))  # weights are normalised
    zero, _ = bradley_terry_loss(chosen, rejected, weights=torch.zeros(8))
    assert float(zero) == 0.0
    one_hot = torch.zeros(8)
    one_hot[5] = 1.0
    _close(bradley_terry_loss(chosen, rejected, weights=one_hot)[0], _neg_log_sigmoid(float(chosen[5] - rejected[5])))


def test_bradley_terry_gradcheck():
    B = 6
    chosen = torch.randn(B, dtype=torch.float64, requires_grad=True)
    rejected = torch.randn(B, dtype=torch.float64, requires_grad=True)
    margin = torch.rand(B, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(B, dtype=torch.float64, requires_grad=True)

    def f(c, r, m, w):
        return bradley_terry_loss(c, r, margin=m, weights=w, center_coef=0.1)[0]

    assert torch.autograd.gradcheck(f, (chosen, rejected, margin, weights))


# ----------------------------------------------------------------------------- Plackett-Luce


def pl_reference(rewards, mask=None):
    total = 0.0
    for b, row in enumerate(rewards.double().tolist()):
        kept = [x for k, x in enumerate(row) if mask is None or bool(mask[b, k])]
        for k in range(len(kept)):
            total -= kept[k] - math.log(sum(math.exp(x) for x in kept[k:]))
    return total / rewards.shape[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("B,K", [(1, 1), (5, 2), (7, 4), (3, 9)])  # K=1: a lone response, loss 0
@pytest.mark.parametrize("masked", [False, True])
def test_plackett_luce_matches_closed_form(dtype, B, K, masked):
    rewards = (torch.randn(B, K) * 2).to(dtype)
    mask = torch.rand(B, K) > 0.3 if masked else None
    if masked:
        mask[0] = False  # a fully padded row contributes 0 and must not poison the mean
    loss = plackett_luce_loss(rewards, mask=mask)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    _close(loss, pl_reference(rewards, mask), tol=1e-5 if dtype != torch.float64 else 1e-12)


def test_plackett_luce_k2_equals_bradley_terry():
    rewards = torch.randn(11, 2, dtype=torch.float64) * 3
    bt, _ = bradley_terry_loss(rewards[:, 0], rewards[:, 1])
    torch.testing.assert_close(plackett_luce_loss(rewards), bt, rtol=1e-14, atol=1e-14)


def test_plackett_luce_hand_cases():
    # K equal rewards: each step picks 1 of the remaining n uniformly, -log P = log K!.
    _close(plackett_luce_loss(torch.zeros(2, 4)), math.log(24.0))
    # Padding anywhere in a row equals the shorter row without it.
    short = torch.tensor([[3.0, 1.0, -2.0]])
    padded = torch.tensor([[3.0, 55.0, 1.0, -2.0, -7.0]])
    mask = torch.tensor([[True, False, True, True, False]])
    torch.testing.assert_close(plackett_luce_loss(padded, mask=mask), plackett_luce_loss(short))
    # One valid response: nothing to rank.
    assert float(plackett_luce_loss(torch.tensor([[4.0, 2.0]]), mask=torch.tensor([[True, False]]))) == 0.0
    # Huge gaps: the right order costs ~0, the reverse costs the gaps.
    _close(plackett_luce_loss(torch.tensor([[1000.0, 0.0, -1000.0]])), 0.0)
    _close(plackett_luce_loss(torch.tensor([[-1000.0, 0.0, 1000.0]])), 3000.0)


def test_plackett_luce_gradcheck_and_masked_grad():
    rewards = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(4, 5) > 0.4
    mask[1] = False
    mask[2, 3:] = False  # padding at the tail: the suffix logsumexp there sees only fill
    assert torch.autograd.gradcheck(lambda r: plackett_luce_loss(r, mask=mask), (rewards,))
    plackett_luce_loss(rewards, mask=mask).backward()
    assert torch.isfinite(rewards.grad).all()
    assert (rewards.grad[~mask] == 0).all()


# ----------------------------------------------------------------------------- K choose 2


def test_k_choose_2_pairs_matches_loops():
    rankings = torch.tensor([[4, 0, 2, 7], [1, 3, -1, 5], [6, -1, -1, -1], [-1, -1, -1, -1], [8, 9, -1, -1]])
    pairs = k_choose_2_pairs(rankings)
    C = 6
    assert pairs.chosen_index.shape == pairs.rejected_index.shape == pairs.weight.shape == (5 * C,)
    assert pairs.chosen_index.dtype == torch.int64 and pairs.weight.dtype == torch.float32
    got = {}
    for i in range(5 * C):
        if float(pairs.weight[i]) > 0:
            got[(i // C, int(pairs.chosen_index[i]), int(pairs.rejected_index[i]))] = float(pairs.weight[i])
    expected = {}
    for p, row in enumerate(rankings.tolist()):
        valid = [x for x in row if x >= 0]
        for a, b in itertools.combinations(valid, 2):
            expected[(p, a, b)] = 1.0 / math.comb(len(valid), 2)
    assert got.keys() == expected.keys()
    for key, w in expected.items():
        _close(got[key], w, tol=1e-7)
    per_prompt = pairs.weight.view(5, C).sum(-1)
    torch.testing.assert_close(per_prompt, torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0]))
    assert int(pairs.chosen_index.min()) >= 0 and int(pairs.rejected_index.min()) >= 0


def test_k_choose_2_random_weights_sum_to_one():
    P, K = 9, 6
    rankings = torch.randperm(P * K).view(P, K)
    pairs = k_choose_2_pairs(rankings.to(torch.int32))
    C = math.comb(K, 2)
    torch.testing.assert_close(pairs.weight.view(P, C).sum(-1), torch.ones(P))
    assert (pairs.weight == 1.0 / C).all()
    assert pairs.chosen_index.dtype == torch.int64


def test_k_choose_2_with_bradley_terry_is_instructgpt_loss():
    # InstructGPT eq. 1: per prompt, -1/C(K,2) Σ_{pairs} log σ(r_w - r_l); mean over prompts.
    rewards = torch.randn(20, dtype=torch.float64)
    rankings = torch.tensor([[3, 1, 0, 7], [2, 5, 9, -1], [11, 4, -1, -1]])
    pairs = k_choose_2_pairs(rankings)
    loss, _ = bradley_terry_loss(rewards[pairs.chosen_index], rewards[pairs.rejected_index], weights=pairs.weight)
    expected = 0.0
    for row in rankings.tolist():
        valid = [x for x in row if x >= 0]
        combos = list(itertools.combinations(valid, 2))
        expected += sum(_neg_log_sigmoid(float(rewards[a] - rewards[b])) for a, b in combos) / len(combos)
    _close(loss, expected / 3, tol=1e-6)  # the pair weights are fp32 (1/3, 1/6 rounded)


# ----------------------------------------------------------------------------- DPO family


def dpo_reference(pc, pr, rc, rr, beta, loss_type, eps=0.0):
    total = 0.0
    rows = list(zip(pc.double().tolist(), pr.double().tolist(), rc.double().tolist(), rr.double().tolist()))
    for a, b, c, d in rows:
        h = beta * ((a - c) - (b - d))
        if loss_type == "sigmoid":
            total += (1 - eps) * _neg_log_sigmoid(h) + eps * _neg_log_sigmoid(-h)
        elif loss_type == "ipo":
            total += (h / beta - 1 / (2 * beta)) ** 2
        else:
            total += max(0.0, 1.0 - h)
    return total / len(rows)


def _logps(B, dtype=torch.float64):
    # Summed sequence logprobs: negative, tens to hundreds of nats.
    return [(-torch.rand(B, dtype=torch.float64) * 100).to(dtype) for _ in range(4)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize(
    "loss_type,eps", [("sigmoid", 0.0), ("sigmoid", 0.1), ("sigmoid", 0.45), ("ipo", 0.0), ("hinge", 0.0)]
)
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_matches_closed_form(dtype, loss_type, eps, beta):
    B = 13
    pc, pr, rc, rr = _logps(B, dtype)
    loss, metrics = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=eps)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    # fp32 rounding of (lp - ref) with |lp| ~ 100 is ~1e-5 nats, times β: hence 1e-4.
    _close(loss, dpo_reference(pc, pr, rc, rr, beta, loss_type, eps), tol=1e-4 if dtype != torch.float64 else 1e-12)
    cr = beta * (pc.double() - rc.double())
    rj = beta * (pr.double() - rr.double())
    _close(metrics["chosen_reward"], float(cr.mean()), tol=1e-4)
    _close(metrics["rejected_reward"], float(rj.mean()), tol=1e-4)
    _close(metrics["reward_margin"], float((cr - rj).mean()), tol=1e-4)
    _close(metrics["reward_accuracy"], float(((cr > rj) + 0.5 * (cr == rj)).double().mean()), tol=1e-6)


def test_dpo_hand_cases():
    lp = torch.full((3,), -5.0)
    # Policy == reference: h = 0.
    _close(dpo_loss(lp, lp, lp, lp)[0], LOG2)
    _close(dpo_loss(lp, lp, lp, lp, label_smoothing=0.3)[0], LOG2)
    _close(dpo_loss(lp, lp, lp, lp, beta=0.1, loss_type="ipo")[0], 25.0)  # (1/(2·0.1))²
    _close(dpo_loss(lp, lp, lp, lp, loss_type="hinge")[0], 1.0)
    _, m = dpo_loss(lp, lp, lp, lp)
    _close(m["reward_accuracy"], 0.5)  # all ties
    # β = 0.5, lp_w − ref_w = 2: h = 1, so hinge max(0, 1 − 1) = 0 and IPO (h/β − 1/(2β))² = (2 − 1)².
    pc = torch.tensor([2.0])
    z1 = torch.zeros(1)
    _close(dpo_loss(pc, z1, z1, z1, beta=0.5, loss_type="hinge")[0], 0.0)
    _close(dpo_loss(pc, z1, z1, z1, beta=0.5, loss_type="ipo")[0], (2.0 - 1.0) ** 2)
    # cDPO at h: (1−ε)·softplus(−h) + ε·softplus(h).
    _close(
        dpo_loss(pc, z1, z1, z1, beta=0.5, label_smoothing=0.2)[0],
        0.8 * _neg_log_sigmoid(1.0) + 0.2 * _neg_log_sigmoid(-1.0),
    )
    # Reward metrics: chosen_reward = β(lp_w − ref_w).
    _, m = dpo_loss(torch.tensor([-1.0]), torch.tensor([-4.0]), torch.tensor([-2.0]), torch.tensor([-3.0]), beta=0.5)
    _close(m["chosen_reward"], 0.5)
    _close(m["rejected_reward"], -0.5)
    _close(m["reward_margin"], 1.0)
    _close(m["reward_accuracy"], 1.0)


def test_dpo_nll_term():
    pc, pr, rc, rr = _logps(5)
    nll = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    base, _ = dpo_loss(pc, pr, rc, rr)
    with_nll, m = dpo_loss(pc, pr, rc, rr, nll_loss=nll, nll_coef=0.2)
    _close(with_nll, float(base) + 0.5, tol=1e-12)
    _close(m["nll_loss"], 2.5)
    with_nll.backward()
    _close(nll.grad, 0.2)


@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0), ("hinge", 0.0)])
def test_dpo_gradcheck(loss_type, eps):
    B = 5
    # Logprobs ~ N(0, 1) with β = 0.5 keep h away from the hinge's kink at 1 (almost surely).
    args = [torch.randn(B, dtype=torch.float64, requires_grad=True) for _ in range(4)]

    def f(*a):
        return dpo_loss(*a, beta=0.5, loss_type=loss_type, label_smoothing=eps)[0]

    assert torch.autograd.gradcheck(f, tuple(args))


def test_dpo_large_margin_stays_finite():
    pc = torch.tensor([0.0, -5000.0], requires_grad=True)
    z = torch.full((2,), -2500.0)
    loss, _ = dpo_loss(pc, z, z, z, beta=1.0)  # h = ±2500
    _close(loss, 1250.0)
    loss.backward()
    assert torch.isfinite(pc.grad).all()


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "call,exc,words",
    [
        (lambda: bradley_terry_loss(torch.zeros(3), torch.zeros(4)), ValueError, "rejected_rewards"),
        (lambda: bradley_terry_loss(torch.zeros(3, 1), torch.zeros(3, 1)), ValueError, "chosen_rewards"),
        (lambda: bradley_terry_loss(torch.zeros(0), torch.zeros(0)), ValueError, "chosen_rewards"),
        (lambda: bradley_terry_loss([0.0], torch.zeros(1)), TypeError, "chosen_rewards"),
        (lambda: bradley_terry_loss(torch.zeros(3, dtype=torch.long), torch.zeros(3)), TypeError, "chosen_rewards"),
        (lambda: bradley_terry_loss(torch.zeros(3), torch.zeros(3), margin=torch.zeros(2)), ValueError, "margin"),
        (lambda: bradley_terry_loss(torch.zeros(3), torch.zeros(3), margin="1"), TypeError, "margin"),
        (lambda: bradley_terry_loss(torch.zeros(3), torch.zeros(3), weights=torch.zeros(2)), ValueError, "weights"),
        (lambda: bradley_terry_loss(torch.zeros(3), torch.zeros(3), weights=-torch.ones(3)), ValueError, "weights"),
        (lambda: bradley_terry_loss(torch.zeros(3), torch.zeros(3), center_coef=-1.0), ValueError, "center_coef"),
        (lambda: plackett_luce_loss(torch.zeros(3)), ValueError, "rewards"),
        (lambda: plackett_luce_loss(torch.zeros(2, 3), mask=torch.ones(2, 2, dtype=torch.bool)), ValueError, "mask"),
        (lambda: plackett_luce_loss(torch.zeros(2, 3), mask=torch.ones(2, 3)), TypeError, "mask"),
        (lambda: k_choose_2_pairs(torch.zeros(2, 3)), TypeError, "rankings"),
        (lambda: k_choose_2_pairs(torch.zeros(3, dtype=torch.long)), ValueError, "rankings"),
        (lambda: k_choose_2_pairs(torch.tensor([[0, -2]])), ValueError, "rankings"),
        (lambda: dpo_loss(*_logps(3)[:3], torch.zeros(4, dtype=torch.float64)), ValueError, "ref_rejected_logp"),
        (lambda: dpo_loss(*_logps(3), beta=0.0), ValueError, "beta"),
        (lambda: dpo_loss(*_logps(3), beta=-1), ValueError, "beta"),
        (lambda: dpo_loss(*_logps(3), loss_type="kto"), ValueError, "loss_type"),
        (lambda: dpo_loss(*_logps(3), label_smoothing=0.5), ValueError, "label_smoothing"),
        (lambda: dpo_loss(*_logps(3), label_smoothing=-0.1), ValueError, "label_smoothing"),
        (lambda: dpo_loss(*_logps(3), loss_type="ipo", label_smoothing=0.1), ValueError, "label_smoothing"),
        (lambda: dpo_loss(*_logps(3), nll_coef=0.1), ValueError, "nll_loss"),
        (lambda: dpo_loss(*_logps(3), nll_loss=torch.zeros(2), nll_coef=0.1), ValueError, "nll_loss"),
        (lambda: dpo_loss(*_logps(3), nll_loss=torch.zeros(()), nll_coef=-1.0), ValueError, "nll_coef"),
    ],
)
def test_bad_input_names_the_argument(call, exc, words):
    with pytest.raises(exc, match=words):
        call()
