"""Every public op under ``FakeTensorMode`` (shapes, dtypes and devices, no data), as a
memory planner traces whole training phases at real size on the CPU, with
``MemTracker`` counting the bytes.

What the ops guarantee there (``torch_backend/aggregation.host_readable``): a fake tensor
takes the path of device tensors, so nothing reads a value (no ``.item()``, no
value-dependent output shape such as ``nonzero`` / ``bincount``, no ``tolist`` of
``cu_seqlens``); validation that reads values (label range, ``cu_seqlens`` rising from 0
to N, group id range) is skipped for fake tensors, and the shape / dtype / device checks
still run. No CPU cache (the 0-d constants of ``scalar``, the logprobs scratch workspace)
is filled with a fake tensor.

Backends on fake ``cuda`` tensors: ``"auto"`` picks triton as it does for real CUDA
tensors (what the planned run will use). On that backend every op is a ``torch.library``
custom op, and ``FakeTensorMode`` runs its registered fake (shape) function: no kernel is
launched. ``"torch"`` runs the plain PyTorch bodies on the fake tensors.

A CPU-only torch build has no CUDA device guard: torch installs its fake one only in
CUDA builds. There, autograd through fake ``cuda`` tensors aborts the whole process and
some ATen ops (``copy_``, arithmetic on slices) raise, so fake ``cuda`` runs forward
only, on the triton backend's custom ops; on a CUDA build (with or without a GPU) they
run forward and backward on every backend. A planner on a CPU-only machine traces with
fake CPU tensors.
"""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker

from rlhf_engine import ops
from rlhf_engine._backend import resolve_backend, triton_importable
from rlhf_engine.ops._lm_head_chunks import chunk_rows_for
from rlhf_engine.torch_backend import aggregation
from rlhf_engine.torch_backend import logprobs as logprobs_module
from rlhf_engine.reference.advantages import METHODS
from rlhf_engine.reference.aggregation import AGGREGATIONS
from rlhf_engine.reference.kl import ESTIMATORS
from rlhf_engine.reference.policy_loss import LOSSES

CUDA_BUILT = torch.backends.cuda.is_built()
CPU_BUILD_REASON = (
    "CPU-only torch build: autograd through fake cuda tensors aborts the process (torch installs its fake "
    "CUDA device guard only in CUDA builds)"
)

# Small shapes: the outputs' shapes, not their values, are under test. V and H odd sizes
# so no shape lines up with a block or chunk size by luck.
B, T, V, H = 3, 7, 37, 12
N = B * T
CU = [0, 5, 5, 21]  # packed: three sequences, an empty one among them, N tokens
S = len(CU) - 1
BF16 = torch.bfloat16

# Options that switch on every term of each loss (cispo-trl needs its raw clip_high).
LOSS_OPTIONS = {
    "ppo": dict(clip_high=0.28, dual_clip=3.0, delta=1.5),
    "gspo": dict(clip_low=0.02, clip_high=0.03),
    "cispo": dict(clip_high=0.28),
    "cispo-trl": dict(clip_high=1.3),
    "sapo": {},
    "reinforce": {},
    "dppo_tv": dict(clip_low=0.05, clip_high=0.08, delta=1.5),
    "dppo_kl": dict(clip_low=0.01, clip_high=0.02, delta=1.5),
    "geo_mean": dict(clip_low=0.2, clip_high=0.25),
}


def _leaf(x):
    return x.requires_grad_()


def _tokens(dev, packed):
    """``(token shape, cu_seqlens or None, sequences)`` of a padded ``[B, T]`` or packed ``[N]`` batch."""
    if packed:
        return (N,), torch.tensor(CU, dtype=torch.int32, device=dev), S
    return (B, T), None, B


def _mask(shape, dev, float_mask=False):
    mask = torch.rand(shape, device=dev) > 0.3
    return mask * torch.rand(shape, device=dev) if float_mask else mask


# Each case builds its inputs on a device and calls the op: ``case(dev) -> (output, leaves)``,
# ``leaves`` the inputs that take a gradient ([] for the ops that produce RL targets).


def _token_logprobs(dev, dtype, entropy):
    logits = _leaf(torch.randn(B, T, V, dtype=dtype, device=dev))
    labels = torch.randint(-1, V, (B, T), device=dev)  # -1: ignored positions
    return ops.token_logprobs(logits, labels, ignore_index=-1, return_entropy=entropy), [logits]


def _fused_linear_logprobs(dev, bias, entropy):
    hidden, weight = _leaf(torch.randn(B, T, H, dtype=BF16, device=dev)), _leaf(torch.randn(V, H, dtype=BF16, device=dev))
    b = _leaf(torch.randn(V, dtype=BF16, device=dev)) if bias else None
    labels = torch.randint(0, V, (B, T), device=dev)
    out = ops.fused_linear_logprobs(hidden, weight, labels, bias=b, return_entropy=entropy, chunk_size=4)
    return out, [hidden, weight] + ([b] if bias else [])


def _sequence_logprobs(dev, packed):
    shape, cu, _ = _tokens(dev, packed)
    hidden, weight = _leaf(torch.randn(shape + (H,), device=dev)), _leaf(torch.randn(V, H, device=dev))
    labels = torch.randint(0, V, shape, device=dev)
    return ops.sequence_logprobs(hidden, weight, labels, _mask(shape, dev), cu_seqlens=cu), [hidden, weight]


def _policy_inputs(dev, packed, per_seq):
    shape, cu, seqs = _tokens(dev, packed)
    return dict(
        old_logp=-torch.rand(shape, device=dev),
        advantages=torch.randn(seqs if per_seq else shape, device=dev),
        mask=_mask(shape, dev, float_mask=per_seq),
        ref_logp=-torch.rand(shape, device=dev),
        kl_coef=0.1,
        is_weights=torch.rand(shape, device=dev) + 0.5,
        cu_seqlens=cu,
    ), shape


def _policy_loss(dev, loss, aggregation, packed):
    per_seq = aggregation == "token-sum"  # one layout per aggregation has per-sequence advantages
    kw, shape = _policy_inputs(dev, packed, per_seq)
    logp, entropy = _leaf(-torch.rand(shape, device=dev)), _leaf(torch.rand(shape, dtype=BF16, device=dev))
    normalizer = torch.tensor(11.0, device=dev) if aggregation == "token-mean" else None
    out = ops.policy_loss(
        logp, loss=loss, aggregation=aggregation, entropy=entropy, entropy_coef=0.01, normalizer=normalizer, **kw,
        **LOSS_OPTIONS[loss],
    )
    return out, [logp, entropy]


def _fused_linear_policy_loss(dev, loss, aggregation, packed):
    kw, shape = _policy_inputs(dev, packed, per_seq=aggregation == "token-sum")
    hidden, weight = _leaf(torch.randn(shape + (H,), dtype=BF16, device=dev)), _leaf(torch.randn(V, H, dtype=BF16, device=dev))
    labels = torch.randint(0, V, shape, device=dev)
    out = ops.fused_linear_policy_loss(
        hidden, weight, labels, loss=loss, aggregation=aggregation, entropy_coef=0.01, return_logprobs=True,
        chunk_size=5, **kw, **LOSS_OPTIONS[loss],
    )
    return out, [hidden, weight]


def _cov_loss(dev, name, packed):
    """clip_cov / kl_cov: on fake tensors the pre-pass runs without picking (no values)."""
    kw, shape = _policy_inputs(dev, packed, per_seq=packed)
    del kw["ref_logp"], kw["kl_coef"]
    logp = _leaf(-torch.rand(shape, device=dev))
    if name == "clip_cov_loss":
        return ops.clip_cov_loss(logp, **kw, clip_cov_ratio=0.2, clip_cov_lb=0.0), [logp]
    return ops.kl_cov_loss(logp, **kw, kl_cov_ratio=0.2, aggregation="seq-mean-token-mean"), [logp]


def _value_loss(dev, aggregation, packed, clip):
    shape, cu, _ = _tokens(dev, packed)
    values = _leaf(torch.randn(shape, dtype=BF16, device=dev))
    out = ops.value_loss(
        values, torch.randn(shape, device=dev), torch.randn(shape, device=dev), _mask(shape, dev), clip=clip,
        aggregation=aggregation, cu_seqlens=cu,
    )
    return out, [values]


def _kl_penalty(dev, estimator):
    logp, ref = _leaf(torch.randn(B, T, device=dev)), _leaf(torch.randn(B, T, dtype=BF16, device=dev))
    return ops.kl_penalty(logp, ref, estimator=estimator, clamp=True), [logp, ref]


def _group_advantages(dev, method, by_ids):
    scores = torch.randn(8, device=dev)
    lengths = torch.randint(0, 9, (8,), device=dev) if method in ("opo", "reinforce_pp_baseline") else None
    grouping = dict(group_ids=torch.arange(8, device=dev) % 2, num_groups=2) if by_ids else dict(group_size=4)
    return ops.group_advantages(scores, method=method, lengths=lengths, **grouping), []


def _masked_whiten(dev, float_mask, shift_mean):
    x = torch.randn(B, T, device=dev)
    return ops.masked_whiten(x, _mask((B, T), dev, float_mask), shift_mean=shift_mean), []


def _gae(dev, packed, whiten):
    shape, cu, _ = _tokens(dev, packed)
    rewards, values = torch.randn(shape, device=dev), torch.randn(shape, device=dev)
    return ops.gae(rewards, values, _mask(shape, dev), whiten=whiten, cu_seqlens=cu), []


def _discounted_returns(dev, packed):
    shape, cu, _ = _tokens(dev, packed)
    return ops.discounted_returns(torch.randn(shape, device=dev), _mask(shape, dev), cu_seqlens=cu), []


def _layout(packed):
    return "packed" if packed else "padded"


CASES = {}
for dtype in (torch.float32, BF16):
    for entropy in (False, True):
        CASES[f"token_logprobs-{str(dtype)[6:]}-entropy{entropy}"] = (_token_logprobs, (dtype, entropy))
for bias in (False, True):
    CASES[f"fused_linear_logprobs-bias{bias}"] = (_fused_linear_logprobs, (bias, not bias))
for packed in (False, True):
    CASES[f"sequence_logprobs-{_layout(packed)}"] = (_sequence_logprobs, (packed,))
    for loss in LOSSES:
        for agg in AGGREGATIONS:
            CASES[f"policy_loss-{loss}-{agg}-{_layout(packed)}"] = (_policy_loss, (loss, agg, packed))
            CASES[f"fused_linear_policy_loss-{loss}-{agg}-{_layout(packed)}"] = (_fused_linear_policy_loss, (loss, agg, packed))
    for name in ("clip_cov_loss", "kl_cov_loss"):
        CASES[f"{name}-{_layout(packed)}"] = (_cov_loss, (name, packed))
    for agg in AGGREGATIONS:
        CASES[f"value_loss-{agg}-{_layout(packed)}"] = (_value_loss, (agg, packed, 0.2 if packed else None))
    for whiten in (False, True):
        CASES[f"gae-{_layout(packed)}-whiten{whiten}"] = (_gae, (packed, whiten))
    CASES[f"discounted_returns-{_layout(packed)}"] = (_discounted_returns, (packed,))
for estimator in ESTIMATORS:
    CASES[f"kl_penalty-{estimator}"] = (_kl_penalty, (estimator,))
for method in METHODS:
    for by_ids in (False, True):
        CASES[f"group_advantages-{method}-{'ids' if by_ids else 'size'}"] = (_group_advantages, (method, by_ids))
for float_mask in (False, True):
    CASES[f"masked_whiten-float_mask{float_mask}"] = (_masked_whiten, (float_mask, not float_mask))

# Every public op has a case (a new op must add one).
assert {name.split("-")[0] for name in CASES} == set(ops.__all__)


def _run(case, dev, backward):
    """The op's outputs (flattened: tensors in order, dict values by key) and the gradients
    of its leaves after a backward of the sum of every differentiable output."""
    fn, args = CASES[case]
    out, leaves = fn(dev, *args)
    flat = _flatten(out)
    if backward and leaves:
        differentiable = [t for t in flat if t.requires_grad]
        assert differentiable, f"{case}: no output carries a gradient"
        torch.autograd.backward([t.float().sum() for t in differentiable])
    return flat, leaves


def _flatten(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for _, t in sorted(out.items())]
    return [t for item in out for t in _flatten(item)]


def _signature(tensors):
    return [(tuple(t.shape), t.dtype, t.requires_grad) for t in tensors]


def _assert_like_real(case, fake_dev, backward, backend=None):
    """The op on fake tensors of ``fake_dev`` gives outputs (and leaf gradients) of the
    shapes, dtypes and autograd state of the same call on real CPU tensors."""
    real_out, real_leaves = _run(case, "cpu", backward)
    with FakeTensorMode():
        if backend is not None:
            with pytest.MonkeyPatch.context() as patch:
                patch.setenv("RLHF_ENGINE_BACKEND", backend)  # what backend="auto" (the default) reads
                fake_out, fake_leaves = _run(case, fake_dev, backward)
        else:
            fake_out, fake_leaves = _run(case, fake_dev, backward)
    assert all(isinstance(t, FakeTensor) for t in fake_out)
    assert all(t.device.type == torch.device(fake_dev).type for t in fake_out)
    assert _signature(fake_out) == _signature(real_out)
    if backward:
        for real, fake in zip(real_leaves, fake_leaves, strict=True):
            assert real.grad is not None and fake.grad is not None
            assert fake.grad.shape == fake.shape == real.grad.shape and fake.grad.dtype == real.grad.dtype
    else:
        assert not any(t.requires_grad for t in fake_out)


@pytest.mark.parametrize("case", CASES)
def test_fake_cpu_forward_and_backward_match_the_real_call(case):
    _assert_like_real(case, "cpu", backward=True)


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("case", CASES)
def test_fake_cuda_forward_and_backward_match_the_real_call(case, backend):
    if not CUDA_BUILT:
        pytest.skip(CPU_BUILD_REASON)
    _assert_like_real(case, "cuda", backward=True, backend=backend)


def _no_grad_case(case):
    """The case with no input taking a gradient (so no autograd node is built)."""
    fn, args = CASES[case]

    def build(dev, *a):
        with torch.no_grad():
            return fn(dev, *a)

    return build, args


@pytest.mark.parametrize("case", CASES)
def test_fake_cuda_forward_runs_the_triton_custom_ops_fake_functions(case, monkeypatch):
    """On any torch build: the triton backend on fake cuda tensors runs only the custom ops'
    fake functions (a launched kernel would fail on a fake tensor)."""
    if not triton_importable():
        pytest.skip("the triton package is not installed: backend 'triton' cannot be asked for")
    if not CUDA_BUILT and case == "sequence_logprobs-packed":
        pytest.skip("CPU-only torch build: its per-sequence sum (arithmetic on cu_seqlens slices) raises on fake cuda")
    if not CUDA_BUILT and case.split("-")[0] in ("clip_cov_loss", "kl_cov_loss"):
        pytest.skip("CPU-only torch build: the covariance pre-pass (plain torch ops around the custom op: comparisons "
                    "with a number, cu_seqlens slices) raises on fake cuda")
    monkeypatch.setitem(CASES, case, _no_grad_case(case))
    _assert_like_real(case, "cuda", backward=False, backend="triton")


def test_auto_picks_triton_for_fake_cuda_tensors_as_for_real_ones(monkeypatch):
    monkeypatch.delenv("RLHF_ENGINE_BACKEND", raising=False)
    with FakeTensorMode():
        x = torch.empty(4, device="cuda")
    assert isinstance(x, FakeTensor) and x.device.type == "cuda"
    assert resolve_backend("policy_loss", "auto", x.device) == ("triton" if triton_importable() else "torch")


def test_fake_runs_leave_the_real_cpu_caches_real():
    """The 0-d constants of ``scalar`` and the logprobs scratch workspace are cached for
    real CPU calls; a fake run first must not put a fake tensor there."""
    aggregation._cpu_scalar.cache_clear()
    logprobs_module._CPU_WORKSPACE.__dict__.clear()
    with FakeTensorMode():
        _run("policy_loss-ppo-seq-mean-token-mean-packed", "cpu", backward=True)
        _run("token_logprobs-float32-entropyTrue", "cpu", backward=True)
    constant = aggregation.scalar(0.0, torch.zeros(3))  # one the policy loss takes (half_square)
    assert not isinstance(constant, FakeTensor) and constant.item() == 0.0
    assert not isinstance(getattr(logprobs_module._CPU_WORKSPACE, "memory", None), FakeTensor)
    logits, labels = torch.randn(2, 5, V), torch.randint(0, V, (2, 5))
    expected = torch.log_softmax(logits, -1).gather(-1, labels[..., None])[..., 0]
    torch.testing.assert_close(ops.token_logprobs(logits, labels), expected)


def test_fake_tensors_skip_only_the_checks_that_read_values():
    with FakeTensorMode():
        logp = torch.randn(N)
        # cu_seqlens values ending past N cannot be seen on a fake tensor; its shape can
        ops.policy_loss(logp, logp, logp, logp > 0, cu_seqlens=torch.tensor([0, 3, 99], dtype=torch.int32))
        with pytest.raises(ValueError, match="cu_seqlens must be 1-D"):
            ops.policy_loss(logp, logp, logp, logp > 0, cu_seqlens=torch.zeros(2, 2, dtype=torch.int32))
        # labels out of range cannot be seen either; a label shape that does not fit can
        ops.token_logprobs(torch.randn(4, V), torch.full((4,), V + 5))
        with pytest.raises(ValueError, match="labels must have shape"):
            ops.token_logprobs(torch.randn(4, V), torch.zeros(3, dtype=torch.long))
        with pytest.raises(ValueError, match="num_groups is required"):
            ops.group_advantages(torch.randn(4), group_ids=torch.zeros(4, dtype=torch.long))
    # Real CPU tensors are still checked by value.
    with pytest.raises(ValueError, match="cu_seqlens must rise"):
        ops.policy_loss(torch.randn(N), torch.randn(N), torch.randn(N), torch.ones(N, dtype=torch.bool),
                        cu_seqlens=torch.tensor([0, 3, 99], dtype=torch.int32))  # fmt: skip
    with pytest.raises(ValueError, match=r"labels must be in \[0, "):
        ops.token_logprobs(torch.randn(4, V), torch.full((4,), V + 5))


def test_mem_tracker_traces_a_real_size_fused_policy_loss_step():
    """A Qwen-size lm_head (V = 151936, H = 4096) over 8192 bf16 tokens: ~1.2 GiB of inputs,
    9.3 GiB of fp32 logits if they were ever materialized. Under FakeTensorMode nothing is
    allocated, and MemTracker's peak is the inputs plus their gradients, far below logits."""
    n, h, v, seq = 8192, 4096, 151936, 512
    with FakeTensorMode():
        hidden = torch.randn(n, h, dtype=BF16, requires_grad=True)
        weight = torch.randn(v, h, dtype=BF16, requires_grad=True)
        labels = torch.randint(0, v, (n,))
        old_logp, advantages = torch.randn(n), torch.randn(n)
        mask = torch.ones(n, dtype=torch.bool)
        cu_seqlens = torch.arange(0, n + 1, seq, dtype=torch.int32)
        inputs = (hidden, weight, labels, old_logp, advantages, mask, cu_seqlens)
        tracker = MemTracker()
        tracker.track_external(*inputs)
        with tracker:
            loss, _ = ops.fused_linear_policy_loss(
                hidden, weight, labels, old_logp, advantages, mask, cu_seqlens=cu_seqlens, entropy_coef=0.01,
                aggregation="seq-mean-token-mean",
            )
            loss.backward()
        assert hidden.grad.shape == hidden.shape and weight.grad.shape == weight.shape
    peak = tracker.get_tracker_snapshot("peak")
    assert list(peak) == [torch.device("cpu")]
    input_bytes = sum(t.numel() * t.element_size() for t in inputs)
    grad_bytes = hidden.numel() * hidden.element_size() + weight.numel() * weight.element_size()
    fp32_logits = n * v * 4
    total = peak[torch.device("cpu")]["Total"]
    assert total >= input_bytes + grad_bytes  # the gradients exist at the end, beside the inputs
    # The one-pass path sums d weight over token chunks in fp32 ([V, H] fp32, rounded once
    # to bf16 at the end) beside one CPU chunk of bf16 logits: 2.6 of the 5 GB of fp32 logits.
    chunk = chunk_rows_for(n, v, 2, "cpu") * v * 2
    assert total - input_bytes - grad_bytes <= v * h * 4 + chunk + (1 << 20) < fp32_logits


def test_fake_batches_beyond_one_cpu_pass_run_in_one_pass():
    """Real CPU batches over ``CPU_PASS_TOKENS`` tokens run in passes cut at ``cu_seqlens``
    values (read with ``tolist``); a fake batch has none to read and runs whole."""
    n = 2 * aggregation.CPU_PASS_TOKENS + 3
    cu = [0, n // 2, n // 2, n]  # real: one pass to each side of the empty sequence
    with FakeTensorMode():
        cu_seqlens = torch.tensor(cu, dtype=torch.int32)
        assert aggregation.token_passes(cu_seqlens, n, 0) == [(slice(0, n), slice(0, 3))]
        logp = torch.randn(n, requires_grad=True)
        loss, metrics = ops.policy_loss(logp, torch.randn(n), torch.randn(n), torch.ones(n, dtype=torch.bool),
                                        cu_seqlens=cu_seqlens, aggregation="seq-mean-token-mean")  # fmt: skip
        loss.backward()
    assert loss.shape == () and logp.grad.shape == (n,) and metrics["ratio_max"].shape == ()
    assert len(aggregation.token_passes(torch.tensor(cu, dtype=torch.int32), n, 0)) > 1  # real: passes
