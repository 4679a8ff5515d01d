"""gae and discounted_returns: every backend vs the float64 reference (padded and packed),
hand-computed cases pinning the masked-position rule, compile, errors."""

import pytest
import torch

from rlhf_engine import ops
from rlhf_engine.reference.gae import discounted_returns_ref, gae_ref
from tests.graphs import assert_replay_matches_eager
from tests.tolerance import assert_within_tolerance

# (B, T) padded shapes, and why each is there:
PADDED_SHAPES = [
    (1, 1),  # N=1: a single token, one valid token for whitening (or none)
    (4, 37),  # T off every block size; row 1 fully masked; random holes mid-row
    (2, 1100),  # T > 1024 = the largest BLOCK_T: the scan carries its state across chunks
]
# Packed boundaries: empty sequences first, in the middle and last; the 295-token
# sequence spans several BLOCK_T chunks (BLOCK_T follows the average length, 64 here).
PACKED_CU = [0, 0, 5, 5, 300, 301, 301]
# (gamma, lam): TRL-like discounting, and verl's default 1, 1 (no decay at all).
COEFFS = [(0.9, 0.8), (1.0, 1.0)]


def _padded_inputs(B, T, dtype, device):
    rewards = torch.randn(B, T, device=device).to(dtype)
    values = torch.randn(B, T, device=device).to(dtype)
    mask = torch.rand(B, T, device=device) > 0.25
    if B > 1:
        mask[1] = False
    return rewards, values, mask


def _packed_inputs(dtype, device):
    cu = torch.tensor(PACKED_CU, dtype=torch.int32, device=device)
    n = PACKED_CU[-1]
    rewards = torch.randn(n, device=device).to(dtype)
    values = torch.randn(n, device=device).to(dtype)
    mask = torch.rand(n, device=device) > 0.25
    return rewards, values, mask, cu


def _check_gae(backend, rewards, values, mask, cu, gamma, lam, whiten, dtype):
    ref64 = gae_ref(rewards.double(), values.double(), mask, gamma=gamma, lam=lam, whiten=whiten, cu_seqlens=cu)
    baseline = gae_ref(rewards, values, mask, gamma=gamma, lam=lam, whiten=whiten, cu_seqlens=cu)
    adv, ret = ops.gae(rewards, values, mask, gamma=gamma, lam=lam, whiten=whiten, cu_seqlens=cu, backend=backend)
    assert adv.dtype == ret.dtype == torch.float32
    assert_within_tolerance(adv, ref64[0], baseline[0], dtype, "advantages")
    assert_within_tolerance(ret, ref64[1], baseline[1], dtype, "returns")


@pytest.mark.parametrize("whiten", [True, False])
@pytest.mark.parametrize("gamma,lam", COEFFS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,T", PADDED_SHAPES)
def test_gae_padded_matches_reference(backend, device, B, T, dtype, gamma, lam, whiten):
    rewards, values, mask = _padded_inputs(B, T, dtype, device)
    _check_gae(backend, rewards, values, mask, None, gamma, lam, whiten, dtype)


@pytest.mark.parametrize("whiten", [True, False])
@pytest.mark.parametrize("gamma,lam", COEFFS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gae_packed_matches_reference(backend, device, dtype, gamma, lam, whiten):
    rewards, values, mask, cu = _packed_inputs(dtype, device)
    _check_gae(backend, rewards, values, mask, cu, gamma, lam, whiten, dtype)


@pytest.mark.parametrize("gamma", [0.9, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["1x1", "4x37", "2x1100", "packed"])
def test_discounted_returns_matches_reference(backend, device, layout, dtype, gamma):
    if layout == "packed":
        rewards, _, mask, cu = _packed_inputs(dtype, device)
    else:
        rewards, _, mask = _padded_inputs(*map(int, layout.split("x")), dtype, device)
        cu = None
    ref64 = discounted_returns_ref(rewards.double(), mask, gamma=gamma, cu_seqlens=cu)
    baseline = discounted_returns_ref(rewards, mask, gamma=gamma, cu_seqlens=cu)
    out = ops.discounted_returns(rewards, mask, gamma=gamma, cu_seqlens=cu, backend=backend)
    assert out.dtype == torch.float32
    assert_within_tolerance(out, ref64, baseline, dtype)


def test_gae_by_hand_with_masked_middle_token(backend, device):
    # gamma = lam = 0.5; token 1 is masked (an observation token): its reward 100 and
    # value 9 are ignored and the state passes through it.
    rewards = torch.tensor([[1.0, 100.0, 3.0]], device=device)
    values = torch.tensor([[0.5, 9.0, 1.0]], device=device)
    mask = torch.tensor([[True, False, True]], device=device)
    adv, ret = ops.gae(rewards, values, mask, gamma=0.5, lam=0.5, whiten=False, backend=backend)
    # t=2: delta = 3 + 0.5*0 - 1 = 2, A = 2, R = 3
    # t=0: delta = 1 + 0.5*V_2 - 0.5 = 1, A = 1 + 0.25*A_2 = 1.5, R = 2
    torch.testing.assert_close(adv.cpu(), torch.tensor([[1.5, 0.0, 2.0]]))
    torch.testing.assert_close(ret.cpu(), torch.tensor([[2.0, 0.0, 3.0]]))
    whitened, _ = ops.gae(rewards, values, mask, gamma=0.5, lam=0.5, backend=backend)
    # valid A = (1.5, 2): mean 1.75, unbiased var 0.125 -> -/+ 0.25/sqrt(0.125)
    torch.testing.assert_close(whitened.cpu(), torch.tensor([[-(0.5**0.5), 0.0, 0.5**0.5]]))


def test_discounted_returns_by_hand(backend, device):
    rewards = torch.tensor([[1.0, 100.0, 2.0, 3.0]], device=device)
    mask = torch.tensor([[1.0, 0.0, 1.0, 1.0]], device=device)  # a float mask, read as mask != 0
    out = ops.discounted_returns(rewards, mask, gamma=0.5, backend=backend)
    # G_3 = 3, G_2 = 2 + 0.5*3 = 3.5, masked token skipped, G_0 = 1 + 0.5*3.5 = 2.75
    torch.testing.assert_close(out.cpu(), torch.tensor([[2.75, 0.0, 3.5, 3.0]]))


def test_gae_one_valid_token_and_fully_masked_rows(backend, device):
    rewards = torch.randn(3, 5, device=device)
    values = torch.randn(3, 5, device=device)
    mask = torch.zeros(3, 5, dtype=torch.bool, device=device)
    adv, ret = ops.gae(rewards, values, mask, backend=backend)
    assert torch.equal(adv.cpu(), torch.zeros(3, 5)) and torch.equal(ret.cpu(), torch.zeros(3, 5))
    mask[2, 3] = True  # one valid token in the batch: whitened advantage 0, return r (+ V - V)
    adv, ret = ops.gae(rewards, values, mask, backend=backend)
    assert torch.equal(adv.cpu(), torch.zeros(3, 5))
    torch.testing.assert_close(ret[2, 3].cpu(), rewards[2, 3].cpu())


def test_packed_equals_padded(backend, device):
    rewards, values, mask = _padded_inputs(3, 20, torch.float32, device)
    cu = torch.arange(4, device=device, dtype=torch.int64) * 20
    padded = ops.gae(rewards, values, mask, gamma=0.9, backend=backend)
    packed = ops.gae(rewards.view(-1), values.view(-1), mask.view(-1), gamma=0.9, cu_seqlens=cu, backend=backend)
    for a, b in zip(padded, packed):
        torch.testing.assert_close(a.view(-1), b)


def test_outputs_carry_no_gradient(backend, device):
    values = torch.randn(2, 4, device=device, requires_grad=True)
    mask = torch.ones(2, 4, dtype=torch.bool, device=device)
    adv, ret = ops.gae(torch.randn(2, 4, device=device), values, mask, backend=backend)
    assert not adv.requires_grad and not ret.requires_grad
    assert not ops.discounted_returns(values, mask, backend=backend).requires_grad


def test_gae_compiles_without_graph_breaks(backend, device):
    # aot_eager traces through dynamo and the fake kernels like inductor does, minus codegen time.
    rewards, values, mask = _padded_inputs(2, 9, torch.float32, device)
    cu = torch.tensor([0, 4, 18], dtype=torch.int32, device=device)

    def fn(r, v, m, cu):
        adv, ret = ops.gae(r, v, m, gamma=0.9, backend=backend)
        packed, _ = ops.gae(r.view(-1), v.view(-1), m.view(-1), cu_seqlens=cu, backend=backend)
        returns = ops.discounted_returns(r, m, gamma=0.9, backend=backend)
        return adv, ret, packed, returns

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(rewards, values, mask, cu), fn(rewards, values, mask, cu)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(values=torch.randn(2, 5)), ValueError, "values"),
        (dict(mask=torch.ones(2, 5, dtype=torch.bool)), ValueError, "mask"),
        (dict(rewards=torch.ones(2, 4, dtype=torch.long)), TypeError, "rewards"),
        (dict(mask=torch.ones(2, 4, dtype=torch.complex64)), TypeError, "mask"),
        (dict(values=torch.randn(2, 4, device="meta")), ValueError, "values"),
        (dict(rewards=torch.randn(8), values=torch.randn(8), mask=torch.ones(8, dtype=torch.bool)), ValueError, "rewards"),
        (dict(cu_seqlens=torch.tensor([0, 8])), ValueError, "cu_seqlens"),  # cu_seqlens with [B, T] inputs
        (dict(gamma=float("nan")), ValueError, "gamma"),
        (dict(lam=-0.5), ValueError, "lam"),
        (dict(gamma="0.9"), TypeError, "gamma"),
        (dict(whiten=1), TypeError, "whiten"),
        (dict(backend="cudnn"), ValueError, "backend"),
    ],
)
def test_gae_rejects_bad_input(change, error, match):
    args = dict(rewards=torch.randn(2, 4), values=torch.randn(2, 4), mask=torch.ones(2, 4, dtype=torch.bool))
    args.update(change)
    with pytest.raises(error, match=match):
        ops.gae(args.pop("rewards"), args.pop("values"), args.pop("mask"), **args)


@pytest.mark.parametrize(
    "cu_seqlens,error",
    [
        (torch.tensor([0, 3, 8], dtype=torch.float32), TypeError),
        (torch.tensor([0, 3, 7]), ValueError),  # does not end at N = 8
        (torch.tensor([0, 5, 3, 8]), ValueError),  # decreasing
        (torch.tensor([8]), ValueError),
    ],
)
def test_discounted_returns_rejects_bad_cu_seqlens(cu_seqlens, error):
    with pytest.raises(error, match="cu_seqlens"):
        ops.discounted_returns(torch.randn(8), torch.ones(8, dtype=torch.bool), cu_seqlens=cu_seqlens)


@pytest.mark.gpu
def test_gae_captures_in_cuda_graph():
    # Capture fails on any host sync, so this proves the GPU path never syncs.
    rewards = torch.randn(64, 700, device="cuda")
    values = torch.randn(64, 700, device="cuda")
    mask = torch.rand(64, 700, device="cuda") > 0.2
    cu = torch.tensor([0, 100, 100, 44800], dtype=torch.int32, device="cuda")

    def step():
        adv, ret = ops.gae(rewards, values, mask, gamma=0.99)
        packed, _ = ops.gae(rewards.view(-1), values.view(-1), mask.view(-1), cu_seqlens=cu)
        return adv, ret, packed, ops.discounted_returns(rewards, mask, gamma=0.99)

    assert_replay_matches_eager(step)
