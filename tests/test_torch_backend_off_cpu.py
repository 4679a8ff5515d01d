"""The torch backend off the CPU, without a GPU.

On CPU tensors the torch backends read scalar chains as host floats, select through int32
lanes and reuse cached 0-d operands; on any other device they must keep everything on the
device (0-d tensors, ``torch.where``). The ``meta`` device runs exactly those other-device
paths while computing only shapes and dtypes, so these tests catch a CPU-only assumption
(a Python number where an op needs a tensor, a host read) on a machine without CUDA.
Values are checked on CUDA by the rest of the suite (``pytest -m gpu`` machines).
"""

import pytest
import torch

from rlhf_engine import ops

META = torch.device("meta")
B, T, V = 3, 7, 11


def _tokens(dtype=torch.float32):
    return torch.empty(B, T, device=META, dtype=dtype)


@pytest.mark.parametrize(
    "options",
    [
        dict(dual_clip=3.0),
        dict(dual_clip=3.0, delta=1.5),
        dict(loss="gspo", aggregation="seq-mean-token-mean"),
        dict(loss="sapo", with_isw=True),
        dict(loss="cispo", with_kl=True, entropy_coef=0.01),
        dict(aggregation="seq-mean-token-sum-norm", normalizer=4.0),
    ],
    ids=["ppo-dual", "ppo-delta", "gspo", "sapo-isw", "cispo-kl-entropy", "normalizer"],
)
def test_policy_loss(options):
    options = dict(options)
    lp = _tokens().requires_grad_()
    extra = {}
    if options.pop("with_isw", False):
        extra["is_weights"] = _tokens()
    if options.pop("with_kl", False):
        extra.update(ref_logp=_tokens(), kl_coef=0.1, entropy=_tokens().requires_grad_())
    loss, metrics = ops.policy_loss(lp, _tokens(), _tokens(), _tokens(torch.bool), backend="torch", **options, **extra)
    loss.backward()
    assert loss.shape == () and lp.grad.shape == lp.shape and lp.grad.dtype == torch.float32
    assert all(v.shape == () and v.device == META for v in metrics.values())


@pytest.mark.parametrize("clip", [0.2, None])
def test_value_loss(clip):
    values = _tokens().requires_grad_()
    loss, metrics = ops.value_loss(values, _tokens(), _tokens(), _tokens(torch.bool), clip=clip, backend="torch")
    loss.backward()
    assert loss.shape == () and values.grad.shape == values.shape
    assert set(metrics) == {"clipfrac", "values_mean"}


def test_targets_and_kl():
    scores, ids = torch.empty(8, device=META), torch.empty(8, device=META, dtype=torch.long)
    outputs = [
        ops.group_advantages(scores, group_size=4, backend="torch"),
        ops.group_advantages(scores, group_size=4, preset="verl", scale="batch", backend="torch"),
        ops.group_advantages(scores, group_ids=ids, num_groups=2, backend="torch"),
        ops.group_advantages(scores, group_size=4, method="reinforce_pp_baseline", lengths=scores, backend="torch"),
        ops.masked_whiten(_tokens(), _tokens(torch.bool), backend="torch"),
        ops.gae(_tokens(), _tokens(), _tokens(torch.bool), backend="torch")[0],
        ops.discounted_returns(_tokens(), _tokens(torch.bool), backend="torch"),
        ops.kl_penalty(_tokens(), _tokens(), backend="torch"),
    ]
    assert all(out.device == META and out.dtype == torch.float32 for out in outputs)


def test_token_logprobs():
    logits = torch.empty(B, T, V, device=META, requires_grad=True)
    logp, entropy = ops.token_logprobs(logits, torch.empty(B, T, device=META, dtype=torch.long),
                                       return_entropy=True, backend="torch")
    (logp.sum() + entropy.sum()).backward()
    assert logp.shape == (B, T) and logits.grad.shape == logits.shape
