"""Benchmark: policy_loss, value_loss and kl_penalty, forward + backward.

Compared on the same inputs: our backends (triton and cuda on CUDA, cpp on the CPU, torch
everywhere; ``common.our_backends``), eager
PyTorch written the way verl / TRL write these losses (elementwise ratio / clip / max,
mask-multiply reductions, metrics as masked means), for PPO also that eager code
extended to return what ours returns (``eager_ppo_same_outputs``), and ``torch.compile``
of the eager code. On the CPU the full run sweeps 4K to 1M tokens. Liger-Kernel has no standalone per-token loss on logprobs (its GRPO losses start
from logits or hidden states and belong with the fused-linear benchmarks), so it has
no row here.

Every row times forward + backward (``torch.autograd.grad`` w.r.t. the logprobs / values,
so no gradient accumulation pass is timed) and the metrics the trainer logs.

Byte floor (each input read once, the loss' gradient written once), fp32 tensors, bool
mask, per token:

* policy_loss PPO (verl: per-token advantages, clip-higher, dual clip):
  logp 4 + old_logp 4 + advantages 4 + mask 1 + d logp 4 = 17 B.
* policy_loss GRPO + KL (TRL: per-sequence advantages, k3 in the loss):
  logp 4 + old_logp 4 + ref_logp 4 + mask 1 + d logp 4 = 17 B (advantages: 4 B per sequence).
* clip_cov / kl_cov (PRIME-RL; clip_cov at verl's defaults, kl_cov at the recipe's ratio
  0.002, as ``CLIP_COV`` / ``KL_COV`` below): the PPO bytes, 17 B; the covariance
  pre-pass reads logp, advantages and the mask once more (plus old_logp for clip_cov),
  which this floor leaves out: a single-pass kernel could do without.
* value_loss: values 4 + old_values 4 + returns 4 + mask 1 + d values 4 = 17 B.
* kl_penalty k3: logp 4 + ref_logp 4 + kl 4 (out) + upstream grad 4 + d logp 4 = 20 B.
* verl's dppo_tv, dppo_kl, geo_mean (rollout IS weights on): logp 4 + old_logp 4 +
  advantages 4 + mask 1 + IS weights 4 + d logp 4 = 21 B. Ours through
  ``rlhf_engine.integrations.verl`` beside verl's own function (``verl.trainer.ppo.core_algos``),
  both returning verl's metrics as floats; rows only where verl is installed.

The fused losses move 8 B per token more than the floor: the fp32 per-token derivative
is written in the forward and read in the backward (the aggregation weight that scales
it is known only after the whole batch is reduced).

``python -m rlhf_engine.benchmarks.bench_policy_loss [--quick] [--out FILE.json]``
"""


import torch

from rlhf_engine import ops
from rlhf_engine.benchmarks.common import Result, compiled, measure, our_backends, script_main, sweep

CLIP_LOW, CLIP_HIGH, DUAL_CLIP, BETA = 0.2, 0.28, 3.0, 0.04
# verl's clip_cov defaults; kl_cov at PRIME-RL's recipe ratio (verl's 0.0002 picks ~1 token)
CLIP_COV = dict(clip_cov_ratio=0.0002, clip_cov_lb=1.0, clip_cov_ub=5.0)
KL_COV = dict(kl_cov_ratio=0.002, ppo_kl_coef=1.0)


# ----------------------------------------------------------- eager code, as trainers write it


def _masked_mean(x, mask):
    return (x * mask).sum() / mask.sum()


def eager_ppo(lp, old, adv, mask):
    """verl-style vanilla PPO loss with clip-higher and dual clip, token-mean."""
    mask = mask.to(lp.dtype)
    log_ratio = torch.clamp(lp - old, min=-20.0, max=20.0)
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1 - CLIP_LOW, 1 + CLIP_HIGH)
    upper = torch.maximum(unclipped, clipped)
    floor = -adv * DUAL_CLIP
    lower = torch.minimum(floor, upper)
    per_token = torch.where(adv < 0, lower, upper)
    metrics = {
        "clipfrac": _masked_mean(torch.gt(clipped, unclipped).float(), mask),
        "clipfrac_lower": _masked_mean((torch.gt(upper, floor) & (adv < 0)).float(), mask),
        "approx_kl": _masked_mean(0.5 * (lp - old) ** 2, mask),
    }
    return _masked_mean(per_token, mask), metrics


def eager_ppo_same_outputs(lp, old, adv, mask):
    """The loss of :func:`eager_ppo` with what ``ops.policy_loss`` returns besides: the
    ratio mean / min / max, masked tokens contributing exactly 0 even where their inputs
    are NaN or inf, and 0 (not NaN) for an all-masked batch. The fair baseline for the
    fixed per-call cost of our torch backend at small sizes, where verl's three metrics
    and multiply-masking are fewer ops."""
    log_ratio = lp - old
    ratio = torch.exp(torch.clamp(log_ratio, min=-20.0, max=20.0))
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1 - CLIP_LOW, 1 + CLIP_HIGH)
    upper = torch.maximum(unclipped, clipped)
    floor = -adv * DUAL_CLIP
    lower = (adv < 0) & (upper > floor)
    per_token = torch.where(lower, floor, upper)
    count = mask.sum()
    loss = torch.where(mask, per_token, 0.0).sum() / count.clamp(min=1)
    with torch.no_grad():
        r = ratio.detach()
        rows = torch.stack([clipped > unclipped, lower]).float()
        rows = torch.cat([rows, torch.stack([0.5 * log_ratio.detach().square(), r])])
        means = torch.where(mask, rows, 0.0).sum((-1, -2)) / count
        extremes = torch.stack([torch.where(mask, r, float("inf")).amin(), torch.where(mask, r, 0.0).amax()])
        values = torch.where(count > 0, torch.cat([means, extremes]), 0.0)
    names = ("clipfrac", "clipfrac_lower", "approx_kl", "ratio_mean", "ratio_min", "ratio_max")
    return loss, dict(zip(names, values.unbind(0)))


def eager_grpo_kl(lp, old, ref, adv, mask):
    """TRL-style GRPO loss: per-sequence advantages, k3 KL in the loss, per-sequence mean,
    and the clip-ratio metrics TRL logs."""
    mask = mask.to(lp.dtype)
    per_token_kl = torch.exp(ref - lp) - (ref - lp) - 1
    coef_1 = torch.exp(lp - old)
    coef_2 = torch.clamp(coef_1, 1 - CLIP_LOW, 1 + CLIP_LOW)
    adv = adv.unsqueeze(1)
    per_token = -torch.min(coef_1 * adv, coef_2 * adv) + BETA * per_token_kl
    loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    low = (coef_1 < 1 - CLIP_LOW) & (adv < 0)
    high = (coef_1 > 1 + CLIP_LOW) & (adv > 0)
    metrics = {
        "kl": _masked_mean(per_token_kl, mask),
        "clip_ratio/low_mean": _masked_mean(low.float(), mask),
        "clip_ratio/high_mean": _masked_mean(high.float(), mask),
        "clip_ratio/region_mean": _masked_mean((low | high).float(), mask),
    }
    return loss, metrics


def eager_clip_cov(lp, old, adv, mask):
    """verl-style clip_cov (PRIME-RL): PPO on the unclamped ratio, a random few tokens with
    the covariance in the window dropped, token-mean."""
    maskf = mask.to(lp.dtype)
    ratio = torch.exp(lp - old)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1 - CLIP_LOW, 1 + CLIP_HIGH)
    with torch.no_grad():
        cov = (adv - _masked_mean(adv, maskf)) * (lp - _masked_mean(lp, maskf))
        cov[~mask | (clipped > unclipped)] = -torch.inf
        keep = max(int(CLIP_COV["clip_cov_ratio"] * maskf.sum().item()), 1)
        picked = torch.nonzero((cov > CLIP_COV["clip_cov_lb"]) & (cov < CLIP_COV["clip_cov_ub"]))
        picked = picked[torch.randperm(len(picked))[:keep]]
        corr = torch.ones_like(adv)
        corr[picked[:, 0], picked[:, 1]] = 0
    metrics = {"clipfrac": _masked_mean((corr == 0).float(), maskf), "ppo_kl": _masked_mean(old - lp, maskf)}
    return _masked_mean(torch.maximum(unclipped, clipped) * corr, maskf), metrics


def eager_kl_cov(lp, old, adv, mask):
    """verl-style kl_cov (PRIME-RL): ``-A r``, plus ``coef |lp - old|`` on the top-k tokens
    by covariance (picked on the host, as verl does), token-mean."""
    maskf = mask.to(lp.dtype)
    delta = lp - old
    per_token = -adv * torch.exp(delta)
    penalized = per_token + KL_COV["ppo_kl_coef"] * delta.abs()
    valid = torch.nonzero(mask.reshape(-1), as_tuple=True)[0]
    a, x = adv[mask].detach().cpu(), lp[mask].detach().cpu()
    cov = (a - a.mean()) * (x - x.mean())
    top = valid[torch.topk(cov, max(1, int(len(cov) * KL_COV["kl_cov_ratio"]))).indices.to(valid.device)]
    rows, cols = top // lp.shape[1], top % lp.shape[1]
    per_token[rows, cols] = penalized[rows, cols]
    return _masked_mean(per_token, maskf), {"ppo_kl": _masked_mean(delta.abs(), maskf)}


def eager_value_loss(values, old_values, returns, mask, clip=0.2):
    """verl-style clipped value loss."""
    mask = mask.to(values.dtype)
    clipped_values = torch.clamp(values, old_values - clip, old_values + clip)
    unclipped_sq = (values - returns) ** 2
    clipped_sq = (clipped_values - returns) ** 2
    loss = 0.5 * _masked_mean(torch.max(unclipped_sq, clipped_sq), mask)
    return loss, {"clipfrac": _masked_mean(torch.gt(clipped_sq, unclipped_sq).float(), mask)}


def eager_k3(lp, ref):
    log_ratio = ref - lp
    return torch.exp(log_ratio) - log_ratio - 1


# --------------------------------------------------------------------------------- runs


def _fwd_bwd(loss_fn, wrt):
    """A zero-argument callable: forward, then the gradient of the loss w.r.t. ``wrt``."""
    def step():
        loss, _ = loss_fn()
        return torch.autograd.grad(loss, wrt)
    return step


# (B, T): on the CPU the full run sweeps 4K to 1M tokens.
SIZES = dict(small=(16, 256), cuda=(512, 2048), cpu=[(16, 256), (64, 256), (64, 1024), (256, 4096)])


def _inputs(device, B, T):
    lp = (-torch.rand(B, T, device=device) * 3).requires_grad_()
    lengths = torch.randint(1, T + 1, (B, 1), device=device)
    batch = dict(
        lp=lp,
        old=lp.detach() + torch.randn(B, T, device=device) * 0.2,
        ref=lp.detach() + torch.randn(B, T, device=device) * 0.2,
        adv=torch.randn(B, T, device=device),
        adv_seq=torch.randn(B, device=device),
        mask=torch.arange(T, device=device)[None, :] < lengths,  # right padding
    )
    return batch, f"B={B} T={T}", B * T


def _policy_at(device, quick, B, T) -> list[Result]:
    x, shape, n = _inputs(device, B, T)
    lp, old, ref, adv, adv_seq, mask = x["lp"], x["old"], x["ref"], x["adv"], x["adv_seq"], x["mask"]
    impls = {
        f"ours ({b})": _fwd_bwd(lambda b=b: ops.policy_loss(
            lp, old, adv, mask, clip_low=CLIP_LOW, clip_high=CLIP_HIGH, dual_clip=DUAL_CLIP, backend=b), lp)
        for b in our_backends(device, "policy_loss")
    }
    impls["eager (verl)"] = _fwd_bwd(lambda: eager_ppo(lp, old, adv, mask), lp)
    impls["eager (verl, our outputs)"] = _fwd_bwd(lambda: eager_ppo_same_outputs(lp, old, adv, mask), lp)
    compiled_ppo = compiled(eager_ppo)
    impls["torch.compile (verl)"] = _fwd_bwd(lambda: compiled_ppo(lp, old, adv, mask), lp)
    results = measure("policy_loss ppo", shape, impls, device=device, bytes_moved=17 * n, quick=quick, dtype=torch.float32)

    grpo_bytes = 17 * n + 4 * adv_seq.numel()
    impls = {
        f"ours ({b})": _fwd_bwd(lambda b=b: ops.policy_loss(
            lp, old, adv_seq, mask, ref_logp=ref, kl_coef=BETA, aggregation="seq-mean-token-mean",
            normalizer=lp.shape[0], backend=b), lp)
        for b in our_backends(device, "policy_loss")
    }
    impls["eager (TRL)"] = _fwd_bwd(lambda: eager_grpo_kl(lp, old, ref, adv_seq, mask), lp)
    compiled_grpo = compiled(eager_grpo_kl)
    impls["torch.compile (TRL)"] = _fwd_bwd(lambda: compiled_grpo(lp, old, ref, adv_seq, mask), lp)
    results += measure("policy_loss grpo+kl", shape, impls, device=device, bytes_moved=grpo_bytes, quick=quick, dtype=torch.float32)
    return results


def _cov_at(device, quick, B, T) -> list[Result]:
    """clip_cov and kl_cov: data-dependent picks (a host sync each), so no torch.compile row."""
    x, shape, n = _inputs(device, B, T)
    lp, old, adv, mask = x["lp"], x["old"], x["adv"], x["mask"]
    results = []
    for name, op, options, eager in (
        ("clip_cov", ops.clip_cov_loss, dict(CLIP_COV, clip_low=CLIP_LOW, clip_high=CLIP_HIGH), eager_clip_cov),
        ("kl_cov", ops.kl_cov_loss, KL_COV, eager_kl_cov),
    ):
        impls = {f"ours ({b})": _fwd_bwd(lambda b=b, op=op, options=options: op(lp, old, adv, mask, **options, backend=b), lp)
                 for b in our_backends(device, "policy_loss")}  # fmt: skip
        impls["eager (verl)"] = _fwd_bwd(lambda eager=eager: eager(lp, old, adv, mask), lp)
        results += measure(f"policy_loss {name}", shape, impls, device=device, bytes_moved=17 * n, quick=quick,
                           dtype=torch.float32)  # fmt: skip
    return results


def _value_at(device, quick, B, T) -> list[Result]:
    x, shape, n = _inputs(device, B, T)
    values, old_values, returns, mask = x["lp"], x["old"], x["ref"], x["mask"]
    impls = {
        f"ours ({b})": _fwd_bwd(lambda b=b: ops.value_loss(values, old_values, returns, mask, backend=b), values)
        for b in our_backends(device, "value_loss")
    }
    impls["eager (verl)"] = _fwd_bwd(lambda: eager_value_loss(values, old_values, returns, mask), values)
    compiled_value = compiled(eager_value_loss)
    impls["torch.compile (verl)"] = _fwd_bwd(lambda: compiled_value(values, old_values, returns, mask), values)
    return measure("value_loss", shape, impls, device=device, bytes_moved=17 * n, quick=quick, dtype=torch.float32)


def _kl_at(device, quick, B, T) -> list[Result]:
    x, shape, n = _inputs(device, B, T)
    lp, ref = x["lp"], x["ref"]
    upstream = torch.randn_like(ref)

    def step(fn):
        return lambda: torch.autograd.grad(fn(), lp, upstream)

    impls = {f"ours ({b})": step(lambda b=b: ops.kl_penalty(lp, ref, estimator="k3", backend=b))
             for b in our_backends(device, "kl_penalty")}
    impls["eager (k3)"] = step(lambda: eager_k3(lp, ref))
    compiled_k3 = compiled(eager_k3)
    impls["torch.compile (k3)"] = step(lambda: compiled_k3(lp, ref))
    return measure("kl_penalty k3", shape, impls, device=device, bytes_moved=20 * n, quick=quick, dtype=torch.float32)


# verl's losses we register (integrations/verl), timed beside verl's own functions.
VERL_LOSSES = ("dppo_tv", "dppo_kl", "geo_mean")


def _verl_config(name):
    from verl.workers.config import ActorConfig, PolicyLossConfig

    return ActorConfig(
        strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio=0.2, clip_ratio_low=0.2,
        clip_ratio_high=0.28, policy_loss=PolicyLossConfig(loss_mode=name),
    )


def _verl_losses_at(device, quick, B, T) -> list[Result]:
    from verl.trainer.ppo import core_algos

    from rlhf_engine.integrations import verl as ours

    x, shape, n = _inputs(device, B, T)
    lp, old, adv, mask = x["lp"], x["old"], x["adv"], x["mask"]
    weights = torch.rand_like(old) + 0.5
    results = []
    for name in VERL_LOSSES:
        config = _verl_config(name)
        ours_fn, verl_fn = ours.POLICY_LOSSES[name], getattr(core_algos, f"compute_policy_loss_{name}")
        impls = {
            f"ours ({b})": _fwd_bwd(lambda b=b: ours_fn(old, lp, adv, mask, "token-mean", config, weights, backend=b), lp)
            for b in our_backends(device, "policy_loss")
        }
        impls["verl"] = _fwd_bwd(lambda: verl_fn(old, lp, adv, mask, "token-mean", config, weights), lp)
        results += measure(f"policy_loss {name}", shape, impls, device=device, bytes_moved=21 * n, quick=quick,
                           dtype=torch.float32)  # fmt: skip
    return results


def verl_installed() -> bool:
    try:
        import verl.trainer.ppo.core_algos  # noqa: F401
    except ImportError:
        return False
    return True


def run(device: torch.device, quick: bool) -> list[Result]:
    families = [_policy_at, _cov_at, _value_at, _kl_at]
    if verl_installed():
        families.append(_verl_losses_at)
    else:
        print("bench_policy_loss: verl not installed (pip install --no-deps verl==0.9.1): no rows for its losses")
    return sum((sweep(run_at, device, quick, **SIZES) for run_at in families), [])


if __name__ == "__main__":
    script_main(run, __doc__)
