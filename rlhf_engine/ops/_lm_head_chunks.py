"""The chunk schedule of the fused lm_head + logprobs ops (both backends).

Logits ``z = (hidden @ weight.T + bias) / temperature`` are never held in full:

* forward, over token chunks: ``logits_c = hidden_c @ weight.T + bias`` ([C, V], model
  dtype, a dense GEMM), then the token_logprobs epilogue of the chosen backend (one
  online-logsumexp pass) gives ``logp``, ``entropy`` and the row ``lse`` (fp32 ``[N]``).
* backward, over vocabulary tiles: ``logits_t = hidden @ weight_t.T + bias_t`` ([N, Vt]) is
  recomputed, the token_logprobs backward epilogue turns it in place into
  ``dz_t = d loss / d logits_t`` (fp32 math, the row ``lse``/``entropy`` make it exact for
  a slice of the vocabulary), then two GEMMs: ``d weight_t = dz_t.T @ hidden`` (one GEMM
  reduces over every token, so it accumulates in fp32 inside the GEMM and rounds once)
  and ``d hidden += dz_t @ weight_t`` (product and sum over tiles in an fp32 ``[N, H]``
  buffer). Vocabulary tiles rather than token chunks in backward so that ``d weight``
  needs no fp32 ``[V, H]`` accumulator.

A chunk holds at most ``chunk_size * V`` logits in both directions. FLOPs: forward
``2·N·H·V``; backward ``6·N·H·V`` (recompute, d hidden, d weight).
"""

from __future__ import annotations

from typing import Callable

import torch

# Rows per chunk when the caller gives no chunk_size: at least MIN_CHUNK_ROWS, for the
# GEMM's efficiency (each chunk's GEMM re-reads the whole [V, H] weight), and more while the
# chunk's logits stay within CHUNK_BYTES, for memory. Measured on the CPU (2-core, fp32,
# H = 896, torch 2.13, 2026-12-02), F.linear GFLOP/s at 16 / 32 / 64 / 128 / 256 / 512 /
# 1024 rows: V = 151936: 65 / 119 / 142 / 227 / 225 / 254 / 270; V = 32000: 80 / 116 / 154
# / 259 / 256 / 246 / 274. From 128 rows a chunk runs within 15% of the best rate; 256 keeps
# a margin (at V = 151936, fp32: 148 MiB of logits). The old 16 MiB CPU budget gave 27 rows
# there, at half the rate. On CUDA the budget, 512 MiB of logits (1765 rows of bf16 at
# V = 151936), keeps the GEMM large; its 256-row floor is the CPU's, not yet measured on GPU.
MIN_CHUNK_ROWS = {"cpu": 256, "cuda": 256}
CHUNK_BYTES = {"cpu": 64 << 20, "cuda": 512 << 20}


def chunk_rows_for(num_tokens: int, vocab: int, element_bytes: int, device_type: str) -> int:
    """Rows per chunk of logits by the rule above (other device types take CUDA's);
    ``element_bytes`` of the model dtype. Pure, for the memory planner too."""
    kind = device_type if device_type in CHUNK_BYTES else "cuda"
    rows = max(MIN_CHUNK_ROWS[kind], CHUNK_BYTES[kind] // (vocab * element_bytes))
    return max(1, min(num_tokens, rows))


def default_chunk_rows(num_tokens: int, vocab: int, dtype: torch.dtype, device: torch.device) -> int:
    return chunk_rows_for(num_tokens, vocab, torch.finfo(dtype).bits // 8, device.type)


def vocab_tile(num_tokens: int, vocab: int, chunk_rows: int) -> int:
    """Columns per backward tile, so a tile holds as many logits as a forward chunk."""
    return max(1, min(vocab, chunk_rows * vocab // max(num_tokens, 1)))


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.nn.functional.linear(hidden, weight, bias)


def _add_product_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` with the product never rounded to the model dtype (fp32 ``acc``):
    rounding each vocabulary tile's part of d hidden would add one rounding per tile."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    if a.is_cuda:
        try:  # bf16/fp16 GEMM accumulating into fp32 in place (torch >= 2.8 on CUDA): no product temporary
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            return
        except torch.cuda.OutOfMemoryError:
            raise  # a real failure: the upcast below would only need more memory
        except (TypeError, RuntimeError):  # this torch has no fp32-output GEMM for a's dtype
            pass
    acc.addmm_(a.float(), b.float())


def chunked_logprobs_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    temperature: float,
    ignore_index: int,
    with_entropy: bool,
    chunk_rows: int,
    epilogue_fwd: Callable,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden ``[N, H]``, weight ``[V, H]``, bias ``[V]`` or None, labels ``[N]`` ->
    fp32 ``(logp [N], entropy [N] or [0], lse [N])``.

    ``epilogue_fwd`` has the signature of ``kernels.logprobs.token_logprobs_fwd``.
    """
    n = hidden.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    logp = torch.empty(n, **f32)
    entropy = torch.empty(n if with_entropy else 0, **f32)
    lse = torch.empty(n, **f32)
    for start in range(0, n, chunk_rows):
        stop = min(start + chunk_rows, n)
        logits = _logits(hidden[start:stop], weight, bias)
        lp, h, s = epilogue_fwd(logits[None], labels[start:stop], temperature, ignore_index, with_entropy)
        logp[start:stop] = lp
        lse[start:stop] = s
        if with_entropy:
            entropy[start:stop] = h
    return logp, entropy, lse


def chunked_logprobs_bwd(
    grad_logp: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    temperature: float,
    ignore_index: int,
    chunk_rows: int,
    epilogue_bwd: Callable,
    need_dweight: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients ``(d hidden [N, H], d weight [V, H], d bias [V] or None)`` in the dtypes
    of ``hidden``, ``weight`` and ``bias``, for upstream fp32 ``grad_logp [N]`` (and
    ``grad_entropy [N]`` with the forward's ``entropy``, or both None).
    ``need_dweight`` False (a frozen lm_head): no ``d weight`` / ``d bias`` GEMMs, and
    ``[0]`` / None in their place.

    ``epilogue_bwd`` has the signature of ``kernels.logprobs.token_logprobs_bwd``.
    """
    n, vocab = hidden.shape[0], weight.shape[0]
    dhidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    # Contiguous whatever the weight's layout, so each tile's rows are a valid GEMM output.
    dweight = torch.empty(weight.shape if need_dweight else (0,), dtype=weight.dtype, device=weight.device)
    dbias = None if bias is None or not need_dweight else torch.empty(bias.shape, dtype=bias.dtype, device=bias.device)
    if n == 0:
        dweight.zero_()
        if dbias is not None:
            dbias.zero_()
        return dhidden.to(hidden.dtype), dweight, dbias
    cols = vocab_tile(n, vocab, chunk_rows)
    for start in range(0, vocab, cols):
        stop = min(start + cols, vocab)
        w = weight[start:stop]
        dz = _logits(hidden, w, None if bias is None else bias[start:stop])
        epilogue_bwd(grad_logp, grad_entropy, dz[None], labels, lse, entropy, dz[None], temperature, ignore_index, start)
        if need_dweight:
            torch.mm(dz.t(), hidden, out=dweight[start:stop])
        _add_product_fp32(dhidden, dz, w)
        if dbias is not None:
            dbias[start:stop] = torch.sum(dz, dim=0, dtype=torch.float32)
    return dhidden.to(hidden.dtype), dweight, dbias


def chunked_logprobs_with_grads(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    temperature: float,
    ignore_index: int,
    with_entropy: bool,
    chunk_rows: int,
    need_dhidden: bool,
    need_dweight: bool,
    token_grads: Callable,
    epilogue_fwd: Callable,
    epilogue_bwd: Callable,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The forward and, in the same pass over token chunks, the gradients of a loss whose
    per-token coefficients are known as soon as a chunk's logprobs are: three GEMMs per
    chunk instead of the recompute path's four (``6·N·H·V`` FLOPs, not ``8·N·H·V``).

    Per chunk ``c`` of ``chunk_rows`` tokens: ``logits_c = hidden_c @ weight.T + bias``
    (GEMM 1), the forward epilogue gives ``logp_c``, ``entropy_c``, ``lse_c``;
    ``token_grads(start, stop, logp_c, entropy_c)`` gives fp32 ``d loss / d logp_c`` and
    ``d loss / d entropy_c`` (or None); the backward epilogue turns the chunk's logits into
    ``dz_c`` in place; ``d hidden_c = dz_c @ weight`` (GEMM 2, every vocabulary column in
    one GEMM: rounded once) and ``d weight += dz_c.T @ hidden_c`` (GEMM 3).

    ``d weight`` sums over chunks: in an fp32 ``[V, H]`` accumulator for a 16-bit weight
    when there is more than one chunk (a 16-bit running sum would round once per chunk),
    in the weight itself otherwise. ``need_dhidden`` / ``need_dweight`` False skip GEMM 2 /
    GEMM 3 (a frozen lm_head under LoRA needs no ``d weight``).

    Returns fp32 ``(logp [N], entropy [N] or [0])``, ``d hidden [N, H]`` (hidden's dtype;
    ``[0]`` when not needed), ``d weight [V, H]`` (weight's dtype; ``[0]`` when not needed)
    and ``d bias [V]`` (or None without a bias or ``need_dweight``).
    """
    n, vocab = hidden.shape[0], weight.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    logp = torch.empty(n, **f32)
    entropy = torch.empty(n if with_entropy else 0, **f32)
    dhidden = torch.empty(hidden.shape if need_dhidden else (0,), dtype=hidden.dtype, device=hidden.device)
    dweight = dbias = None
    if need_dweight:
        fp32_sum = n > chunk_rows and weight.dtype != torch.float32
        dweight = torch.zeros(weight.shape, dtype=torch.float32 if fp32_sum else weight.dtype, device=weight.device)
        dbias = None if bias is None else torch.zeros(bias.shape, **f32)
    for start in range(0, n, chunk_rows):
        stop = min(start + chunk_rows, n)
        rows = hidden[start:stop]
        dz = _logits(rows, weight, bias)
        lp, h, lse = epilogue_fwd(dz[None], labels[start:stop], temperature, ignore_index, with_entropy)
        logp[start:stop] = lp
        if with_entropy:
            entropy[start:stop] = h
        grad_logp, grad_entropy = token_grads(start, stop, lp, h if with_entropy else None)
        epilogue_bwd(
            grad_logp, grad_entropy, dz[None], labels[start:stop], lse, h if grad_entropy is not None else None, dz[None],
            temperature, ignore_index, 0,
        )  # fmt: skip
        if need_dhidden:
            torch.mm(dz, weight, out=dhidden[start:stop])
        if need_dweight:
            if dweight.dtype == dz.dtype:
                dweight.addmm_(dz.t(), rows)
            else:
                _add_product_fp32(dweight, dz.t(), rows)
            if dbias is not None:
                dbias += torch.sum(dz, dim=0, dtype=torch.float32)
    if dweight is None:
        return logp, entropy, dhidden, weight.new_empty(0), None
    # The fp32 sum's one rounding to the weight dtype (both exist for this copy only).
    return logp, entropy, dhidden, dweight.to(weight.dtype), None if dbias is None else dbias.to(bias.dtype)
