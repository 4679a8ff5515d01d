"""gae and discounted_returns: every backend vs the float64 reference (padded and packed),
hand-computed cases pinning the masked-position rule, compile, errors; for the native
backends (cpp / cuda) also strides, every dtype, chunk boundaries and thread counts."""

import pytest
import torch

from rlhf_engine import ops
from rlhf_engine._backend import native_runs_on
from rlhf_engine.reference.gae import discounted_returns_ref, gae_ref
from tests.conftest import backends_here
from tests.graphs import assert_replay_matches_eager
from tests.tolerance import assert_within_tolerance

NATIVE_BACKENDS = True  # the backend tests also run on cpp (CPU) / cuda (GPU)

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


# The native backend of this machine's test device (cpp on the CPU, cuda on a GPU), if built.
NATIVE_HERE = [name for name in backends_here(native=True) if name in ("cpp", "cuda")]
# Sequence lengths around the CUDA kernel's chunk of 32 lanes x 4 tokens = 128 (the scan
# carries its state across chunks), and one long sequence of 24 chunks.
CHUNK_LENGTHS = [127, 128, 129, 1, 0, 3000, 256, 31]


def _cu(lengths, dtype, device):
    return torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0).to(dtype=dtype, device=device)


def test_nan_in_masked_positions_is_never_read(backend, device):
    rewards, values, mask = _padded_inputs(3, 150, torch.float32, device)
    nan_r, nan_v = rewards.masked_fill(~mask, float("nan")), values.masked_fill(~mask, float("nan"))
    for whiten in (True, False):
        clean = ops.gae(rewards, values, mask, gamma=0.9, whiten=whiten, backend=backend)
        for got, want in zip(ops.gae(nan_r, nan_v, mask, gamma=0.9, whiten=whiten, backend=backend), clean):
            assert torch.equal(got, want)
    want = ops.discounted_returns(rewards, mask, gamma=0.9, backend=backend)
    assert torch.equal(ops.discounted_returns(nan_r, mask, gamma=0.9, backend=backend), want)


def test_backend_cuda_on_cpu_tensors_is_refused_by_name():
    args = torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="gae: backend 'cuda' is not available: it runs on cuda tensors"):
        ops.gae(*args, backend="cuda")
    with pytest.raises(RuntimeError, match="discounted_returns: backend 'cuda' is not available"):
        ops.discounted_returns(args[0], args[2], backend="cuda")


@pytest.mark.parametrize("whiten", [True, False])
@pytest.mark.parametrize("gamma,lam", COEFFS)
@pytest.mark.parametrize("backend", NATIVE_HERE)
def test_native_sequences_across_chunk_boundaries(backend, device, gamma, lam, whiten):
    cu = _cu(CHUNK_LENGTHS, torch.int64, device)
    n = int(cu[-1])
    rewards, values = torch.randn(n, device=device), torch.randn(n, device=device)
    mask = torch.rand(n, device=device) > 0.1
    _check_gae(backend, rewards, values, mask, cu, gamma, lam, whiten, torch.float32)
    ref64 = discounted_returns_ref(rewards.double(), mask, gamma=gamma, cu_seqlens=cu)
    baseline = discounted_returns_ref(rewards, mask, gamma=gamma, cu_seqlens=cu)
    out = ops.discounted_returns(rewards, mask, gamma=gamma, cu_seqlens=cu, backend=backend)
    assert_within_tolerance(out, ref64, baseline, torch.float32)


@pytest.mark.parametrize("backend", NATIVE_HERE)
def test_native_reads_strided_inputs(backend, device):
    B, T = 3, 300
    rewards = torch.randn(2 * T, B, device=device).t()[:, ::2]  # strides (1, 2B)
    values = torch.randn(B, T + 5, device=device)[:, 5:]  # row stride T + 5, an offset
    mask = (torch.rand(T, device=device) > 0.2).expand(B, T)  # row stride 0
    strided = ops.gae(rewards, values, mask, gamma=0.9, backend=backend)
    dense = ops.gae(rewards.contiguous(), values.contiguous(), mask.contiguous(), gamma=0.9, backend=backend)
    for got, want in zip(strided, dense):
        assert torch.equal(got, want)
    assert torch.equal(
        ops.discounted_returns(rewards, mask, gamma=0.9, backend=backend),
        ops.discounted_returns(rewards.contiguous(), mask.contiguous(), gamma=0.9, backend=backend),
    )
    cu = _cu([100, 0, 350, 450], torch.int32, device)
    packed_r = torch.randn(3 * 900, device=device)[::3]
    packed_v = torch.randn(900, 2, device=device)[:, 1]
    packed_m = (torch.rand(900, 2, device=device) > 0.2)[:, 0]
    strided = ops.gae(packed_r, packed_v, packed_m, cu_seqlens=cu, backend=backend)
    dense = ops.gae(packed_r.contiguous(), packed_v.contiguous(), packed_m.contiguous(), cu_seqlens=cu, backend=backend)
    for got, want in zip(strided, dense):
        assert torch.equal(got, want)


@pytest.mark.parametrize("cu_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.uint8, torch.int32, torch.int64, torch.float16, torch.float32])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("backend", NATIVE_HERE)
def test_native_every_dtype(backend, device, dtype, mask_dtype, cu_dtype):
    cu = _cu([40, 0, 170, 3], cu_dtype, device)
    n = int(cu[-1])
    rewards, values = torch.randn(n, device=device).to(dtype), torch.randn(n, device=device).to(dtype)
    valid = torch.rand(n, device=device) > 0.25
    # A mask that is not 0/1: read as mask != 0, also as the whitening weights.
    mask = valid if mask_dtype == torch.bool else (valid.to(mask_dtype) * (0.5 if mask_dtype.is_floating_point else 3))
    # The kernels compute in fp32: an fp64 input is held to fp32's budget.
    budget_dtype = torch.float32 if dtype == torch.float64 else dtype
    for whiten in (True, False):
        ref64 = gae_ref(rewards.double(), values.double(), valid, gamma=0.9, lam=0.95, whiten=whiten, cu_seqlens=cu)
        r, v = rewards.to(budget_dtype), values.to(budget_dtype)
        baseline = gae_ref(r, v, valid, gamma=0.9, lam=0.95, whiten=whiten, cu_seqlens=cu)
        got = ops.gae(rewards, values, mask, gamma=0.9, lam=0.95, whiten=whiten, cu_seqlens=cu, backend=backend)
        assert_within_tolerance(got[0], ref64[0], baseline[0], budget_dtype, "advantages")
        assert_within_tolerance(got[1], ref64[1], baseline[1], budget_dtype, "returns")
        same = ops.gae(rewards, values, valid, gamma=0.9, lam=0.95, whiten=whiten, cu_seqlens=cu, backend=backend)
        assert all(torch.equal(a, b) for a, b in zip(got, same))
    ref64 = discounted_returns_ref(rewards.double(), valid, gamma=0.9, cu_seqlens=cu)
    baseline = discounted_returns_ref(rewards.to(budget_dtype), valid, gamma=0.9, cu_seqlens=cu)
    out = ops.discounted_returns(rewards, mask, gamma=0.9, cu_seqlens=cu, backend=backend)
    assert_within_tolerance(out, ref64, baseline, budget_dtype)


@pytest.mark.skipif(not native_runs_on("cpp", torch.device("cpu")), reason="rlhf_engine._C is not built")
def test_cpp_results_do_not_depend_on_the_thread_count():
    from rlhf_engine.native.gae import discounted_returns_fwd, gae_fwd

    # Over 2**14 tokens, so the whitening's fixed chunks (csrc/include/rlhf/chunks.h) are several.
    cu = _cu(torch.randint(0, 300, (150,)).tolist(), torch.int64, torch.device("cpu"))
    n = int(cu[-1])
    rewards, values, mask = torch.randn(n), torch.randn(n), torch.rand(n) > 0.2
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 4):
            torch.set_num_threads(count)
            adv, ret = gae_fwd(rewards, values, mask, 0.99, 0.95, True, cu)
            results.append((adv, ret, discounted_returns_fwd(rewards, mask, 0.99, cu)))
    finally:
        torch.set_num_threads(threads)
    for one, four in zip(*results):
        assert torch.equal(one, four)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_backend_matches_reference(dtype):
    device = torch.device("cuda")
    for whiten in (True, False):
        for gamma, lam in COEFFS:
            rewards, values, mask = _padded_inputs(5, 1100, dtype, device)
            _check_gae("cuda", rewards, values, mask, None, gamma, lam, whiten, dtype)
            cu = _cu(CHUNK_LENGTHS, torch.int32, device)
            n = int(cu[-1])
            rewards, values = torch.randn(n, device=device).to(dtype), torch.randn(n, device=device).to(dtype)
            mask = torch.rand(n, device=device) > 0.25
            _check_gae("cuda", rewards, values, mask, cu, gamma, lam, whiten, dtype)
            ref64 = discounted_returns_ref(rewards.double(), mask, gamma=gamma, cu_seqlens=cu)
            baseline = discounted_returns_ref(rewards, mask, gamma=gamma, cu_seqlens=cu)
            out = ops.discounted_returns(rewards, mask, gamma=gamma, cu_seqlens=cu, backend="cuda")
            assert_within_tolerance(out, ref64, baseline, dtype)


@pytest.mark.gpu
def test_cuda_backend_captures_in_cuda_graph():
    rewards = torch.randn(64, 700, device="cuda")
    values = torch.randn(64, 700, device="cuda")
    mask = torch.rand(64, 700, device="cuda") > 0.2
    cu = torch.tensor([0, 100, 100, 44800], dtype=torch.int32, device="cuda")

    def step():
        adv, ret = ops.gae(rewards, values, mask, gamma=0.99, backend="cuda")
        packed, _ = ops.gae(rewards.view(-1), values.view(-1), mask.view(-1), cu_seqlens=cu, backend="cuda")
        return adv, ret, packed, ops.discounted_returns(rewards, mask, gamma=0.99, backend="cuda")

    assert_replay_matches_eager(step)
