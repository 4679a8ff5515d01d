"""Torch backend of ``rlhf_engine.ops.token_logprobs`` (spec:
``rlhf_engine/reference/logprobs.py``).

:func:`token_logprobs_fwd_torch` / :func:`token_logprobs_bwd_torch`: same math and same
launcher signatures as ``rlhf_engine.kernels.logprobs``, but processed in row chunks so
no fp32 copy of the whole ``[N, V]`` logits is ever held.
"""

from __future__ import annotations

import threading
from typing import Iterator

import torch
from torch._subclasses.fake_tensor import FakeTensor

from rlhf_engine.torch_backend.aggregation import host_readable


# Bytes of one fp32 [rows, V] temporary (with entropy a chunk holds two). On the CPU a
# chunk is a trade: each costs ~15 small ops (~15 us), so 0.25-1 MiB chunks measured
# slower than 4 MiB ones at [128..4096, 4096] logits, and buffers of 16-64 MiB are slower
# again (out of cache). On CUDA, large chunks amortize kernel launches and the caching
# allocator reuses them anyway.
CHUNK_BYTES = {"cpu": 4 << 20, "cuda": 64 << 20}

# exp(x) is computed as exp2(x * log2(e)): on the CPU torch's exp2 runs ~4x faster than
# its exp (torch 2.13, AVX512: 0.15 vs 0.64 ns a float), and exp was most of this backend's
# time. As in the Triton kernels, the exponent ``x * log2(e) / T - shift`` comes from one
# fused multiply-add over the chunk, its rounding one fp32 ulp of ``x * log2(e) / T``.
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453

# Where a probability is exactly 0 (a -inf logit), log2 p is -inf and p * log2 p must be
# 0, not NaN. Clamping log2 p at this bound keeps the product 0 and exp2 of it is still 0.
_LOG_FLOOR = -1.0e4


def _chunk_rows(vocab: int, device: torch.device) -> int:
    return max(1, CHUNK_BYTES.get(device.type, CHUNK_BYTES["cuda"]) // (4 * vocab))


def _row_chunks(d0: int, d1: int, vocab: int, device: torch.device) -> Iterator[tuple[tuple, slice]]:
    """Split rows of a ``[d0, d1, V]`` view into chunks of at most ``_chunk_rows`` rows.

    Yields ``(index, flat)``: the chunk is ``view[index]``, ``[rows, V]`` when it lies in
    one ``d1`` run and ``[runs, d1, V]`` when it spans several, and its rows are ``flat``
    in the flattened row order (always one contiguous range).
    """
    rows = _chunk_rows(vocab, device)
    if d1 >= rows:
        for a in range(d0):
            for c in range(0, d1, rows):
                e = min(c + rows, d1)
                yield (a, slice(c, e)), slice(a * d1 + c, a * d1 + e)
    else:
        step = rows // d1
        for a in range(0, d0, step):
            b = min(a + step, d0)
            yield (a if b == a + 1 else slice(a, b),), slice(a * d1, b * d1)


# Per thread, the CPU scratch memory kept between calls (see _scratch).
_CPU_WORKSPACE = threading.local()


def _scratch(logits: torch.Tensor, count: int) -> list[torch.Tensor]:
    """``count`` fp32 ``[rows, V]`` buffers that every chunk of ``logits [D0, D1, V]`` reuses.

    On the CPU they are views of a per-thread workspace kept between calls: glibc hands
    the top of a freed heap back to the OS, so a fresh multi-MiB buffer page-faults on
    every call (~250 faults, ~0.1 ms a call at ``[128, 4096]``, a fifth of the op). The
    workspace only grows, to at most ``count * CHUNK_BYTES["cpu"]``, and no buffer outlives
    the call that took it. On CUDA the caching allocator already reuses memory. Fake
    tensors (``FakeTensorMode``) get fresh buffers too: the workspace must stay real.
    """
    d0, d1, vocab = logits.shape
    rows = min(_chunk_rows(vocab, logits.device), d0 * d1)
    numel = count * rows * vocab
    if logits.device.type != "cpu" or isinstance(logits, FakeTensor):
        memory = torch.empty(numel, dtype=torch.float32, device=logits.device)
    else:
        memory = getattr(_CPU_WORKSPACE, "memory", None)
        if memory is None or memory.numel() < numel:
            memory = _CPU_WORKSPACE.memory = torch.empty(numel, dtype=torch.float32)
    return list(memory[:numel].view(count, rows, vocab))


def _shaped_like(rows: torch.Tensor, chunk: torch.Tensor) -> torch.Tensor:
    """``rows [r, V]`` viewed with the shape of ``chunk`` (``[r, V]`` or ``[runs, d1, V]``)."""
    return rows if chunk.dim() == 2 else rows.view(chunk.shape)


def _load(buf: torch.Tensor, chunk: torch.Tensor) -> torch.Tensor:
    """``chunk`` as fp32 ``[rows, V]``, copied into the first rows of ``buf``."""
    x = buf[: chunk.numel() // chunk.shape[-1]]
    _shaped_like(x, chunk).copy_(chunk)
    return x


def _clamped_labels(labels: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(safe, outside)``: the labels clamped into ``[0, V)`` as int64, so they can index
    the logits with no device-side assert and no sync, and where that changed them (an
    out-of-range label, or ``ignore_index`` when it lies outside ``[0, V)``)."""
    safe = labels.clamp(0, vocab - 1).long()
    return safe, safe != labels


def _zero_rows(t: torch.Tensor, rows: torch.Tensor) -> None:
    """Zero ``t[i, j, :]`` (``t [D0, D1, V]``) wherever ``rows.view(D0, D1)`` is True."""
    if host_readable(rows):
        # masked_fill_ over all of t costs as much as the rest of the backward on the CPU;
        # index only the selected rows (reading the mask is free there; a fake tensor has
        # no values to find the rows by).
        flat = rows.nonzero().view(-1)
        if flat.numel():
            t[flat // t.shape[1], flat % t.shape[1]] = 0.0
    else:
        t.masked_fill_(rows.view(t.shape[0], t.shape[1], 1), 0.0)


def token_logprobs_fwd_torch(
    logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    ignore_index: int,
    with_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward of the torch backend; the signature of ``kernels.logprobs.token_logprobs_fwd``.

    logits ``[D0, D1, V]`` (any strides), labels ``[N]``. Returns fp32 ``logp [N]``,
    ``entropy [N]`` (``[0]`` unless ``with_entropy``), ``lse [N]`` (0 on ignored rows).
    Out-of-range labels give NaN rows.
    """
    d0, d1, vocab = logits.shape
    n = d0 * d1
    f32 = dict(dtype=torch.float32, device=logits.device)
    ignored = labels == ignore_index
    safe, outside = _clamped_labels(labels, vocab)
    scale = _LOG2E / temperature
    # Per row, from the chunk loop: the label's logit x_y, the row max m, and with
    # u = (x - m) * log2(e) / T (log2 of the unnormalized probability): s = sum(2^u) and
    # sum(2^u * u). The rest is per-row math after the loop.
    x_label = torch.empty(n, **f32)
    row_max = torch.empty(n, **f32)
    sum_e = torch.empty(n, **f32)
    sum_eu = torch.empty(n if with_entropy else 0, **f32)
    buf, *e_buf = _scratch(logits, 2 if with_entropy else 1)
    for index, flat in _row_chunks(d0, d1, vocab, logits.device):
        x = _load(buf, logits[index])
        torch.gather(x, 1, safe[flat, None], out=x_label[flat, None])
        # (A row of only -inf logits gives u = NaN: its logp and entropy are NaN anyway.)
        m = torch.amax(x, dim=1, keepdim=True, out=row_max[flat, None])
        u = torch.add(m * -scale, x, alpha=scale, out=x)
        if with_entropy:
            e = torch.exp2(u, out=e_buf[0][: u.shape[0]])
            torch.sum(e, dim=1, out=sum_e[flat])
            # Centred on the row max so H does not cancel two large numbers; mul + sum
            # rather than bmm: sum() adds pairwise, bmm's dot loses ~1e-5 here.
            torch.sum(u.clamp_(min=_LOG_FLOOR).mul_(e), dim=1, out=sum_eu[flat])
        else:
            torch.sum(u.exp2_(), dim=1, out=sum_e[flat])
    # Out-of-range labels: NaN rows (and ignored rows, zeroed next, when ignore_index is
    # outside [0, V)).
    log_s = sum_e.masked_fill_(outside, float("nan")).log()
    lse = torch.add(log_s, row_max, alpha=1.0 / temperature).masked_fill_(ignored, 0.0)
    logp = torch.sub(lse, x_label, alpha=1.0 / temperature).neg_().masked_fill_(ignored, 0.0)
    entropy = sum_eu
    if with_entropy:
        # H = log s - sum(e * (z - max z)) / s, and z - max z = u * ln 2.
        entropy = sum_eu.div_(sum_e).mul_(-_LN2).add_(log_s).masked_fill_(ignored, 0.0)
    return logp, entropy, lse


def token_logprobs_bwd_torch(
    grad_logp: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    dlogits: torch.Tensor,
    temperature: float,
    ignore_index: int,
    label_offset: int = 0,
) -> None:
    """Backward of the torch backend; writes the logits gradient into ``dlogits``.

    ``dlogits = ((p - onehot) * (-grad_logp) - grad_entropy * p * (z - E_p[z])) / T``,
    with ``z - E_p[z] = log p + H``; zero rows where the label is ignored. ``dlogits``
    (a ``[D0, D1, V]`` view with the leading sizes of ``logits``) may be ``logits`` itself:
    each chunk is copied to fp32 before its rows are overwritten. ``label_offset``: the
    vocabulary id of column 0 when ``logits`` is a vocabulary slice (a label outside the
    slice adds no one-hot term).
    """
    d0, d1, vocab = logits.shape
    scale = _LOG2E / temperature
    ignored = labels == ignore_index
    safe, outside = _clamped_labels(labels - label_offset if label_offset else labels, vocab)
    # Per row: g = p * (c + c_h * (log p + H)) - c * onehot, with log p = u * ln 2 and
    # u = x * log2(e) / T - lse * log2(e). Ignored rows are zeroed at the end, so c needs no
    # masking; out-of-range labels have a NaN lse, so their rows are NaN whatever is added.
    c = grad_logp * (-1.0 / temperature)
    onehot_c = torch.neg(c).masked_fill_(outside, 0.0)  # a label outside a vocabulary slice adds no one-hot
    neg_lse2 = lse * -_LOG2E
    if grad_entropy is not None:
        c_h = grad_entropy * (-1.0 / temperature)
        u_coef = c_h * _LN2
        const = torch.addcmul(c, c_h, entropy)
    buf, *p_buf = _scratch(logits, 1 if grad_entropy is None else 2)
    for index, flat in _row_chunks(d0, d1, vocab, logits.device):
        x = _load(buf, logits[index])
        u = torch.add(neg_lse2[flat, None], x, alpha=scale, out=x)
        if grad_entropy is None:
            g = u.exp2_().mul_(c[flat, None])
        else:
            p = torch.exp2(u, out=p_buf[0][: u.shape[0]])
            g = u.clamp_(min=_LOG_FLOOR).mul_(u_coef[flat, None]).add_(const[flat, None]).mul_(p)
        g.scatter_add_(1, safe[flat, None], onehot_c[flat, None])
        chunk = dlogits[index]
        chunk.copy_(_shaped_like(g, chunk))
    # Ignored rows never read their logits in the Triton kernel; here they were read, so
    # zero them explicitly in case those logits were inf or NaN.
    _zero_rows(dlogits, ignored)
