"""The one-pass path of fused_linear_policy_loss (rlhf_engine/ops/_lm_head_loss_grad.py):
which calls take it, its GEMM count (FLOPs of the GEMMs the profiler records), and its
values and gradients against the float64 reference over awkward shapes, in fp32 and bf16,
with a trained and a frozen lm_head and an upstream gradient other than 1.

The equality of the one-pass and recompute paths for every loss and aggregation is in
tests/test_fused_linear.py (``test_policy_loss_equals_unfused_*``, through the public op).
"""

import pytest
import torch

from rlhf_engine.ops import fused_linear_policy_loss
from rlhf_engine.reference.fused_linear import fused_linear_logprobs_ref
from rlhf_engine.reference.policy_loss import policy_loss_ref
from tests.test_fused_linear import _assert_grad_within_tolerance, _fwd_bwd, _labels, _lm_head, _truncating_bf16_baseline
from tests.tolerance import assert_within_tolerance

pytestmark = pytest.mark.filterwarnings(
    "ignore:invalid value encountered:RuntimeWarning", "ignore:divide by zero encountered:RuntimeWarning"
)

# (lead shape, H, V, chunk_size): one token; chunks that do not divide N with a fully
# masked row; one chunk for everything.
SHAPES = {
    "n1": ((1, 1), 5, 7, None),
    "ragged_chunks": ((3, 5), 8, 37, 4),
    "one_chunk": ((2, 6), 6, 29, 64),
}
LOSS_KW = dict(temperature=0.9, kl_coef=0.1, entropy_coef=0.01, aggregation="seq-mean-token-mean", dual_clip=3.0)


def _rl_inputs(hidden, weight, bias, lead, vocab, device):
    """Old and reference logprobs near the lm_head's own (ratios on both sides of the clip)."""
    labels = _labels(lead, vocab, device, ignored_frac=0.1)
    mask = (torch.rand(lead, device=device) > 0.2) & (labels != -100)
    if lead[0] > 1:
        mask[1] = False  # a fully masked row
    with torch.no_grad():
        logp = fused_linear_logprobs_ref(hidden.double(), weight.double(), labels, None if bias is None else bias.double(),
                                         LOSS_KW["temperature"]).float()  # fmt: skip
    return dict(
        labels=labels, old_logp=logp + torch.randn(lead, device=device) * 0.3,
        ref_logp=logp + torch.randn(lead, device=device) * 0.2, advantages=torch.randn(lead[0], device=device), mask=mask,
    )  # fmt: skip


def _ours(rl, backend, chunk_size, scale, loss_kw=LOSS_KW):
    def fn(hidden, weight, bias):
        loss, _ = fused_linear_policy_loss(
            hidden, weight, rl["labels"], rl["old_logp"], rl["advantages"], rl["mask"], bias=bias,
            ref_logp=rl["ref_logp"], chunk_size=chunk_size, backend=backend, **loss_kw,
        )  # fmt: skip
        return loss * scale

    return fn


def _spec(rl, logprobs_fn, scale, loss_kw=LOSS_KW):
    def fn(hidden, weight, bias):
        logp, entropy = logprobs_fn(hidden, weight, rl["labels"], bias, loss_kw["temperature"], -100, True)
        options = {k: v for k, v in loss_kw.items() if k != "temperature"}
        loss, _ = policy_loss_ref(
            logp, rl["old_logp"].to(logp.dtype), rl["advantages"].to(logp.dtype), rl["mask"],
            ref_logp=rl["ref_logp"].to(logp.dtype), entropy=entropy, **options,
        )  # fmt: skip
        return loss * scale

    return fn


@pytest.mark.parametrize("frozen_weight", [False, True], ids=["trained", "frozen"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES)
def test_one_pass_matches_reference(backend, device, shape, dtype, frozen_weight):
    lead, hdim, vocab, chunk_size = SHAPES[shape]
    (hidden, weight, bias), _ = _lm_head(lead, hdim, vocab, dtype, device)
    rl = _rl_inputs(hidden, weight, bias, lead, vocab, device)
    scale = 0.5  # the saved gradients are scaled by the upstream gradient in backward
    grads = [torch.ones((), dtype=torch.float64)]
    leaves = [hidden, weight, bias]
    if frozen_weight:  # LoRA: the lm_head takes no gradient
        weight_leaf = weight

        def ours(h, b):
            return _ours(rl, backend, chunk_size, scale)(h, weight_leaf, b)

        def spec(fn, w):
            return lambda h, b: _spec(rl, fn, scale)(h, w, b)

        leaves = [hidden, bias]
        outs, dleaves = _fwd_bwd(ours, leaves, grads)
        ref_outs, ref_dleaves = _fwd_bwd(spec(fused_linear_logprobs_ref, weight.double()), [x.double() for x in leaves], grads)
        base_fn = _truncating_bf16_baseline if backend == "triton" and dtype == torch.bfloat16 else fused_linear_logprobs_ref
        base_outs, base_dleaves = _fwd_bwd(spec(base_fn, weight), leaves, grads)
        names = ("hidden", "bias")
    else:
        outs, dleaves = _fwd_bwd(_ours(rl, backend, chunk_size, scale), leaves, grads)
        ref_outs, ref_dleaves = _fwd_bwd(_spec(rl, fused_linear_logprobs_ref, scale), [x.double() for x in leaves], grads)
        base_fn = _truncating_bf16_baseline if backend == "triton" and dtype == torch.bfloat16 else fused_linear_logprobs_ref
        base_outs, base_dleaves = _fwd_bwd(_spec(rl, base_fn, scale), leaves, grads)
        names = ("hidden", "weight", "bias")
    assert_within_tolerance(outs[0], ref_outs[0], base_outs[0], dtype, what="loss")
    for name, leaf, grad, ref, base in zip(names, leaves, dleaves, ref_dleaves, base_dleaves):
        assert grad.dtype == leaf.dtype and grad.shape == leaf.shape
        _assert_grad_within_tolerance(grad, ref, base, dtype, what=f"{backend} d{name}")
    masked = ~rl["mask"]
    assert (dleaves[0][masked] == 0).all(), "a masked token got a hidden gradient"


# The options of TRL's and verl's semantics (rlhf_engine.ops.policy_loss), on both paths:
# one pass (token-level losses) and recompute (gspo).
OPTION_SETS = {
    "trl-grpo": dict(log_ratio_min=None, log_ratio_max=None, kl_ratio_weight=True, entropy_aggregation="token-mean",
                     count_empty_seqs=True),
    "trl-cispo": dict(loss="cispo-trl", clip_high=1.2, log_ratio_min=None, log_ratio_max=None, kl_ratio_weight=True),
    "sapo-taus": dict(loss="sapo", sapo_tau_pos=0.5, sapo_tau_neg=2.0, log_ratio_min=-0.2, log_ratio_max=0.25),
    "gspo-kl-ratio": dict(loss="gspo", clip_low=0.02, clip_high=0.03, kl_ratio_weight=True, log_ratio_max=10.0,
                          log_ratio_min=None, entropy_aggregation="token-mean"),
    "norm-non-empty": dict(aggregation="seq-mean-token-sum-norm", count_empty_seqs=False),
}


@pytest.mark.parametrize("options", OPTION_SETS)
def test_semantics_options_match_reference(backend, device, options):
    lead, hdim, vocab, chunk_size = SHAPES["ragged_chunks"]
    (hidden, weight, bias), _ = _lm_head(lead, hdim, vocab, torch.float32, device)
    rl = _rl_inputs(hidden, weight, bias, lead, vocab, device)
    loss_kw = {**LOSS_KW, **OPTION_SETS[options]}
    grads = [torch.ones((), dtype=torch.float64)]
    leaves = [hidden, weight, bias]
    outs, dleaves = _fwd_bwd(_ours(rl, backend, chunk_size, 1.0, loss_kw), leaves, grads)
    ref_outs, ref_dleaves = _fwd_bwd(
        _spec(rl, fused_linear_logprobs_ref, 1.0, loss_kw), [x.double() for x in leaves], grads
    )
    base_outs, base_dleaves = _fwd_bwd(_spec(rl, fused_linear_logprobs_ref, 1.0, loss_kw), leaves, grads)
    assert_within_tolerance(outs[0], ref_outs[0], base_outs[0], torch.float32, what="loss")
    for name, grad, ref, base in zip(("hidden", "weight", "bias"), dleaves, ref_dleaves, base_dleaves):
        _assert_grad_within_tolerance(grad, ref, base, torch.float32, what=f"{backend} d{name}")


_GEMMS = {"aten::mm": (0, 1), "aten::addmm": (1, 2), "aten::addmm_": (1, 2)}  # op -> positions of its two factors


def _gemm_flops(fn) -> int:
    """``2·m·k·n`` summed over the GEMMs run inside ``fn()``, custom ops included (the
    profiler records what runs inside them; a dispatch mode such as FlopCounterMode sees
    a custom op as one opaque call)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    total = 0
    for event in prof.events():
        if event.name in _GEMMS:
            a, b = (event.input_shapes[i] for i in _GEMMS[event.name])
            total += 2 * a[0] * a[1] * b[1]
    return total


def _lm_head_flops(backend, device, *, loss="ppo", frozen=False, grad=True, bias=False):
    lead, hdim, vocab = (4, 8), 16, 64
    (hidden, weight, b), _ = _lm_head(lead, hdim, vocab, torch.float32, device, bias=bias)
    rl = _rl_inputs(hidden, weight, b, lead, vocab, device)
    hidden.requires_grad_(grad)
    weight.requires_grad_(grad and not frozen)

    def step():
        with torch.set_grad_enabled(grad):
            loss_value, _ = fused_linear_policy_loss(
                hidden, weight, rl["labels"], rl["old_logp"], rl["advantages"], rl["mask"], bias=b, loss=loss,
                chunk_size=12, backend=backend,
            )  # fmt: skip
            if grad:
                loss_value.backward()

    return _gemm_flops(step), 2 * 32 * hdim * vocab  # and one lm_head GEMM, 2·N·H·V


def test_one_pass_does_three_gemms(device):
    # torch backend: every GEMM is a torch op FlopCounterMode counts (the Triton forward's
    # fused GEMM kernel is not one). Chunks of 12 over N = 32 tokens.
    flops, gemm = _lm_head_flops("torch", device)
    assert flops == 3 * gemm
    flops, gemm = _lm_head_flops("torch", device, frozen=True)  # no d weight
    assert flops == 2 * gemm


def test_sequence_level_loss_and_no_grad_take_the_recompute_path(device):
    flops, gemm = _lm_head_flops("torch", device, loss="gspo")  # forward, then recompute + 2 GEMMs
    assert flops == 4 * gemm
    flops, gemm = _lm_head_flops("torch", device, grad=False)  # scoring: the forward alone
    assert flops == gemm


def test_one_pass_on_triton_backend_counts_its_three_gemms(backend, device):
    # The one-pass path runs its GEMMs as torch ops with the backend's epilogues, on either backend.
    flops, gemm = _lm_head_flops(backend, device, bias=True)
    assert flops == 3 * gemm


def test_on_policy_old_logp_none_equals_passing_the_detached_logprobs(backend, device):
    # old_logp=None: each chunk's own logprobs are its old ones (ratio 1, the gradient of logp).
    lead, hdim, vocab = (3, 5), 8, 37
    (hidden, weight, bias), _ = _lm_head(lead, hdim, vocab, torch.float32, device)
    rl = _rl_inputs(hidden, weight, bias, lead, vocab, device)
    with torch.no_grad():
        _, _, logp, _ = fused_linear_policy_loss(hidden, weight, rl["labels"], rl["old_logp"], rl["advantages"],
                                                 rl["mask"], bias=bias, temperature=0.9, return_logprobs=True,
                                                 backend=backend)  # fmt: skip
    results = []
    for old in (None, logp):
        leaves = [hidden.clone().requires_grad_(), weight.clone().requires_grad_(), bias.clone().requires_grad_()]
        loss, metrics = fused_linear_policy_loss(leaves[0], leaves[1], rl["labels"], old, rl["advantages"], rl["mask"],
                                                 bias=leaves[2], temperature=0.9, chunk_size=4, ref_logp=rl["ref_logp"],
                                                 kl_coef=0.1, backend=backend)  # fmt: skip
        loss.backward()
        results.append((loss, metrics["ratio_mean"], *(x.grad for x in leaves)))
    assert results[0][1] == 1.0
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("loss_backend", ["torch", "cpp"])
def test_one_sequence_with_per_sequence_advantages(loss_backend, monkeypatch):
    # One sequence: the per-sequence advantages [1] broadcast over its tokens as a stride-0
    # view; the kernels read flat pointers, so they must get a dense copy (they read past
    # the single element and the gradient was wrong for backend cpp before).
    from rlhf_engine import _backend

    if loss_backend != "torch" and not _backend.native_runs_on(loss_backend, torch.device("cpu")):
        pytest.skip(f"backend {loss_backend!r} cannot run here")
    monkeypatch.setenv(_backend.ENV_VAR, loss_backend)
    (hidden, weight, _), _ = _lm_head((1, 9), 6, 23, torch.float32, "cpu", bias=False)
    hidden.requires_grad_(True)
    labels = _labels((1, 9), 23, "cpu", ignored_frac=0.0)
    old = torch.randn(1, 9) - 3.0
    advantages, mask = torch.tensor([0.7]), torch.ones(1, 9, dtype=torch.bool)
    loss, _ = fused_linear_policy_loss(hidden, weight, labels, old, advantages, mask, temperature=0.9)
    grad, = torch.autograd.grad(loss, hidden)
    h = hidden.detach().double().requires_grad_(True)
    logp = fused_linear_logprobs_ref(h, weight.detach().double(), labels, None, temperature=0.9)
    ref_loss, _ = policy_loss_ref(logp, old.double(), advantages.double().expand(1, 9), mask)
    ref_grad, = torch.autograd.grad(ref_loss, h)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-6)
