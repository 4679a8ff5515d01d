"""End-to-end policy-update step: model forward + lm_head + clipped loss + backward.

One Llama-style model (``rlhf_engine.models.llama_config`` widened, Qwen2's vocabulary
``V = 151936``, tied embeddings, bf16) and one batch of prompt + response (prompts of
``P`` tokens, responses of ``R`` tokens with ragged ends), timed three ways in one run:

* ``ours-<backend>``: what ``RLTrainer.update_policy`` does,
  ``policy.response_hidden(...)`` then ``ops.fused_linear_policy_loss(hidden,
  policy.lm_head_weight, ...)``: the logits never exist in full;
* ``eager``: the way TRL's GRPO trainer does it, ``policy.lm(..., logits_to_keep=R + 1)
  .logits[:, :-1]`` (``[B, R, V]`` logits), divided by the temperature, a selective
  log-softmax (``log_softmax`` + ``gather`` per sequence), the clipped loss in plain PyTorch;
* ``compiled``: the same, with the logits-to-loss part under ``torch.compile`` (the
  model forward stays eager).

The loss in all three: PPO clip 0.2, per-sequence advantages, token-mean over the
response mask, no KL term. Each row is forward + ``loss.backward()`` into every
parameter's ``.grad`` (no optimizer step); the gradients are dropped after each call,
so peak memory includes them. Before timing, ours and eager must give the same loss and
the same lm_head (= embedding) weight gradient on the timed model and batch, each of
our backends (relative 1e-4 in fp32; 0.1 in bf16, where eager's bf16 log-softmax rounds:
a shifted label is off by far more), else the run fails.

FLOPs (the floor): ``6 · (params − V·H) · B·(P+R)`` for the transformer body (embedding
lookup free), ``6 · L · B · (P+R)² · H`` for causal attention scores and values, and
``6 · N · H · V`` for the lm_head on the ``N = B·R`` response positions (what ours does:
the fused loss makes the lm_head's gradients in its forward, three GEMMs). Bytes:
weights read twice and their gradients written once, plus the per-token inputs
(token ids, masks, old logprobs, advantages; activations are not counted): the FLOPs
dominate the floor. Tokens per step ``B·(P+R)``; the JSON rows add ``tokens_per_s``.

Full size (a GPU): hidden 2048, 8 layers, 16 heads (8 KV), MLP 5632, B=8, P=512, R=1024.
Quick: hidden 64, 2 layers, V=2048, B=4, P=16, R=48 (fp32 on the CPU, bf16 on CUDA).

``python -m rlhf_engine.benchmarks.bench_train_step [--quick] [--out FILE.json]``
"""

from __future__ import annotations

import dataclasses

import torch

from rlhf_engine import ops
from rlhf_engine._backend import triton_runs_on
from rlhf_engine.benchmarks.bench_fused_linear import selective_log_softmax
from rlhf_engine.benchmarks.common import Result, compiled, measure, script_main
from rlhf_engine.models import PolicyModel, llama_config
from rlhf_engine.models.inputs import position_ids_from_mask

TEMPERATURE, CLIP = 1.0, 0.2
FULL = dict(
    hidden_size=2048, intermediate_size=5632, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=8,
    head_dim=128,
)  # fmt: skip


@dataclasses.dataclass
class StepResult(Result):
    """A row with the tokens through the model per step, and tokens/s in its JSON."""

    tokens: int = 0

    @property
    def tokens_per_s(self) -> float | None:
        return None if not self.ms else self.tokens / (self.ms * 1e-3)

    def as_dict(self) -> dict:
        return {**super().as_dict(), "tokens_per_s": self.tokens_per_s}


def eager_loss(logits, labels, old_logp, advantages, mask):
    """TRL-style: tempered logits -> selective log-softmax -> clipped loss, token-mean."""
    logp = selective_log_softmax(logits / TEMPERATURE, labels)
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None]
    per_token = -torch.min(ratio * adv, torch.clamp(ratio, 1 - CLIP, 1 + CLIP) * adv)
    m = mask.to(per_token.dtype)
    return (per_token * m).sum() / m.sum().clamp(min=1)


def ours_step(policy, backend, input_ids, attention_mask, prompt_len, labels, old_logp, advantages, mask):
    hidden = policy.response_hidden(input_ids, attention_mask, prompt_len)
    loss, _ = ops.fused_linear_policy_loss(
        hidden, policy.lm_head_weight, labels, old_logp, advantages, mask, temperature=TEMPERATURE, loss="ppo",
        clip_low=CLIP, aggregation="token-mean", backend=backend,
    )  # fmt: skip
    return loss


def eager_step(loss_fn, policy, input_ids, attention_mask, prompt_len, labels, old_logp, advantages, mask):
    response_len = input_ids.shape[1] - prompt_len
    logits = policy.lm(
        input_ids=input_ids, attention_mask=attention_mask.long(), position_ids=position_ids_from_mask(attention_mask),
        use_cache=False, logits_to_keep=response_len + 1,
    ).logits[:, :-1]  # fmt: skip
    return loss_fn(logits, labels, old_logp, advantages, mask)


def _train(policy, step, *args):
    """``step(policy, *args).backward()`` into ``.grad``; the gradients are dropped afterwards."""

    def call():
        loss = step(policy, *args)
        loss.backward()
        policy.zero_grad(set_to_none=True)
        return loss.detach()

    return call


def _loss_and_head_grad(policy, step, *args):
    loss = step(policy, *args)
    loss.backward()
    grad = policy.lm_head_weight.grad.float().clone()
    policy.zero_grad(set_to_none=True)
    return loss.item(), grad


def _check_same(name, policy, ours, eager, args, dtype) -> None:
    """Ours and eager must agree before they are compared (a misaligned label or mask
    would change the loss and the gradient by far more than the tolerance)."""
    tol = 1e-4 if dtype == torch.float32 else 1e-1
    loss_a, grad_a = _loss_and_head_grad(policy, ours, *args)
    loss_b, grad_b = _loss_and_head_grad(policy, eager, *args)
    grad_err = float((grad_a - grad_b).norm() / grad_b.norm().clamp(min=1e-30))
    if abs(loss_a - loss_b) > tol * max(1.0, abs(loss_b)) or grad_err > tol:
        raise AssertionError(
            f"train step: {name} (loss {loss_a}) and eager (loss {loss_b}) differ, lm_head gradient relative "
            f"error {grad_err:.2e} (tolerance {tol}): the rows would not be comparable"
        )


def run(device: torch.device, quick: bool) -> list[Result]:
    full = device.type == "cuda" and not quick
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    if full:
        batch, prompt_len, response_len, vocab = 8, 512, 1024, 151936
    else:
        batch, prompt_len, response_len, vocab = 4, 16, 48, 2048
    seq = prompt_len + response_len
    config = llama_config("tiny", vocab, max_position_embeddings=seq)
    if full:
        for key, value in FULL.items():
            setattr(config, key, value)
    policy = PolicyModel.from_config(config, seed=0).to(device=device, dtype=dtype).train()

    input_ids = torch.randint(3, vocab, (batch, seq), generator=gen, device=device)
    response_mask = torch.ones(batch, response_len, dtype=torch.bool, device=device)
    ends = torch.randint(response_len // 2, response_len + 1, (batch,), generator=gen, device=device)
    response_mask &= torch.arange(response_len, device=device) < ends[:, None]  # ragged response ends
    attention_mask = torch.cat([torch.ones(batch, prompt_len, dtype=torch.bool, device=device), response_mask], 1)
    labels = input_ids[:, prompt_len:]
    with torch.no_grad():  # the rollout's logprobs, a little off the current policy: some ratios clipped
        old_logp = policy.response_logprobs(input_ids, attention_mask, prompt_len)
        old_logp = old_logp + 0.05 * torch.randn(old_logp.shape, generator=gen, device=device)
    advantages = torch.randn(batch, generator=gen, device=device)
    args = (input_ids, attention_mask, prompt_len, labels, old_logp, advantages, response_mask)

    backends = [b for b in ("triton", "torch") if b == "torch" or triton_runs_on(device)]
    for b in backends:
        ours = lambda p, *a: ours_step(p, b, *a)  # noqa: E731
        _check_same(f"ours-{b}", policy, ours, lambda p, *a: eager_step(eager_loss, p, *a), args, dtype)
    impls = {f"ours-{b}": _train(policy, lambda p, *a, b=b: ours_step(p, b, *a), *args) for b in backends}
    impls["eager"] = _train(policy, lambda p, *a: eager_step(eager_loss, p, *a), *args)
    compiled_loss = compiled(eager_loss)
    impls["compiled"] = _train(policy, lambda p, *a: eager_step(compiled_loss, p, *a), *args)

    params = sum(p.numel() for p in policy.parameters())
    hdim, layers, n = config.hidden_size, config.num_hidden_layers, batch * response_len
    flops = 6 * (params - vocab * hdim) * batch * seq + 6 * layers * batch * seq**2 * hdim + 6 * n * hdim * vocab
    bytes_moved = 3 * params * policy.lm_head_weight.element_size() + batch * seq * 9 + n * 4 + batch * 4
    dtype_name = {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    shape = f"B={batch} T={prompt_len}+{response_len} H={hdim} L={layers} V={vocab} {dtype_name}"
    # On the CPU the quick shapes take milliseconds a call: they are timed with the full
    # budget (0.25 s, at least 10 calls), as the quick budget's few calls moved the
    # ours/eager ratio by 25% from run to run.
    results = measure(
        "train step fwd+bwd", shape, impls, device=device, bytes_moved=bytes_moved, flops=flops,
        quick=quick and device.type != "cpu", dtype=dtype,
    )  # fmt: skip
    return [StepResult(**dataclasses.asdict(r), tokens=batch * seq) for r in results]


if __name__ == "__main__":
    script_main(run, __doc__)
