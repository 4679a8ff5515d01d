"""Per-token logprobs and entropy in plain PyTorch (ALGORITHMS.md section 1).

Two things live here:

* :func:`token_logprobs_ref`, the executable spec: short, differentiable by autograd, used
  by the tests in float64.
* :func:`token_logprobs_fwd_torch` / :func:`token_logprobs_bwd_torch`, the ``"torch"``
  backend of ``rlhf_engine.ops.token_logprobs`` (the CPU path). Same math, same launcher
  signatures as ``rlhf_engine.kernels.logprobs``, but processed in row chunks so no fp32
  copy of the whole ``[N, V]`` logits is ever held.
"""

from __future__ import annotations

from typing import Iterator

import torch

# Bytes of one fp32 [rows, V] temporary (a chunk holds two). On the CPU, small chunks stay
# in cache and malloc reuses them (fresh large buffers cost page faults: 16-64 MiB chunks
# measured 2-4x slower than 1-4 MiB). On CUDA, large chunks amortize kernel launches and
# the caching allocator reuses them anyway.
CHUNK_BYTES = {"cpu": 4 << 20, "cuda": 64 << 20}

# Where a probability is exactly 0 (a -inf logit), log p is -inf and p * log p must be 0,
# not NaN. Clamping log p at this bound keeps the product 0 and exp() of it is still 0.
_LOG_FLOOR = -1.0e4

_LOG2E = 1.4426950408889634


def _exp_(t: torch.Tensor) -> torch.Tensor:
    """``t = exp(t)`` in place, as ``exp2(t * log2(e))``: on the CPU torch's exp2 runs ~4x
    faster than its exp (torch 2.13, AVX512: 0.15 vs 0.64 ns a float), and exp was most of
    this backend's time. The extra rounding of ``t * log2(e)`` is one fp32 ulp of the
    argument, the accuracy of exp itself."""
    return t.mul_(_LOG2E).exp2_()


def token_logprobs_ref(
    logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
):
    """Spec of ``token_logprobs``.

    logits ``[..., V]`` (any float dtype), labels ``[...]`` integer with values in
    ``[0, V)`` or ``ignore_index``. With ``z = logits / temperature``:
    ``logp = z[label] - logsumexp(z)``, ``entropy = logsumexp(z) - sum(softmax(z) * z)``;
    both 0 where ``label == ignore_index``. Computed in fp32, or in float64 for float64
    logits; returns ``logp`` or ``(logp, entropy)`` in that dtype.
    """
    z = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    lse = torch.logsumexp(z, dim=-1)
    ignored = labels == ignore_index
    safe_labels = torch.where(ignored, torch.zeros_like(labels), labels).long()
    logp = z.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1) - lse
    logp = torch.where(ignored, torch.zeros_like(logp), logp)
    if not return_entropy:
        return logp
    entropy = lse - (torch.softmax(z, dim=-1) * z).sum(dim=-1)
    return logp, torch.where(ignored, torch.zeros_like(entropy), entropy)


def _row_chunks(d0: int, d1: int, vocab: int, device: torch.device) -> Iterator[tuple[slice, slice, slice]]:
    """Split rows of a ``[d0, d1, V]`` view into chunks of about ``CHUNK_BYTES`` of fp32.

    Yields ``(outer, inner, flat)``: the chunk is ``view[outer, inner]`` and its rows are
    ``flat`` in the flattened row order. A chunk is part of one ``d1`` run or whole ``d1``
    runs, so its flat rows are always one contiguous range.
    """
    rows = max(1, CHUNK_BYTES.get(device.type, CHUNK_BYTES["cuda"]) // (4 * vocab))
    if d1 >= rows:
        for a in range(d0):
            for c in range(0, d1, rows):
                e = min(c + rows, d1)
                yield slice(a, a + 1), slice(c, e), slice(a * d1 + c, a * d1 + e)
    else:
        step = rows // d1
        for a in range(0, d0, step):
            b = min(a + step, d0)
            yield slice(a, b), slice(0, d1), slice(a * d1, b * d1)


def _scaled_fp32(x: torch.Tensor, temperature: float) -> torch.Tensor:
    """A fresh fp32 copy of a ``[rows, V]`` chunk divided by the temperature."""
    z = x.to(torch.float32, copy=True)
    if temperature != 1.0:
        z.mul_(1.0 / temperature)
    return z


def _label_masks(labels: torch.Tensor, vocab: int, ignore_index: int):
    ignored = labels == ignore_index
    out_of_range = ~ignored & ((labels < 0) | (labels >= vocab))
    # Out-of-range labels are never used as indices (no device-side assert, no sync).
    safe = torch.where(ignored | out_of_range, torch.zeros_like(labels), labels).long()
    return ignored, out_of_range, safe


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
    logp = torch.empty(n, **f32)
    entropy = torch.empty(n if with_entropy else 0, **f32)
    lse = torch.empty(n, **f32)
    nan = torch.full((), float("nan"), **f32)  # a fill, not a host copy: CUDA-graph safe
    zero = torch.zeros((), **f32)
    for outer, inner, flat in _row_chunks(d0, d1, vocab, logits.device):
        ignored, out_of_range, safe = _label_masks(labels[flat], vocab, ignore_index)
        z = _scaled_fp32(logits[outer, inner].reshape(-1, vocab), temperature)
        z_label = z.gather(1, safe[:, None]).squeeze(1)
        row_max = z.amax(dim=1)
        # A row of only -inf logits: shift by 0 so that z - shift stays -inf, not NaN.
        shift = torch.where(row_max == float("-inf"), zero, row_max)
        z.sub_(shift[:, None])
        e = _exp_(z.clone()) if with_entropy else _exp_(z)
        s = e.sum(dim=1)
        log_s = s.log()
        row_lse = torch.where(out_of_range, nan, shift + log_s)
        logp[flat] = torch.where(ignored, zero, z_label - row_lse)
        lse[flat] = torch.where(ignored, zero, row_lse)
        if with_entropy:
            # H = log s - sum(e * (z - shift)) / s, centred on the row max. In place, and
            # mul + sum rather than bmm: sum() adds pairwise, bmm's dot loses ~1e-5 here.
            centred_mean = z.clamp_(min=_LOG_FLOOR).mul_(e).sum(dim=1) / s
            h = torch.where(out_of_range, nan, log_s - centred_mean)
            entropy[flat] = torch.where(ignored, zero, h)
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
    (a ``[D0, D1, V]`` view with the leading sizes of ``logits``) may be ``logits`` itself: each chunk is copied to fp32 before
    its rows are overwritten. ``label_offset``: the vocabulary id of column 0 when
    ``logits`` is a vocabulary slice (a label outside the slice adds no one-hot term).
    """
    d0, d1, vocab = logits.shape
    inv_t = 1.0 / temperature
    zero = torch.zeros((), dtype=torch.float32, device=logits.device)
    for outer, inner, flat in _row_chunks(d0, d1, vocab, logits.device):
        chunk_labels = labels[flat]
        ignored = chunk_labels == ignore_index
        _, outside, safe = _label_masks(chunk_labels - label_offset, vocab, ignore_index - label_offset)
        c = torch.where(ignored, zero, -grad_logp[flat] * inv_t)[:, None]
        logp = _scaled_fp32(logits[outer, inner].reshape(-1, vocab), temperature)
        logp.sub_(lse[flat][:, None])
        if grad_entropy is None:
            g = _exp_(logp).mul_(c)
        else:
            c_h = torch.where(ignored, zero, -grad_entropy[flat] * inv_t)[:, None]
            p = _exp_(logp.clone())
            # p * (c + c_h * (log p + H)), built in place in the log p buffer.
            g = logp.clamp_(min=_LOG_FLOOR).add_(entropy[flat][:, None]).mul_(c_h).add_(c).mul_(p)
        g.scatter_add_(1, safe[:, None], torch.where(outside[:, None], zero, -c))
        # Ignored rows never read their logits in the Triton kernel; here they were read,
        # so zero them explicitly in case those logits were inf or NaN.
        if logits.device.type == "cpu":
            # masked_fill_ over the whole [rows, V] chunk costs as much as the rest of the
            # backward on the CPU; zero only the ignored rows (reading the mask is free there).
            rows_ignored = ignored.nonzero().view(-1)
            if rows_ignored.numel():
                g.index_fill_(0, rows_ignored, 0.0)
        else:
            g.masked_fill_(ignored[:, None], 0.0)
        dlogits[outer, inner].copy_(g.view(outer.stop - outer.start, inner.stop - inner.start, vocab))
