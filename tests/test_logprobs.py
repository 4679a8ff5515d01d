"""token_logprobs: every backend against the float64 reference (values and gradients),
plus the awkward layouts, ignore_index, in-place backward, torch.compile and bad input.

Without CUDA the triton backend runs through the Triton interpreter, so shapes are small.
"""

import math

import pytest
import torch

from rlhf_engine._backend import native_runs_on, triton_interpreter_on, triton_runs_on
from rlhf_engine.ops import token_logprobs
from rlhf_engine.ops.logprobs import _rows_view
from rlhf_engine.reference.logprobs import token_logprobs_ref
from rlhf_engine.torch_backend.logprobs import token_logprobs_bwd_torch, token_logprobs_fwd_torch
from tests.tolerance import assert_within_tolerance

# The backend tests also run on cpp (CPU) / cuda (GPU): rlhf_engine.native.logprobs.
NATIVE_BACKENDS = True

# The interpreter evaluates both sides of tl.where, so ignored rows make numpy warn about
# the NaN/inf in the branch that is thrown away.
pytestmark = pytest.mark.filterwarnings(
    "ignore:invalid value encountered:RuntimeWarning", "ignore:divide by zero encountered:RuntimeWarning"
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _logits(lead, vocab, dtype, device, layout="contiguous"):
    """Random logits ``lead + [vocab]`` in ``dtype`` (spread like real LM logits), in one
    of the layouts the op must read in place or fall back on."""
    def rand(*shape):
        return (torch.randn(*shape, vocab, dtype=torch.float64) * 4).to(dtype).to(device)

    if layout == "contiguous":
        return rand(*lead)
    if layout == "shifted":  # logits[:, :-1] of [B, T+1, V], the usual next-token slice
        b, t = lead
        return rand(b, t + 1)[:, :-1]
    if layout == "transposed":  # [T, B, V] seen as [B, T, V]: two leading strides, not ordered
        b, t = lead
        return rand(t, b).transpose(0, 1)
    if layout == "unfoldable":  # three leading strides no two of which merge: the copy fallback
        a, b, c = lead
        return rand(a, b + 1, c + 1)[:, :-1, :-1]
    raise AssertionError(layout)


def _native_launchers(device):
    """The cpp / cuda launchers (whichever runs on ``device``), or a skip."""
    name = "cuda" if device.type == "cuda" else "cpp"
    if not native_runs_on(name, device):
        pytest.skip(f"backend {name!r} cannot run here")
    from rlhf_engine.native.logprobs import token_logprobs_bwd, token_logprobs_fwd

    return token_logprobs_fwd, token_logprobs_bwd


def _labels(lead, vocab, device, ignore_index=-100, ignored_frac=0.25):
    labels = torch.randint(0, vocab, lead)
    labels[torch.rand(lead) < ignored_frac] = ignore_index
    return labels.to(device)


# (lead shape, V, layout, temperature, ignored fraction): each awkward for a reason.
CASES = {
    # N = 1, V = 7: one program, a vocab smaller than any block and not a power of two.
    "n1_v7": ((1,), 7, "contiguous", 1.0, 0.0),
    # V = 1: logp and entropy are exactly 0 and so is the gradient.
    "v1": ((3,), 1, "contiguous", 1.0, 0.0),
    # logits[:, :-1] read through two (size, stride) pairs; V = 1003 leaves a masked tail.
    "shifted_v1003": ((2, 3), 1003, "shifted", 0.7, 0.25),
    # Leading strides out of order.
    "transposed": ((3, 2), 130, "transposed", 1.0, 0.25),
    # Three unmergeable leading dims: the reshape fallback.
    "unfoldable": ((2, 2, 2), 33, "unfoldable", 1.3, 0.25),
    # V = 2 * 4096 + 5 > the largest block: online max across tiles and a ragged last tile.
    "multi_tile": ((3,), 8197, "contiguous", 0.7, 0.0),
    # Every row ignored: all outputs and gradient rows exactly 0.
    "all_ignored": ((4,), 100, "contiguous", 1.0, 1.0),
}


def _forward_backward(fn, logits, labels, grads, temperature, with_entropy):
    """Outputs and logits gradient of ``fn`` for the upstream ``grads`` (one per output)."""
    x = logits.detach().clone().requires_grad_(True)
    out = fn(x * 1, labels, temperature, with_entropy)  # "* 1": logits are not a leaf
    outs = out if with_entropy else (out,)
    sum(((o.double() * g).sum() for o, g in zip(outs, grads)), torch.zeros((), dtype=torch.float64)).backward()
    return outs, x.grad


def _truncate_to_bf16(x):
    """fp32 -> bf16 rounding toward zero: drop the low 16 bits (then the cast is exact)."""
    return (x.view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)


def _ours(backend, inplace=False):
    def fn(x, labels, temperature, with_entropy):
        return token_logprobs(
            x, labels, temperature=temperature, return_entropy=with_entropy, inplace_backward=inplace, backend=backend
        )

    return fn


def _ref(x, labels, temperature, with_entropy):
    return token_logprobs_ref(x, labels, temperature, -100, with_entropy)


@pytest.mark.parametrize("with_entropy", [False, True], ids=["logp", "logp+entropy"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES)
def test_matches_reference(backend, device, case, dtype, with_entropy):
    lead, vocab, layout, temperature, ignored_frac = CASES[case]
    logits = _logits(lead, vocab, dtype, device, layout)
    labels = _labels(lead, vocab, device, ignored_frac=ignored_frac)
    grads = [torch.randn(lead, dtype=torch.float64, device=device) for _ in range(1 + with_entropy)]

    outs, grad = _forward_backward(_ours(backend), logits, labels, grads, temperature, with_entropy)
    ref_outs, ref_grad = _forward_backward(_ref, logits.double(), labels, grads, temperature, with_entropy)
    base_outs, base_grad = _forward_backward(_ref, logits, labels, grads, temperature, with_entropy)

    for name, out, ref, base in zip(("logp", "entropy"), outs, ref_outs, base_outs):
        assert out.dtype == torch.float32
        assert_within_tolerance(out, ref, base, dtype, what=f"{backend} {name}")
    assert grad.dtype == dtype
    if backend == "triton" and dtype == torch.bfloat16 and triton_interpreter_on():
        # The Triton interpreter converts fp32 to bf16 by truncation (the GPU rounds to
        # nearest), so the fair baseline is the fp32 reference gradient truncated too.
        _, grad32 = _forward_backward(_ref, logits.float(), labels, grads, temperature, with_entropy)
        base_grad = _truncate_to_bf16(grad32)
    assert_within_tolerance(grad, ref_grad, base_grad, dtype, what=f"{backend} dlogits")

    ignored = labels == -100
    for out in outs:
        assert (out[ignored] == 0).all()
    assert (grad[ignored] == 0).all()


@pytest.mark.parametrize("rows_per_chunk", [2, 7, 12])
def test_torch_backend_chunk_boundaries(device, monkeypatch, rows_per_chunk):
    # The torch backend walks rows in chunks: within one d1 run (2 rows: chunks of 2, 2, 1
    # per run of 5), or whole runs (7 rows: one run; 12 rows: two runs, then one).
    from rlhf_engine.torch_backend import logprobs as torch_backend

    vocab = 21
    monkeypatch.setitem(torch_backend.CHUNK_BYTES, device.type, rows_per_chunk * 4 * vocab)
    logits = _logits((3, 5), vocab, torch.float32, device, "shifted")
    labels = _labels((3, 5), vocab, device)
    grads = [torch.randn(3, 5, dtype=torch.float64, device=device) for _ in range(2)]
    for inplace in (False, True):
        outs, grad = _forward_backward(_ours("torch", inplace), logits, labels, grads, 1.0, True)
        ref_outs, ref_grad = _forward_backward(_ref, logits.double(), labels, grads, 1.0, True)
        for out, ref in zip(outs, ref_outs):
            assert torch.allclose(out.double(), ref, atol=1e-5)
        assert torch.allclose(grad.double(), ref_grad, atol=1e-5)


def test_reference_gradcheck():
    logits = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 6, (3, 4))
    labels[0, 1] = -100

    def f(x):
        return token_logprobs_ref(x, labels, 0.7, -100, True)

    assert torch.autograd.gradcheck(f, (logits,))


def test_reference_hand_computed():
    # Uniform logits over V = 4: logp = -log 4 and entropy = log 4 at any temperature.
    logp, entropy = token_logprobs_ref(torch.zeros(1, 4), torch.tensor([2]), 0.5, -100, True)
    assert torch.allclose(logp, torch.tensor([-math.log(4)]))
    assert torch.allclose(entropy, torch.tensor([math.log(4)]))


def test_returns_logp_alone_without_entropy(backend, device):
    out = token_logprobs(torch.randn(2, 5, device=device), torch.tensor([1, 4], device=device), backend=backend)
    assert isinstance(out, torch.Tensor) and out.shape == (2,) and out.dtype == torch.float32


@pytest.mark.parametrize("labels_dtype", [torch.int32, torch.int64])
def test_ignore_index_is_a_value_not_a_range(backend, device, labels_dtype):
    # ignore_index = 3 is also a valid token id: rows labelled 3 are ignored, the rest are not.
    logits = torch.randn(4, 9, device=device)
    labels = torch.tensor([3, 0, 8, 3], dtype=labels_dtype, device=device)
    x = logits.clone().requires_grad_(True)
    logp, entropy = token_logprobs(x * 1, labels, ignore_index=3, return_entropy=True, backend=backend)
    (logp.sum() + entropy.sum()).backward()
    ref_logp, ref_entropy = token_logprobs_ref(logits.double(), labels, 1.0, 3, True)
    assert torch.allclose(logp.double(), ref_logp, atol=1e-5)
    assert torch.allclose(entropy.double(), ref_entropy, atol=1e-5)
    assert (logp[[0, 3]] == 0).all() and (logp[[1, 2]] < 0).all()
    assert (x.grad[[0, 3]] == 0).all() and (x.grad[[1, 2]] != 0).any()


def test_ignored_rows_never_read(backend, device):
    # Garbage (inf / NaN) logits on ignored positions must not leak into outputs or grads.
    logits = torch.randn(3, 50, device=device)
    logits[1, 5] = float("nan")
    logits[1, 6] = float("inf")
    labels = torch.tensor([4, -100, 7], device=device)
    x = logits.clone().requires_grad_(True)
    logp, entropy = token_logprobs(x * 1, labels, return_entropy=True, backend=backend)
    (logp.sum() + entropy.sum()).backward()
    assert torch.isfinite(logp).all() and torch.isfinite(entropy).all() and torch.isfinite(x.grad).all()
    assert logp[1] == 0 and entropy[1] == 0 and (x.grad[1] == 0).all()


def test_negative_infinite_logits(backend, device):
    # -inf logits (a masked vocabulary) have p = 0: the row behaves as if those columns were
    # absent. The first tile of row 0 is all -inf, exercising the running max from -inf.
    vocab = 4096 + 9
    logits = torch.randn(2, vocab, device=device)
    logits[0, :4096] = float("-inf")
    logits[1, ::3] = float("-inf")
    labels = torch.tensor([4100, 1], device=device)
    x = logits.clone().requires_grad_(True)
    logp, entropy = token_logprobs(x * 1, labels, return_entropy=True, backend=backend)
    (logp.sum() + entropy.sum()).backward()
    for row, label in ((0, 4100), (1, 1)):
        keep = torch.isfinite(logits[row])
        kept = logits[row, keep].double()
        kept_label = int(keep[:label].sum())
        r = kept.clone().requires_grad_(True)
        ref_logp, ref_entropy = token_logprobs_ref(r[None], torch.tensor([kept_label], device=device), 1.0, -100, True)
        (ref_logp.sum() + ref_entropy.sum()).backward()
        assert torch.allclose(logp[row].double(), ref_logp[0], atol=1e-5)
        assert torch.allclose(entropy[row].double(), ref_entropy[0], atol=1e-5)
        assert (x.grad[row, ~keep] == 0).all()
        assert torch.allclose(x.grad[row, keep].double(), r.grad, atol=1e-5)


@pytest.mark.parametrize("vocab", [37, 2053])  # 2053: past the cuda kernels' warp-per-row limit
@pytest.mark.parametrize("layout", ["contiguous", "shifted", "unfoldable"])
def test_inplace_backward(backend, device, layout, vocab):
    lead = (2, 2, 2) if layout == "unfoldable" else (2, 3)
    logits = _logits(lead, vocab, torch.bfloat16, device, layout)
    labels = _labels(lead, vocab, device)
    grads = [torch.randn(lead, dtype=torch.float64, device=device) for _ in range(2)]
    _, expected = _forward_backward(_ours(backend), logits, labels, grads, 0.9, True)

    x = logits.detach().clone().requires_grad_(True)
    hidden = x * 1  # the buffer the in-place backward overwrites
    logp, entropy = token_logprobs(hidden, labels, temperature=0.9, return_entropy=True,
                                   inplace_backward=True, backend=backend)  # fmt: skip
    ((logp.double() * grads[0]).sum() + (entropy.double() * grads[1]).sum()).backward()
    assert torch.equal(x.grad, expected)
    assert torch.equal(hidden.detach(), expected)  # the logits now hold their gradient


def test_inplace_backward_is_caught_when_logits_are_needed_elsewhere(backend, device):
    # exp() saves its output for its own backward; overwriting it must fail loudly.
    x = torch.randn(3, 10, device=device, requires_grad=True)
    logp = token_logprobs(x.exp(), torch.tensor([1, 2, 3], device=device), inplace_backward=True, backend=backend)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        logp.sum().backward()


def test_inplace_backward_rejects_leaf(device):
    x = torch.randn(2, 5, device=device, requires_grad=True)
    with pytest.raises(ValueError, match="inplace_backward"):
        token_logprobs(x, torch.tensor([0, 1], device=device), inplace_backward=True)


@pytest.mark.parametrize("inplace", [False, True], ids=["out-of-place", "inplace"])
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_torch_compile_fullgraph(backend, device, dynamic, inplace):
    # Dynamo must trace the wrapper (validation, backend choice) and both custom ops
    # without a graph break, with static and symbolic shapes (and temperature); aot_eager
    # checks the fake kernels and the autograd wiring without compiling C++ for the CPU
    # (slow, and it adds nothing for opaque custom ops).
    def step(x, labels):
        logp, entropy = token_logprobs(
            x * 1, labels, temperature=0.8, return_entropy=True, inplace_backward=inplace, backend=backend
        )
        return logp.sum() - 0.1 * entropy.sum()

    logits = torch.randn(2, 4, 61, device=device)
    labels = _labels((2, 4), 61, device)
    x_eager = logits.clone().requires_grad_(True)
    step(x_eager, labels).backward()
    x = logits.clone().requires_grad_(True)
    torch._dynamo.reset()
    loss = torch.compile(step, fullgraph=True, backend="aot_eager", dynamic=dynamic)(x, labels)
    loss.backward()
    assert torch.allclose(loss, step(logits, labels), atol=1e-5)
    assert torch.allclose(x.grad, x_eager.grad, atol=1e-6)


def test_torch_compile_inductor(device):
    # The default compiler backend too (once, torch backend): the graph around the op fuses.
    def step(x, labels):
        return token_logprobs(x.float() * 2, labels, backend="torch").sum()

    logits = torch.randn(3, 17, device=device)
    labels = torch.tensor([1, -100, 16], device=device)
    x, x_eager = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    torch._dynamo.reset()
    torch.compile(step, fullgraph=True)(x, labels).backward()
    step(x_eager, labels).backward()
    assert torch.allclose(x.grad, x_eager.grad, atol=1e-6)


def test_custom_op_registration():
    # Schema, fake kernel and autograd registration as torch.library checks them.
    logits = torch.randn(3, 11, requires_grad=True)
    labels = torch.tensor([1, -100, 10])
    torch.library.opcheck(
        torch.ops.rlhf_engine.token_logprobs_fwd.default, (logits, labels, 0.7, -100, True, False, "torch")
    )
    logp, entropy, lse = torch.ops.rlhf_engine.token_logprobs_fwd(logits.detach(), labels, 0.7, -100, True, False, "torch")
    grad = torch.randn(3)
    dlogits = torch.empty(3, 11)
    torch.library.opcheck(
        torch.ops.rlhf_engine.token_logprobs_bwd.default,
        (grad, grad, logits.detach(), labels, lse, entropy, dlogits, 0.7, -100, "torch"),
    )


@pytest.mark.parametrize("launcher", ["torch", "triton", "native"])
def test_out_of_range_labels_give_nan_rows(launcher, device):
    # The GPU path does not check labels (a host sync): the kernels must not read out of
    # bounds and must mark the row NaN. Tested on the launchers, below the CPU-only check.
    if launcher == "triton":
        if not triton_runs_on(device):
            pytest.skip("triton cannot run here")
        from rlhf_engine.kernels.logprobs import token_logprobs_bwd as bwd
        from rlhf_engine.kernels.logprobs import token_logprobs_fwd as fwd
    elif launcher == "native":
        fwd, bwd = _native_launchers(device)
    else:
        fwd, bwd = token_logprobs_fwd_torch, token_logprobs_bwd_torch
    logits = torch.randn(1, 4, 10, device=device)
    labels = torch.tensor([3, 10, -1, -100], device=device)
    logp, entropy, lse = fwd(logits, labels, 1.0, -100, True)
    dlogits = torch.empty_like(logits)
    ones = torch.ones(4, device=device)
    bwd(ones, ones, logits, labels, lse, entropy, dlogits, 1.0, -100)
    assert torch.isfinite(logp[0]) and torch.isfinite(entropy[0]) and torch.isfinite(dlogits[0, 0]).all()
    assert logp[1:3].isnan().all() and entropy[1:3].isnan().all() and dlogits[0, 1:3].isnan().all()
    assert logp[3] == 0 and entropy[3] == 0 and (dlogits[0, 3] == 0).all()


def test_rows_view_reads_slices_in_place():
    base = torch.randn(2, 6, 9)
    view, copied = _rows_view(base[:, :-1])
    assert not copied and view.data_ptr() == base.data_ptr() and view.shape == (2, 5, 9)
    view, copied = _rows_view(torch.randn(2, 3, 4, 9)[:, :-1, :-1])
    assert copied and view.shape == (1, 12, 9)


def _native_name(device):
    return "cuda" if device.type == "cuda" else "cpp"


def test_native_results_do_not_depend_on_threads():
    # The host twin runs one row per OpenMP iteration: 1 and 4 threads give the same bits.
    if not native_runs_on("cpp", torch.device("cpu")):
        pytest.skip("backend 'cpp' cannot run here")
    from rlhf_engine.native.logprobs import token_logprobs_bwd, token_logprobs_fwd

    logits = _logits((3, 13), 1500, torch.bfloat16, "cpu", "shifted")
    labels = _labels((3, 13), 1500, "cpu").reshape(-1)
    rows, _ = _rows_view(logits)
    grads = torch.randn(2, 39)
    results = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 4):
            torch.set_num_threads(count)
            logp, entropy, lse = token_logprobs_fwd(rows, labels, 0.8, -100, True)
            dlogits = torch.empty(rows.shape, dtype=rows.dtype)
            token_logprobs_bwd(grads[0], grads[1], rows, labels, lse, entropy, dlogits, 0.8, -100)
            results.append((logp, entropy, lse, dlogits))
    finally:
        torch.set_num_threads(threads)
    for one, four in zip(*results):
        assert torch.equal(one, four)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab", [1024, 1025, 4096 + 3])
def test_native_vocab_sizes_around_the_row_split(device, dtype, vocab):
    # The cuda kernels take a row per warp up to V = 1024 and a row per block above (many
    # groups per thread at 4099); every size must match the float64 reference alike.
    _native_launchers(device)
    backend = _native_name(device)
    lead = (5,)
    logits = _logits(lead, vocab, dtype, device)
    labels = _labels(lead, vocab, device)
    grads = [torch.randn(lead, dtype=torch.float64, device=device) for _ in range(2)]
    outs, grad = _forward_backward(_ours(backend), logits, labels, grads, 0.9, True)
    ref_outs, ref_grad = _forward_backward(_ref, logits.double(), labels, grads, 0.9, True)
    base_outs, base_grad = _forward_backward(_ref, logits, labels, grads, 0.9, True)
    for name, out, ref, base in zip(("logp", "entropy"), outs, ref_outs, base_outs):
        assert_within_tolerance(out, ref, base, dtype, what=f"{backend} {name}")
    assert_within_tolerance(grad, ref_grad, base_grad, dtype, what=f"{backend} dlogits")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab", [1000, 2056])
def test_native_unaligned_rows_match_aligned_ones(device, dtype, vocab):
    # Rows starting one element past a 16-byte boundary take the cuda kernels' scalar loads
    # and stores; the arithmetic is the same, so the results are the same bits as for an
    # aligned contiguous copy (V a multiple of 8: its rows are all aligned).
    fwd, bwd = _native_launchers(device)
    base = (torch.randn(6, vocab + 1, dtype=torch.float64) * 4).to(dtype).to(device)
    unaligned = base[:, 1:].unsqueeze(0)
    aligned = unaligned.contiguous()
    labels = _labels((6,), vocab, device)
    grads = torch.randn(2, 6, device=device)
    results = []
    for logits in (unaligned, aligned):
        logp, entropy, lse = fwd(logits, labels, 1.1, -100, True)
        dlogits = torch.empty_like(aligned)
        bwd(grads[0], grads[1], logits, labels, lse, entropy, dlogits, 1.1, -100)
        results.append((logp, entropy, lse, dlogits))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_native_backward_with_label_offset(device):
    # The fused lm_head's vocabulary slices: column j is token label_offset + j, and a label
    # outside the slice adds no one-hot term; lse and entropy are the whole rows'.
    fwd, bwd = _native_launchers(device)
    vocab, start, width = 40, 16, 16
    logits = torch.randn(1, 5, vocab, device=device)
    labels = torch.tensor([3, 16, 20, 31, 39], device=device)
    logp, entropy, lse = token_logprobs_fwd_torch(logits, labels, 0.7, -100, True)
    grads = torch.randn(2, 5, device=device)
    full = torch.empty_like(logits)
    token_logprobs_bwd_torch(grads[0], grads[1], logits, labels, lse, entropy, full, 0.7, -100)
    piece = logits[:, :, start : start + width].contiguous()
    dpiece = torch.empty_like(piece)
    bwd(grads[0], grads[1], piece, labels, lse, entropy, dpiece, 0.7, -100, label_offset=start)
    assert torch.allclose(dpiece, full[:, :, start : start + width], atol=1e-6)


def test_native_backward_refuses_dlogits_in_another_dtype():
    if not native_runs_on("cpp", torch.device("cpu")):
        pytest.skip("backend 'cpp' cannot run here")
    from rlhf_engine.native.logprobs import token_logprobs_bwd, token_logprobs_fwd

    logits = torch.randn(1, 2, 9).to(torch.bfloat16)
    labels = torch.tensor([1, 2])
    _, entropy, lse = token_logprobs_fwd(logits, labels, 1.0, -100, True)
    ones = torch.ones(2)
    with pytest.raises(ValueError, match="dlogits"):
        token_logprobs_bwd(ones, ones, logits, labels, lse, entropy, torch.empty(1, 2, 9), 1.0, -100)


def test_backend_cuda_on_cpu_tensors_is_refused_by_name():
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available: it runs on cuda tensors"):
        token_logprobs(torch.randn(2, 5), torch.tensor([0, 1]), backend="cuda")


def _valid_args(device):
    return dict(logits=torch.randn(2, 3, 5, device=device), labels=torch.zeros(2, 3, dtype=torch.long, device=device))


BAD_INPUTS = {
    "logits not a tensor": (dict(logits=[[0.0]]), TypeError, "logits"),
    "logits integer": (dict(logits=torch.zeros(2, 3, 5, dtype=torch.long)), TypeError, "logits"),
    "logits float64": (dict(logits=torch.zeros(2, 3, 5, dtype=torch.float64)), TypeError, "logits"),
    "logits 0-d": (dict(logits=torch.tensor(1.0), labels=torch.tensor(0)), ValueError, "logits"),
    "vocab empty": (dict(logits=torch.zeros(2, 3, 0)), ValueError, "logits"),
    "labels float": (dict(labels=torch.zeros(2, 3)), TypeError, "labels"),
    "labels wrong shape": (dict(labels=torch.zeros(2, 4, dtype=torch.long)), ValueError, "labels"),
    "labels too large": (dict(labels=torch.full((2, 3), 5)), ValueError, "labels"),
    "labels negative": (dict(labels=torch.full((2, 3), -1)), ValueError, "labels"),
    "temperature zero": (dict(temperature=0.0), ValueError, "temperature"),
    "temperature inf": (dict(temperature=float("inf")), ValueError, "temperature"),
    "temperature string": (dict(temperature="1"), TypeError, "temperature"),
    "ignore_index float": (dict(ignore_index=-100.0), TypeError, "ignore_index"),
    "return_entropy int": (dict(return_entropy=1), TypeError, "return_entropy"),
    "unknown backend": (dict(backend="cudnn"), ValueError, "backend"),
}


@pytest.mark.parametrize("bad", BAD_INPUTS)
def test_bad_inputs(bad, device):
    changes, error, name = BAD_INPUTS[bad]
    if device.type == "cuda" and bad.startswith("labels") and "shape" not in bad and "float" not in bad:
        pytest.skip("label values are not checked on CUDA (a host sync); they give NaN rows instead")
    args = _valid_args(device)
    args.update({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in changes.items()})
    logits, labels = args.pop("logits"), args.pop("labels")
    with pytest.raises(error, match=name):
        token_logprobs(logits, labels, **args)


@pytest.mark.gpu
def test_labels_on_another_device():
    with pytest.raises(ValueError, match="labels"):
        token_logprobs(torch.randn(2, 5, device="cuda"), torch.zeros(2, dtype=torch.long))


@pytest.mark.gpu
@pytest.mark.parametrize("backend_name", ["triton", "torch", "cuda"])
def test_large_vocab_on_gpu(backend_name):
    # A real vocabulary (Qwen2, 151936) in bf16, against the float64 reference.
    logits = (torch.randn(64, 151936, device="cuda") * 4).to(torch.bfloat16)
    labels = _labels((64,), 151936, "cuda")
    grads = [torch.randn(64, dtype=torch.float64, device="cuda") for _ in range(2)]
    outs, grad = _forward_backward(_ours(backend_name), logits, labels, grads, 0.7, True)
    ref_outs, ref_grad = _forward_backward(_ref, logits.double(), labels, grads, 0.7, True)
    base_outs, base_grad = _forward_backward(_ref, logits, labels, grads, 0.7, True)
    for out, ref, base in zip(outs, ref_outs, base_outs):
        assert_within_tolerance(out, ref, base, torch.bfloat16)
    assert_within_tolerance(grad, ref_grad, base_grad, torch.bfloat16, what="dlogits")


@pytest.mark.gpu
@pytest.mark.parametrize("backend_name", ["triton", "torch", "cuda"])
@pytest.mark.parametrize("inplace", [False, True])
def test_no_fp32_copy_of_logits_on_gpu(backend_name, inplace):
    # Peak memory above the inputs: one bf16 [N, V] gradient (none in place) plus chunk
    # temporaries for the torch backend, always well below one fp32 [N, V] (= 2 bf16 ones).
    from rlhf_engine.torch_backend.logprobs import CHUNK_BYTES

    n, vocab = 1024, 151936
    hidden = torch.randn(n, vocab, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    labels = _labels((n,), vocab, "cuda")
    logits = hidden * 1
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    logp, entropy = token_logprobs(logits, labels, return_entropy=True, inplace_backward=inplace, backend=backend_name)
    torch.autograd.grad((logp.sum() + entropy.sum()), logits)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    gradient = 0 if inplace else n * vocab * 2
    chunk = 4 * CHUNK_BYTES["cuda"] if backend_name == "torch" else 0
    assert peak <= gradient + chunk + (16 << 20), f"peak {peak / 2**20:.0f} MiB"
    assert peak < n * vocab * 4
