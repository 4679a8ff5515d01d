"""Benchmark: group_advantages, gae, discounted_returns, masked_whiten.

Compared on the same inputs: our backends (triton and cuda on CUDA, cpp on the CPU, torch
everywhere; ``common.our_backends``), eager
PyTorch written the way TRL / verl write it (``view(-1, G)`` statistics for GRPO; for
explicit group ids verl's per-sample loop, up to 8K samples on the CPU, and a
vectorized ``index_add`` version; the Python loop over time for GAE and
REINFORCE++ returns, mask-multiply whitening), and ``torch.compile`` of that eager code.
There is no Liger-Kernel equivalent of these ops.

Byte floor (each input read once, each output written once), fp32 values, bool mask:

* group_advantages: scores 4 B + (group ids 8 B) + advantages 4 B per sequence.
* gae: rewards 4 + values 4 + mask 1 + advantages 4 + returns 4 = 17 B per token.
* discounted_returns: rewards 4 + mask 1 + returns 4 = 9 B per token.
* masked_whiten: x 4 + mask 1 + out 4 = 9 B per token.

The compiled GAE / returns loops are unrolled over T by dynamo, so their first call
compiles a graph of ~10·T ops (slow at T = 2048; that is what a user of the loop gets).

``python -m rlhf_engine.benchmarks.bench_advantages [--quick] [--out FILE.json]``
"""


from collections import defaultdict

import torch

from rlhf_engine import ops
from rlhf_engine.benchmarks.common import Result, compiled, measure, our_backends, script_main, sweep

GAMMA, LAM = 1.0, 0.95
# verl's per-sample loop over group ids takes ~10 us a sample on the CPU (seconds from
# tens of thousands; on a GPU each sample is a sync): timed up to this many samples
VERL_LOOP_MAX = 8192


# ----------------------------------------------------------- eager code, as trainers write it


def eager_grpo(scores, group_size):
    grouped = scores.view(-1, group_size)
    mean = grouped.mean(dim=1).repeat_interleave(group_size)
    std = grouped.std(dim=1).repeat_interleave(group_size)
    return (scores - mean) / (std + 1e-4)


def eager_grpo_verl_loop(scores, index, eps=1e-6):
    """GRPO over explicit groups as verl computes it from its per-sample ``index`` (a numpy
    array of prompt ids): a dict of each group's scores, mean and unbiased std per group
    (mean 0, std 1 for a singleton), then a loop over the samples."""
    members = defaultdict(list)
    for i in range(len(index)):
        members[index[i]].append(scores[i])
    stats = {}
    for group, values in members.items():
        if len(values) == 1:
            stats[group] = (torch.tensor(0.0), torch.tensor(1.0))
        else:
            stacked = torch.stack(values)
            stats[group] = (stacked.mean(), stacked.std())
    out = scores.clone()
    for i in range(len(index)):
        mean, std = stats[index[i]]
        out[i] = (scores[i] - mean) / (std + eps)
    return out


def eager_grpo_ids(scores, group_ids, num_groups):
    """A vectorized version of grouping by ids (``index_add``), stronger than what TRL or
    verl ship (TRL has no ids path; verl loops, :func:`eager_grpo_verl_loop`)."""
    count = torch.zeros(num_groups, device=scores.device).index_add_(0, group_ids, torch.ones_like(scores))
    mean = torch.zeros(num_groups, device=scores.device).index_add_(0, group_ids, scores) / count
    centered = scores - mean[group_ids]
    var = torch.zeros(num_groups, device=scores.device).index_add_(0, group_ids, centered**2) / (count - 1)
    return centered / (var.sqrt()[group_ids] + 1e-4)


def eager_masked_whiten(x, mask, eps=1e-8):
    mask = mask.to(x.dtype)
    n = mask.sum()
    mean = (x * mask).sum() / n
    centered = x - mean
    var = (centered**2 * mask).sum() / n * (n / (n - 1))
    return centered * torch.rsqrt(var + eps)


def eager_gae(rewards, values, mask, gamma=GAMMA, lam=LAM):
    # The loop over time with observation-token carry, then whitening.
    mask = mask.to(values.dtype)
    next_value = torch.zeros_like(values[:, 0])
    last_adv = torch.zeros_like(values[:, 0])
    reversed_adv = []
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv_t = delta + gamma * lam * last_adv
        next_value = values[:, t] * mask[:, t] + (1 - mask[:, t]) * next_value
        last_adv = adv_t * mask[:, t] + (1 - mask[:, t]) * last_adv
        reversed_adv.append(last_adv)
    advantages = torch.stack(reversed_adv[::-1], dim=1)
    returns = advantages + values
    return eager_masked_whiten(advantages, mask) * mask, returns


def eager_discounted_returns(rewards, mask, gamma=GAMMA):
    mask = mask.to(rewards.dtype)
    running = torch.zeros_like(rewards[:, 0])
    returns = torch.zeros_like(rewards)
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running
        returns[:, t] = running
        running = running * mask[:, t]
    return returns


# --------------------------------------------------------------------------------- runs


def _group_at(device, quick, num_groups) -> list[Result]:
    group_size = 8
    S = num_groups * group_size
    scores = torch.randn(S, device=device)
    ids = torch.randperm(S, device=device) // group_size  # a shuffled batch
    results = []
    impls = {f"ours ({b})": (lambda b=b: ops.group_advantages(scores, group_size=group_size, backend=b))
             for b in our_backends(device, "group_advantages")}
    impls["eager (TRL view/std)"] = lambda: eager_grpo(scores, group_size)
    compiled_grpo = compiled(eager_grpo)
    impls["torch.compile (TRL)"] = lambda: compiled_grpo(scores, group_size)
    results += measure("group_adv grpo G", f"S={S} G={group_size}", impls, device=device, bytes_moved=8 * S, quick=quick)

    impls = {
        f"ours ({b})": (lambda b=b: ops.group_advantages(scores, group_ids=ids, num_groups=num_groups, backend=b))
        for b in our_backends(device, "group_advantages")
    }
    if device.type == "cpu" and S <= VERL_LOOP_MAX:
        index = ids.numpy()
        impls["eager (verl's loop)"] = lambda: eager_grpo_verl_loop(scores, index)
    impls["eager (index_add)"] = lambda: eager_grpo_ids(scores, ids, num_groups)
    compiled_ids = compiled(eager_grpo_ids)
    impls["torch.compile (index_add)"] = lambda: compiled_ids(scores, ids, num_groups)
    results += measure("group_adv grpo ids", f"S={S} groups={num_groups}", impls, device=device, bytes_moved=16 * S, quick=quick)
    return results


def _tokens(device, B, T):
    rewards = torch.randn(B, T, device=device)
    values = torch.randn(B, T, device=device)
    lengths = torch.randint(1, T + 1, (B, 1), device=device)
    mask = torch.arange(T, device=device)[None, :] < lengths  # right padding
    return rewards, values, mask, f"B={B} T={T}"


def _gae_at(device, quick, B, T) -> list[Result]:
    rewards, values, mask, shape = _tokens(device, B, T)
    N = rewards.numel()
    impls = {
        f"ours ({b})": (lambda b=b: ops.gae(rewards, values, mask, gamma=GAMMA, lam=LAM, backend=b))
        for b in our_backends(device, "gae")
    }
    impls["eager (loop over T)"] = lambda: eager_gae(rewards, values, mask)
    compiled_gae = compiled(eager_gae)
    impls["torch.compile (loop)"] = lambda: compiled_gae(rewards, values, mask)
    results = measure("gae", shape, impls, device=device, bytes_moved=17 * N, quick=quick)

    impls = {
        f"ours ({b})": (lambda b=b: ops.discounted_returns(rewards, mask, gamma=GAMMA, backend=b))
        for b in our_backends(device, "discounted_returns")
    }
    impls["eager (loop over T)"] = lambda: eager_discounted_returns(rewards, mask)
    compiled_returns = compiled(eager_discounted_returns)
    impls["torch.compile (loop)"] = lambda: compiled_returns(rewards, mask)
    results += measure("discounted_returns", shape, impls, device=device, bytes_moved=9 * N, quick=quick)
    return results


def _whiten_at(device, quick, N) -> list[Result]:
    x = torch.randn(N, device=device)
    mask = torch.rand(N, device=device) > 0.2
    impls = {f"ours ({b})": (lambda b=b: ops.masked_whiten(x, mask, backend=b)) for b in our_backends(device, "masked_whiten")}
    impls["eager (mask multiply)"] = lambda: eager_masked_whiten(x, mask)
    compiled_whiten = compiled(eager_masked_whiten)
    impls["torch.compile"] = lambda: compiled_whiten(x, mask)
    return measure("masked_whiten", f"N={N}", impls, device=device, bytes_moved=9 * N, quick=quick)


def run(device: torch.device, quick: bool) -> list[Result]:
    # On the CPU: from a GRPO batch of a few hundred sequences, and from 512 tokens, up.
    return (
        sweep(_group_at, device, quick, small=1024, cuda=65536, cpu=[64, 1024, 8192])
        + sweep(_gae_at, device, quick, small=(16, 32), cuda=(512, 2048), cpu=[(16, 32), (16, 256)])
        + sweep(_whiten_at, device, quick, small=1 << 16, cuda=1 << 20, cpu=[1 << 12, 1 << 16, 1 << 20])
    )


if __name__ == "__main__":
    script_main(run, __doc__)
