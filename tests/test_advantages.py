"""group_advantages and masked_whiten: every backend vs the float64 reference, hand-computed
cases that pin the semantics (singletons per preset, RLOO, OPO, zero variance), and errors."""

import pytest
import torch

from rlhf_engine import ops
from rlhf_engine._backend import native_runs_on
from rlhf_engine.reference.advantages import group_advantages_ref, masked_whiten_ref
from tests.graphs import assert_replay_matches_eager
from tests.tolerance import assert_within_tolerance

NATIVE_BACKENDS = True

GRPO_EPS = {"trl": 1e-4, "verl": 1e-6}
DEVICE_TYPE = "cuda" if torch.cuda.is_available() else "cpu"

# (S, G) for the grid, and why each is there:
GROUP_SHAPES = [
    (1, 1),  # S=1: one singleton group, and a batch std over a single score
    (6, 1),  # G=1: every group is a singleton (the presets differ on all of them)
    (15, 5),  # G not a power of two: the tile kernel pads the group axis with masked lanes
    (2080, 16),  # 130 groups: several tile programs, and several id-path programs (> 1024 samples)
]
METHOD_SCALES = [
    ("grpo", "group"),
    ("grpo", "batch"),
    ("grpo", "none"),
    ("dr_grpo", "group"),
    ("rloo", "group"),
    ("reinforce_pp_baseline", "group"),
    ("opo", "group"),
]


def _eps(method, scale, preset):
    if method == "reinforce_pp_baseline":
        return 1e-8
    return GRPO_EPS[preset] if method == "grpo" and scale != "none" else None


def _ref(scores, ids, method, scale, preset, lengths):
    eps = _eps(method, scale, preset) or 0.0
    return group_advantages_ref(scores, ids, method=method, scale=scale, eps=eps, preset=preset, lengths=lengths)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("preset", ["trl", "verl"])
@pytest.mark.parametrize("method,scale", METHOD_SCALES)
@pytest.mark.parametrize("S,G", GROUP_SHAPES)
def test_group_advantages_matches_reference(backend, device, S, G, method, scale, preset, dtype):
    scores = torch.randn(S, device=device).to(dtype)
    uses_lengths = method in ("opo", "reinforce_pp_baseline")
    lengths = torch.randint(0, 6, (S,), device=device) if uses_lengths else None
    ids = torch.arange(S, device=device) // G
    ref64 = _ref(scores.double(), ids, method, scale, preset, lengths)
    baseline = _ref(scores, ids, method, scale, preset, lengths)
    kwargs = dict(method=method, scale=scale, preset=preset, lengths=lengths, backend=backend)
    by_size = ops.group_advantages(scores, group_size=G, **kwargs)
    by_ids = ops.group_advantages(scores, group_ids=ids, num_groups=S // G, **kwargs)
    assert by_size.dtype == by_ids.dtype == torch.float32
    assert_within_tolerance(by_size, ref64, baseline, dtype, "group_size layout")
    assert_within_tolerance(by_ids, ref64, baseline, dtype, "group_ids layout")


def test_group_ids_in_any_order_match_consecutive_layout(backend, device):
    # Scattered ids (a shuffled batch) must give the consecutive layout's answer, permuted.
    scores = torch.randn(24, device=device)
    perm = torch.randperm(24, device=device)
    ids = (torch.arange(24, device=device) // 4)[perm]
    for method in ("grpo", "rloo"):
        consecutive = ops.group_advantages(scores, group_size=4, method=method, backend=backend)
        shuffled = ops.group_advantages(scores[perm], group_ids=ids, num_groups=6, method=method, backend=backend)
        torch.testing.assert_close(shuffled, consecutive[perm])


def test_zero_variance_group_is_finite_zero(backend, device):
    scores = torch.tensor([2.0, 2.0, 2.0, 1.0, 3.0, 5.0], device=device)
    out = ops.group_advantages(scores, group_size=3, backend=backend)
    # group 0: 0/(0 + eps) = 0; group 1: mean 3, unbiased std 2.
    expected = torch.tensor([0.0, 0.0, 0.0, -2.0 / (2 + 1e-4), 0.0, 2.0 / (2 + 1e-4)])
    torch.testing.assert_close(out.cpu(), expected)


@pytest.mark.parametrize(
    "method,scale,trl,verl",
    [
        # trl: the lone sample is its own baseline -> 0; verl: baseline 0, std 1 -> keeps its score.
        ("grpo", "group", 0.0, 3.0 / (1 + 1e-6)),
        ("grpo", "batch", 0.0, 3.0 / (1 + 1e-6)),  # batch std over one score: 0 (trl) / 1 (verl)
        ("grpo", "none", 0.0, 3.0),
        ("dr_grpo", "group", 0.0, 3.0),
        ("rloo", "group", 0.0, 3.0),  # verl's per-group loop (its vectorized path would give 0)
        ("opo", "group", 0.0, 3.0),
    ],
)
def test_singleton_group_per_preset(backend, device, method, scale, trl, verl):
    scores = torch.tensor([3.0], device=device)
    lengths = torch.tensor([4], device=device) if method == "opo" else None
    for preset, expected in (("trl", trl), ("verl", verl)):
        for layout in (dict(group_size=1), dict(group_ids=torch.zeros(1, dtype=torch.long, device=device), num_groups=1)):
            out = ops.group_advantages(
                scores, method=method, scale=scale, preset=preset, lengths=lengths, backend=backend, **layout
            )
            torch.testing.assert_close(out.cpu(), torch.tensor([expected]), rtol=1e-6, atol=1e-7)


def test_singleton_next_to_full_groups(backend, device):
    # A singleton among regular groups (ids path): only the singleton follows the preset rule.
    scores = torch.tensor([1.0, 3.0, 7.0], device=device)
    ids = torch.tensor([0, 0, 1], device=device)
    trl = ops.group_advantages(scores, group_ids=ids, num_groups=2, method="dr_grpo", backend=backend)
    verl = ops.group_advantages(scores, group_ids=ids, num_groups=2, method="dr_grpo", preset="verl", backend=backend)
    torch.testing.assert_close(trl.cpu(), torch.tensor([-1.0, 1.0, 0.0]))
    torch.testing.assert_close(verl.cpu(), torch.tensor([-1.0, 1.0, 7.0]))


def test_rloo_is_leave_one_out(backend, device):
    scores = torch.tensor([1.0, 2.0, 6.0], device=device)
    out = ops.group_advantages(scores, group_size=3, method="rloo", backend=backend)
    # 1 - (2+6)/2, 2 - (1+6)/2, 6 - (1+2)/2
    torch.testing.assert_close(out.cpu(), torch.tensor([-3.0, -1.5, 4.5]))


def test_opo_length_weighted_baseline(backend, device):
    scores = torch.tensor([1.0, 3.0, 2.0, 4.0], device=device)
    lengths = torch.tensor([3, 1, 0, 0], device=device)
    out = ops.group_advantages(scores, group_size=2, method="opo", lengths=lengths, backend=backend)
    # group 0: b = (3*1 + 1*3)/4 = 1.5; group 1 has no tokens: falls back to the plain mean 3.
    torch.testing.assert_close(out.cpu(), torch.tensor([-0.5, 1.5, -1.0, 1.0]))


def test_reinforce_pp_baseline_equals_token_level_whitening(backend, device):
    # Whitening s - mu_g broadcast over each sequence's tokens == length-weighted whitening.
    scores = torch.randn(8, device=device)
    lengths = torch.tensor([3, 1, 4, 2, 5, 0, 2, 3], device=device)
    out = ops.group_advantages(scores, group_size=4, method="reinforce_pp_baseline", lengths=lengths, backend=backend)
    centered = (scores.view(2, 4) - scores.view(2, 4).mean(1, keepdim=True)).reshape(-1).double()
    token_mask = torch.arange(5, device=device)[None, :] < lengths[:, None]
    tokens = masked_whiten_ref(centered[:, None].expand(8, 5), token_mask)
    expected = torch.where(lengths > 0, tokens[:, 0], 0.0)  # every token of a sequence holds its value
    torch.testing.assert_close(out.double().cpu(), expected.cpu(), rtol=1e-5, atol=1e-6)


def test_batch_scale_divides_by_std_of_all_scores(backend, device):
    scores = torch.randn(12, device=device)
    out = ops.group_advantages(scores, group_size=3, scale="batch", backend=backend)
    grouped = scores.view(4, 3)
    expected = ((grouped - grouped.mean(1, keepdim=True)) / (scores.std() + 1e-4)).reshape(-1)
    torch.testing.assert_close(out, expected)


def test_outputs_carry_no_gradient(backend, device):
    scores = torch.randn(4, device=device, requires_grad=True)
    assert not ops.group_advantages(scores, group_size=2, backend=backend).requires_grad
    assert not ops.masked_whiten(scores, torch.ones(4, dtype=torch.bool, device=device), backend=backend).requires_grad


def test_group_advantages_compiles_without_graph_breaks(backend, device):
    # aot_eager traces through dynamo and the fake kernels like inductor does, minus codegen time.
    scores = torch.randn(12, device=device)
    ids = torch.arange(12, device=device) // 3

    def fn(s, i):
        a = ops.group_advantages(s, group_size=3, backend=backend)
        b = ops.group_advantages(s, group_ids=i, num_groups=4, method="rloo", backend=backend)
        return a, b

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(scores, ids), fn(scores, ids)):
        torch.testing.assert_close(got, want)


# ------------------------------------------------ group_advantages: the native code

# The native backend of this machine's test device; these tests check what is specific to
# its code (fixed chunks, the id tiles, dtypes, strides, bad ids).
NATIVE = "cuda" if DEVICE_TYPE == "cuda" else "cpp"
needs_native = pytest.mark.skipif(
    not native_runs_on(NATIVE, torch.device(DEVICE_TYPE)), reason=f"rlhf_engine._C cannot run {NATIVE!r} here"
)
CHUNK = 1 << 14  # csrc/include/rlhf/chunks.h kChunk: the host twin's unit of work
ALL_METHODS = METHOD_SCALES + [("reinforce_pp_baseline", "no lengths")]


def _native_case(method, scale, S, device, lengths_dtype=torch.int64):
    lengths = None
    if method in ("opo", "reinforce_pp_baseline") and scale != "no lengths":
        lengths = torch.randint(0, 6, (S,), device=device).to(lengths_dtype)
    return ("group" if scale == "no lengths" else scale), lengths


@needs_native
@pytest.mark.parametrize("method,scale", ALL_METHODS)
def test_native_group_advantages_over_several_chunks_and_id_tiles(device, method, scale):
    # More scores than one host chunk (and than many 1024-id tiles of the CUDA scan), groups of
    # 16 shuffled over the batch, a few singletons, both presets, against the float64 reference.
    S = 2 * CHUNK + 48
    scale, lengths = _native_case(method, scale, S, device)
    scores = torch.randn(S, device=device)
    ids = (torch.arange(S, device=device) // 16)[torch.randperm(S, device=device)]
    ids[:3] = S // 16 + torch.arange(3, device=device)  # three singleton groups
    num_groups = S // 16 + 3
    for preset in ("trl", "verl"):
        kwargs = dict(method=method, scale=scale, preset=preset, lengths=lengths, backend=NATIVE)
        ref64 = _ref(scores.double(), ids, method, scale, preset, lengths)
        baseline = _ref(scores, ids, method, scale, preset, lengths)
        out = ops.group_advantages(scores, group_ids=ids, num_groups=num_groups, **kwargs)
        assert_within_tolerance(out, ref64, baseline, torch.float32, f"group_ids {preset}")
        fixed_ids = torch.arange(S, device=device) // 16
        ref64 = _ref(scores.double(), fixed_ids, method, scale, preset, lengths)
        baseline = _ref(scores, fixed_ids, method, scale, preset, lengths)
        out = ops.group_advantages(scores, group_size=16, **kwargs)
        assert_within_tolerance(out, ref64, baseline, torch.float32, f"group_size {preset}")


@needs_native
@pytest.mark.skipif(DEVICE_TYPE != "cpu", reason="the host twin's OpenMP threads")
@pytest.mark.parametrize("method,scale", ALL_METHODS)
def test_cpp_group_advantages_do_not_depend_on_the_thread_count(device, method, scale):
    S = 7 * 7100  # three chunks and a part
    scale, lengths = _native_case(method, scale, S, device)
    scores = torch.randn(S, device=device)
    ids = torch.randint(0, 700, (S,), device=device)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 4):
            torch.set_num_threads(count)
            for layout in (dict(group_size=7), dict(group_ids=ids, num_groups=700)):
                kwargs = dict(method=method, scale=scale, lengths=lengths, backend="cpp")
                results.append(ops.group_advantages(scores, **layout, **kwargs))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[2]) and torch.equal(results[1], results[3])


@needs_native
@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("lengths_dtype", [torch.int32, torch.int64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_native_group_advantages_every_dtype(device, dtype, lengths_dtype, ids_dtype):
    S = 96
    scores = torch.randn(S, device=device).to(dtype)
    ids = (torch.arange(S, device=device) // 6)[torch.randperm(S, device=device)].to(ids_dtype)
    lengths = torch.randint(0, 6, (S,), device=device).to(lengths_dtype)
    # The kernels compute in fp32 whatever the input: a float64 input's budget is fp32's.
    budget_dtype = torch.float32 if dtype == torch.float64 else dtype
    for method, scale in (("grpo", "group"), ("grpo", "batch"), ("opo", "group"), ("reinforce_pp_baseline", "group")):
        uses = method != "grpo"
        ref64 = _ref(scores.double(), ids.long(), method, scale, "trl", lengths if uses else None)
        baseline = _ref(scores.to(budget_dtype), ids.long(), method, scale, "trl", lengths if uses else None)
        out = ops.group_advantages(
            scores, group_ids=ids, num_groups=S // 6, method=method, scale=scale,
            lengths=lengths if uses else None, backend=NATIVE,
        )
        assert out.dtype == torch.float32
        assert_within_tolerance(out, ref64, baseline, budget_dtype, f"{method}/{scale}")


@needs_native
def test_native_group_advantages_strided_inputs(device):
    # The launcher makes views contiguous (as the Triton launcher does): same values as the copies.
    strided = torch.randn(120, device=device)[::2]
    lengths = torch.randint(0, 5, (120,), device=device)[::2]
    ids = torch.randint(0, 8, (120,), device=device)[::2]
    assert not strided.is_contiguous() and not ids.is_contiguous()
    for method in ("grpo", "opo"):
        kwargs = dict(method=method, lengths=lengths if method == "opo" else None, backend=NATIVE)
        got = ops.group_advantages(strided, group_ids=ids, num_groups=8, **kwargs)
        want = ops.group_advantages(strided.contiguous(), group_ids=ids.contiguous(), num_groups=8, **kwargs)
        assert torch.equal(got, want)
        got = ops.group_advantages(strided, group_size=5, **kwargs)
        assert torch.equal(got, ops.group_advantages(strided.contiguous(), group_size=5, **kwargs))


@needs_native
def test_native_group_advantages_bad_id_gives_nan(device):
    # The op checks ids on the CPU only (a check would sync on the GPU); the kernels write NaN
    # for an id outside [0, num_groups), like the Triton kernel, and leave it out of every group.
    from rlhf_engine.native.advantages import group_advantages_fwd

    scores = torch.tensor([1.0, 100.0, 3.0, 5.0, -100.0, 9.0], device=device)
    ids = torch.tensor([0, 2, 0, 1, -1, 1], device=device)
    out = group_advantages_fwd(scores, ids, None, 0, 2, "dr_grpo", "group", 0.0, "trl").cpu()
    assert torch.isnan(out[[1, 4]]).all()
    torch.testing.assert_close(out[[0, 2, 3, 5]], torch.tensor([-1.0, 1.0, -2.0, 2.0]))


def test_backend_cuda_refuses_cpu_scores():
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
        ops.group_advantages(torch.randn(4), group_size=2, backend="cuda")


# ---------------------------------------------------------------------- masked_whiten

# Why each shape: N=1; a row length off every block size with a fully masked row;
# more elements than one 1024-wide program block so the grid-stride loop and the
# cross-program partial sums run.
WHITEN_SHAPES = [(1,), (4, 37), (3, 1100)]


@pytest.mark.parametrize("shift_mean", [True, False])
@pytest.mark.parametrize("mask_kind", ["bool", "float_weights"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", WHITEN_SHAPES)
def test_masked_whiten_matches_reference(backend, device, shape, dtype, mask_kind, shift_mean):
    x = (torch.randn(shape, device=device) * 3 + 1).to(dtype)
    valid = torch.rand(shape, device=device) > 0.3
    if len(shape) > 1:
        valid[1] = False  # a fully masked row
    mask = valid if mask_kind == "bool" else valid * torch.rand(shape, device=device) * 2
    if x.numel() == 1:
        # A single value of weight > 1 is a constant with a defined variance of ~0: any
        # fp32 implementation's last-bit error in μ is then amplified by rsqrt(eps). N=1
        # is here for the Σw ≤ 1 rule, so keep its weight in [0, 1].
        mask = mask.clamp(max=1)
    ref64 = masked_whiten_ref(x.double(), mask.double(), shift_mean)
    baseline = masked_whiten_ref(x, mask.to(dtype), shift_mean)
    out = ops.masked_whiten(x, mask, shift_mean=shift_mean, backend=backend)
    assert out.dtype == torch.float32
    assert_within_tolerance(out, ref64, baseline, dtype)


def test_masked_whiten_one_valid_token(backend, device):
    # Unbiased variance of one value is undefined: var = 0, so the token gets 0 (x unshifted).
    x = torch.tensor([[5.0, 7.0, -2.0]], device=device)
    mask = torch.tensor([[False, True, False]], device=device)
    torch.testing.assert_close(ops.masked_whiten(x, mask, backend=backend).cpu(), torch.zeros(1, 3))
    unshifted = ops.masked_whiten(x, mask, shift_mean=False, backend=backend)
    torch.testing.assert_close(unshifted.cpu(), torch.tensor([[0.0, 7.0, 0.0]]))


def test_masked_whiten_all_masked_and_padding_ignored(backend, device):
    x = torch.tensor([1.0, 1e30, 3.0, -7.0], device=device)
    none = torch.zeros(4, dtype=torch.bool, device=device)
    torch.testing.assert_close(ops.masked_whiten(x, none, backend=backend).cpu(), torch.zeros(4))
    mask = torch.tensor([True, False, True, False], device=device)
    out = ops.masked_whiten(x, mask, backend=backend).cpu()
    # mean 2, unbiased var 2: (x - 2)/sqrt(2); the (finite) padding values do not count and get 0.
    torch.testing.assert_close(out, torch.tensor([-(0.5**0.5), 0.0, 0.5**0.5, 0.0]))


@pytest.mark.parametrize("shape", WHITEN_SHAPES)
def test_masked_whiten_bool_mask_matches_its_0_1_weights(device, shape):
    # The torch backend has its own path for bool masks (x centered in place as x·w − μ·w,
    # the spread as a norm): it must give what the 0/1 weights give, up to the rounding of
    # the two variance reductions, and exact zeros where masked.
    x = torch.randn(shape, device=device) * 3 + 1
    valid = torch.rand(shape, device=device) > 0.3
    for shift_mean in (True, False):
        as_bool = ops.masked_whiten(x, valid, shift_mean=shift_mean, backend="torch")
        as_weights = ops.masked_whiten(x, valid.float(), shift_mean=shift_mean, backend="torch")
        torch.testing.assert_close(as_bool, as_weights, rtol=1e-6, atol=1e-6)
        assert torch.equal(as_bool[~valid], torch.zeros_like(as_bool[~valid]))


def test_masked_whiten_compiles_without_graph_breaks(backend, device):
    x = torch.randn(3, 10, device=device)
    mask = torch.rand(3, 10, device=device) > 0.5
    fn = lambda x, m: ops.masked_whiten(x, m, backend=backend)  # noqa: E731
    torch.testing.assert_close(torch.compile(fn, fullgraph=True, backend="aot_eager")(x, mask), fn(x, mask))


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(group_size=5), ValueError, "group_size"),  # 12 not a multiple of 5
        (dict(), ValueError, "group_size and group_ids"),  # neither
        (dict(group_size=3, group_ids=torch.zeros(12, dtype=torch.long)), ValueError, "group_size and group_ids"),
        (dict(group_size=3, method="ppo"), ValueError, "method"),
        (dict(group_size=3, scale="token"), ValueError, "scale"),
        (dict(group_size=3, preset="openrlhf"), ValueError, "preset"),
        (dict(group_size=3, method="rloo", scale="batch"), ValueError, "scale"),
        (dict(group_size=3, method="rloo", eps=1e-3), ValueError, "eps"),
        (dict(group_size=3, method="opo"), ValueError, "lengths"),
        (dict(group_size=3, lengths=torch.ones(12)), ValueError, "lengths"),  # grpo takes no lengths
        (dict(group_size=3, method="opo", lengths=torch.ones(11)), ValueError, "lengths"),
        (dict(group_size=3, method="opo", lengths=torch.ones(12, dtype=torch.bool)), TypeError, "lengths"),
        (dict(group_ids=torch.zeros(12)), TypeError, "group_ids"),  # float ids
        (dict(group_ids=torch.zeros(11, dtype=torch.long)), ValueError, "group_ids"),
        (dict(group_ids=torch.full((12,), 4), num_groups=4), ValueError, "group_ids"),  # out of range
        (dict(group_ids=torch.zeros(12, dtype=torch.long), num_groups=-1), ValueError, "num_groups"),
        (dict(group_size=3, num_groups=5), ValueError, "num_groups"),
        (dict(group_size=3, group_ids=None, backend="cudnn"), ValueError, "backend"),
        (dict(group_size=3, method="opo", lengths=torch.ones(12, device="meta")), ValueError, "lengths"),
    ],
)
def test_group_advantages_rejects_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        ops.group_advantages(torch.randn(12), **kwargs)


def test_group_advantages_rejects_bad_scores():
    with pytest.raises(TypeError, match="scores"):
        ops.group_advantages(torch.zeros(4, dtype=torch.complex64), group_size=2)
    with pytest.raises(TypeError, match="scores"):
        ops.group_advantages([1.0, 0.0, 1.0, 1.0], group_size=2)
    with pytest.raises(ValueError, match="scores"):
        ops.group_advantages(torch.randn(2, 2), group_size=2)


def test_masked_whiten_rejects_bad_input():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="mask"):
        ops.masked_whiten(x, torch.ones(3, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="x"):
        ops.masked_whiten(torch.ones(3, 4, dtype=torch.long), torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask"):
        ops.masked_whiten(x, torch.ones(3, 4, dtype=torch.bool, device="meta"))
    with pytest.raises(ValueError, match="eps"):
        ops.masked_whiten(x, torch.ones(3, 4, dtype=torch.bool), eps=-1.0)


# ------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_group_advantages_and_whiten_capture_in_cuda_graph():
    # Capture fails on any host sync, so this proves the GPU path never syncs.
    scores = torch.randn(4096, device="cuda")
    ids = torch.randint(0, 512, (4096,), device="cuda")
    lengths = torch.randint(1, 100, (4096,), device="cuda")
    mask = torch.rand(4096, device="cuda") > 0.5

    def step():
        return (
            ops.group_advantages(scores, group_ids=ids, num_groups=512, scale="batch"),
            ops.group_advantages(scores, group_size=8, method="reinforce_pp_baseline", lengths=lengths),
            ops.masked_whiten(scores, mask),
        )

    assert_replay_matches_eager(step)


@pytest.mark.gpu
@pytest.mark.skipif(not native_runs_on("cuda", torch.device("cuda")), reason="rlhf_engine._C was built without CUDA")
@pytest.mark.parametrize("method,scale", ALL_METHODS)
def test_cuda_group_advantages_match_reference_and_repeat_bitwise(method, scale):
    # The CUDA kernels against the float64 reference on both layouts (ids over many tiles,
    # groups of 8 shuffled, a singleton), and the same bits on a second call (no atomics).
    S = 5000
    scale, lengths = _native_case(method, scale, S, "cuda")
    scores = torch.randn(S, device="cuda")
    ids = (torch.arange(S, device="cuda") // 8)[torch.randperm(S, device="cuda")]
    ids[0] = S // 8
    for preset in ("trl", "verl"):
        kwargs = dict(method=method, scale=scale, preset=preset, lengths=lengths, backend="cuda")
        for layout, group_ids in ((dict(group_ids=ids, num_groups=S // 8 + 1), ids),
                                  (dict(group_size=8), torch.arange(S, device="cuda") // 8)):
            host_lengths = None if lengths is None else lengths.cpu()
            ref64 = _ref(scores.double().cpu(), group_ids.cpu(), method, scale, preset, host_lengths)
            baseline = _ref(scores.cpu(), group_ids.cpu(), method, scale, preset, host_lengths)
            out = ops.group_advantages(scores, **layout, **kwargs)
            assert_within_tolerance(out.cpu(), ref64, baseline, torch.float32, f"{sorted(layout)} {preset}")
            assert torch.equal(out, ops.group_advantages(scores, **layout, **kwargs))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_integer_and_bool_scores_read_as_fp32(backend, device, dtype):
    # pass / fail rewards: the same advantages as the fp32 scores of the same values
    values = torch.tensor([1, 0, 0, 1, 1, 1, 0, 1], device=device)
    scores = values.bool() if dtype == torch.bool else values.to(dtype)
    got = ops.group_advantages(scores, group_size=4, method="grpo", backend=backend)
    want = ops.group_advantages(values.float(), group_size=4, method="grpo", backend=backend)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert got.abs().sum() > 0
