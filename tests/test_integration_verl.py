"""rlhf_engine.integrations.verl against verl 0.9.1 itself: each registered policy loss,
advantage estimator and fused logprob entry point is called beside verl's own function on
the same random inputs (ragged masks, an all-masked row), and values, gradients and
metrics are compared.

verl is required, not optional: ``make test`` installs it (``pip install --no-deps
verl==0.9.1`` plus the ``verl`` extra), and these tests must run there, not skip.

Our ops compute in fp32 whatever the input dtype, so fp64 inputs are compared at fp32
tolerances (verl computes those in fp64).
"""

import math

import numpy as np
import pytest
import torch

try:
    from omegaconf import OmegaConf
    from verl.trainer.config import AlgoConfig
    from verl.trainer.ppo import core_algos
    from verl.utils.experimental.torch_functional import FusedLinearForPPO as VerlFusedLinearForPPO
    from verl.workers.config import ActorConfig, PolicyLossConfig
except ImportError as err:  # a clear message instead of a skip: CI must run these
    raise ImportError(
        f"tests/test_integration_verl.py needs verl==0.9.1: `make install`, or pip install -e '.[verl]' && "
        f"pip install --no-deps verl==0.9.1 ({err})"
    ) from err

from rlhf_engine.integrations import verl as ours  # noqa: E402
from rlhf_engine.integrations.verl.policy_losses import _clip_ratios  # noqa: E402

NATIVE_BACKENDS = True  # the backend fixture also runs cpp (CPU) / cuda (GPU)
MODES = ours.LOSS_AGG_MODES
LOSSES = tuple(ours.POLICY_LOSSES)
B, T = 5, 13
EMPTY_ROW = 2  # all-masked: verl's semantics are defined for one empty row, not for an empty batch
RTOL, ATOL = 1e-5, 1e-6  # fp32 compute on our side for both input dtypes


def _mask(batch=B, length=T):
    lengths = torch.randint(1, length + 1, (batch,))
    lengths[EMPTY_ROW] = 0
    lengths[0] = length  # one full row: the padded length is reached
    return torch.arange(length)[None, :] < lengths[:, None]


def _loss_inputs(dtype, with_weights):
    mask = _mask()
    old = -torch.rand(B, T, dtype=dtype) * 3
    # log ratios of ~±0.3 put tokens on both sides of the clip range; one beyond +20 checks the clamp
    delta = 0.3 * torch.randn(B, T, dtype=dtype)
    # Off every clip boundary of the configs below (1 - 0.15, 1 + 0.28, c = 2.5; 1 - 0.1,
    # 1 + 0.3, c = 2): a ratio within fp32 rounding of one may be clipped on one side and
    # not on the other, a difference of the input dtype, not of the semantics.
    for bound in map(math.log, (0.85, 1.28, 2.5, 0.9, 1.3, 2.0)):
        near = (delta - bound).abs() < 1e-3
        delta = torch.where(near, bound + 2e-3, delta)
    log_prob = old + delta
    log_prob[0, 1] = old[0, 1] + 25.0
    advantages = torch.randn(B, T, dtype=dtype)
    advantages[0, 1] = -1.0  # with r = e^20 there: the dual clip is active on every seed
    weights = torch.rand(B, T, dtype=dtype) * 2 if with_weights else None
    return old, log_prob, advantages, mask, weights


def _config(name, clip=(0.15, 0.28, 2.5), policy_loss=None, **global_batch_info):
    """verl's ActorConfig; ``clip`` = (clip_ratio_low, clip_ratio_high, clip_ratio_c);
    ``policy_loss``: PolicyLossConfig fields beyond ``loss_mode`` (verl's defaults otherwise)."""
    config = ActorConfig(
        strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio=0.2, clip_ratio_low=clip[0],
        clip_ratio_high=clip[1], clip_ratio_c=clip[2], tau_pos=1.2, tau_neg=1.6,
        policy_loss=PolicyLossConfig(loss_mode=name, **(policy_loss or {})),
    )
    config.global_batch_info.update(global_batch_info)
    return config


def _call(fn, old, log_prob, advantages, mask, mode, config, weights, **kwargs):
    lp = log_prob.clone().requires_grad_(True)
    loss, metrics = fn(
        old_log_prob=old, log_prob=lp, advantages=advantages, response_mask=mask, loss_agg_mode=mode, config=config,
        rollout_is_weights=weights, **kwargs,
    )
    loss.backward()
    return loss.detach(), lp.grad, metrics


def _assert_close(name, ours_value, verl_value, atol=ATOL):
    torch.testing.assert_close(
        ours_value.double(), verl_value.double(), rtol=RTOL, atol=atol, msg=lambda m: f"{name}: {m}"
    )


def _compare_loss(name, mode, config, inputs, backend):
    """-> our metrics. torch's RNG is seeded alike before each call: clip_cov draws its
    tokens from it (``torch.randperm``), and the two draws must be the same."""
    old, log_prob, advantages, mask, weights = inputs
    verl_fn = getattr(core_algos, f"compute_policy_loss_{name}")
    seed = int(torch.randint(2**31, ()))
    torch.manual_seed(seed)
    v_loss, v_grad, v_metrics = _call(verl_fn, old, log_prob, advantages, mask, mode, config, weights)
    torch.manual_seed(seed)
    o_loss, o_grad, o_metrics = _call(
        ours.POLICY_LOSSES[name], old, log_prob, advantages, mask, mode, config, weights, backend=backend
    )
    assert torch.isfinite(v_loss), "the test inputs must stay where verl's loss is defined"
    _assert_close(f"{name} {mode} loss", o_loss, v_loss)
    assert o_grad.dtype == log_prob.dtype
    _assert_close(f"{name} {mode} d loss / d log_prob", o_grad, v_grad)
    assert set(o_metrics) == set(v_metrics), f"{name}: metric names {sorted(o_metrics)} != verl's {sorted(v_metrics)}"
    for key, value in v_metrics.items():
        assert isinstance(o_metrics[key], float), f"{name}: {key} must be a Python float like verl's"
        assert o_metrics[key] == pytest.approx(value, rel=RTOL, abs=ATOL), f"{name} {mode}: {key}"
    return o_metrics


@pytest.mark.parametrize("with_weights", [False, True], ids=["no_is", "is_weights"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", LOSSES)
def test_policy_loss_matches_verl(name, mode, dtype, with_weights, backend):
    _compare_loss(name, mode, _config(name), _loss_inputs(dtype, with_weights), backend)


# Covariance windows and ratios that pick several tokens of the 40-odd valid ones (verl's
# defaults pick one: max(int(0.0002 n), 1)), so the draw among the candidates matters.
COV_CONFIGS = {
    "clip_cov": [dict(clip_cov_ratio=0.1, clip_cov_lb=0.05, clip_cov_ub=3.0),
                 dict(clip_cov_ratio=1.0, clip_cov_lb=-0.5, clip_cov_ub=0.5)],  # every candidate dropped
    "kl_cov": [dict(kl_cov_ratio=0.2, ppo_kl_coef=0.5), dict(kl_cov_ratio=1.0, ppo_kl_coef=2.0)],
}


@pytest.mark.parametrize("with_weights", [False, True], ids=["no_is", "is_weights"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name,fields", [(name, f) for name, fs in COV_CONFIGS.items() for f in fs],
                         ids=[f"{name}{i}" for name, fs in COV_CONFIGS.items() for i in range(len(fs))])
def test_cov_losses_with_larger_ratios_match_verl(name, fields, mode, with_weights, backend):
    inputs = _loss_inputs(torch.float32, with_weights)
    metrics = _compare_loss(name, mode, _config(name, policy_loss=fields), inputs, backend)
    if name == "clip_cov":  # tokens were dropped (else this compares plain PPO)
        assert metrics["actor/pg_clipfrac"] > 0


def test_clip_cov_with_verls_defaults_drops_one_token():
    # verl's defaults (ratio 0.0002, window (1, 5)): one token when any is a candidate. Row
    # 1's first token (always valid) is made one: r = 1 (not clipped), A = -1 and a logprob
    # ~3 below the mean, so cov ~ 3
    old, log_prob, advantages, mask, weights = _loss_inputs(torch.float32, False)
    log_prob[1, 0], old[1, 0], advantages[1, 0] = -4.0, -4.0, -1.0
    metrics = _compare_loss("clip_cov", "token-mean", _config("clip_cov"), (old, log_prob, advantages, mask, weights),
                            "torch")  # fmt: skip
    assert metrics["actor/pg_clipfrac"] == pytest.approx(1 / mask.sum().item())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", LOSSES)
def test_policy_loss_global_batch_info_matches_verl(name, mode):
    # What verl's actor sets per micro-batch under data parallelism: every denominator is
    # global (this micro-batch is a fraction of it) and the loss is scaled by dp_size.
    info = dict(dp_size=4, batch_num_tokens=173, global_batch_size=23, loss_scale_factor=17)
    _compare_loss(name, mode, _config(name, **info), _loss_inputs(torch.float32, True), "torch")


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("name", ["dppo_tv", "dppo_kl", "geo_mean"])
def test_tight_bounds_match_verl(name, mode, backend):
    # Bounds most tokens cross (divergence thresholds for dppo, log-space caps for geo_mean) and
    # a truncation cap below many ratios: the masks, caps and both clip metrics are exercised.
    config = _config(name, clip=(0.01, 0.02, 1.1))
    inputs = _loss_inputs(torch.float32, True)
    old, log_prob, advantages, mask, weights = inputs
    _, _, v_metrics = _call(getattr(core_algos, f"compute_policy_loss_{name}"), old, log_prob, advantages, mask, mode,
                            config, weights)  # fmt: skip
    assert v_metrics["actor/pg_clipfrac"] > 0 and v_metrics["actor/pg_clipfrac_lower"] > 0, v_metrics
    _compare_loss(name, mode, config, inputs, backend)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum-norm"])
def test_vanilla_with_a_dictconfig_matches_verl(mode):
    # verl's vanilla also accepts a plain DictConfig (the legacy actor config)
    config = OmegaConf.create(dict(clip_ratio=0.2, clip_ratio_low=0.1, clip_ratio_high=0.3, clip_ratio_c=2.0,
                                   global_batch_info={}))
    assert _clip_ratios(config) == (0.1, 0.3)
    _compare_loss("vanilla", mode, config, _loss_inputs(torch.float32, True), "torch")


def test_registered_under_verls_names():
    for name in LOSSES:
        assert core_algos.get_policy_loss_fn(name) is ours.POLICY_LOSSES[name]
    # verl's own losses we do not reproduce exactly stay verl's
    for name in ("dro", "bypass_mode"):
        assert core_algos.get_policy_loss_fn(name) is getattr(core_algos, f"compute_policy_loss_{name}")
    try:
        assert ours.register(["vanilla"], backend="torch") == ["vanilla"]
        registered = core_algos.get_policy_loss_fn("vanilla")
        assert registered.func is ours.compute_policy_loss_vanilla and registered.keywords == {"backend": "torch"}
    finally:
        ours.register()
    with pytest.raises(ValueError, match="names must be among"):
        ours.register(["dro"])


def test_bad_loss_inputs_raise_clearly():
    old, log_prob, advantages, mask, _ = _loss_inputs(torch.float32, False)
    fn = ours.compute_policy_loss_vanilla
    with pytest.raises(ValueError, match="loss_agg_mode must be one of"):
        fn(old, log_prob, advantages, mask, "seq-mean", _config("vanilla"))
    with pytest.raises(ValueError, match="config is required"):
        fn(old, log_prob, advantages, mask, "token-mean", None)
    with pytest.raises(ValueError, match="advantages must be"):
        fn(old, log_prob, advantages[:, :4], mask, "token-mean", _config("vanilla"))
    with pytest.raises(ValueError, match=r"global_batch_info\['batch_num_tokens'\] is required"):
        fn(old, log_prob, advantages, mask, "token-mean", _config("vanilla", dp_size=2))
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        config = _config("vanilla")
        object.__setattr__(config, "clip_ratio_c", 1.0)
        fn(old, log_prob, advantages, mask, "token-mean", config)


def test_bad_cov_loss_inputs_raise_clearly():
    old, log_prob, advantages, mask, _ = _loss_inputs(torch.float32, False)
    with pytest.raises(ValueError, match="verl clip_cov: config.policy_loss is required"):
        ours.compute_policy_loss_clip_cov(old, log_prob, advantages, mask, "token-mean",
                                          OmegaConf.create(dict(clip_ratio=0.2, global_batch_info={})))  # fmt: skip
    with pytest.raises(ValueError, match=r"clip_cov_ratio must be in \(0, 1\]"):  # verl asserts > 0
        ours.compute_policy_loss_clip_cov(old, log_prob, advantages, mask, "token-mean",
                                          _config("clip_cov", policy_loss=dict(clip_cov_ratio=0.0)))  # fmt: skip
    with pytest.raises(ValueError, match="clip_cov_lb must be < clip_cov_ub"):
        ours.compute_policy_loss_clip_cov(old, log_prob, advantages, mask, "token-mean",
                                          _config("clip_cov", policy_loss=dict(clip_cov_lb=5.0, clip_cov_ub=1.0)))  # fmt: skip
    with pytest.raises(ValueError, match="loss_agg_mode must be one of"):
        ours.compute_policy_loss_kl_cov(old, log_prob, advantages, mask, "seq-mean", _config("kl_cov"))


# ---------------------------------------------------------------------------------------
# Advantages
# ---------------------------------------------------------------------------------------

ADV_B, ADV_T = 10, 9
# Groups of 3, 3, 1 (a singleton: verl's special case) and 3; the empty row shares a group.
UIDS = np.array(["a", "a", "a", "b", "b", "b", "c", "d", "d", "d"], dtype=object)


def _adv_inputs(dtype=torch.float32):
    mask = _mask(ADV_B, ADV_T)
    rewards = torch.randn(ADV_B, ADV_T, dtype=dtype) * mask  # verl's rewards are zero on padding
    return rewards, mask.to(dtype)


def _compare_adv(what, ours_out, verl_out, mask):
    for label, o, v in zip(("advantages", "returns"), ours_out, verl_out):
        assert o.shape == v.shape and o.dtype == v.dtype, f"{what} {label}: {o.shape}/{o.dtype} vs {v.shape}/{v.dtype}"
        _assert_close(f"{what} {label}", o * mask, v * mask)


OUTCOME = [
    ("grpo", "compute_grpo_outcome_advantage", {}),
    ("grpo_no_std", "compute_grpo_outcome_advantage", {"norm_adv_by_std_in_grpo": False}),
    ("grpo_vectorized", "compute_grpo_vectorized_outcome_advantage", {}),
    ("rloo", "compute_rloo_outcome_advantage", {}),
    ("rloo_vectorized", "compute_rloo_vectorized_outcome_advantage", {}),
    ("opo", "compute_opo_outcome_advantage", {}),
    ("reinforce_plus_plus_baseline", "compute_reinforce_plus_plus_baseline_outcome_advantage", {}),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("estimator,verl_name,kwargs", OUTCOME, ids=[case[0] for case in OUTCOME])
def test_outcome_advantages_match_verl(estimator, verl_name, kwargs, dtype, backend):
    rewards, mask = _adv_inputs(dtype)
    name = "grpo" if estimator == "grpo_no_std" else estimator
    verl_out = getattr(core_algos, verl_name)(rewards.clone(), mask, index=UIDS, **kwargs)
    ours_out = ours.ADVANTAGE_ESTIMATORS[name](rewards, mask, index=UIDS, backend=backend, **kwargs)
    _compare_adv(estimator, ours_out, verl_out, mask)
    assert not ours_out[0].requires_grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_reinforce_plus_plus_matches_verl(dtype, backend):
    rewards, mask = _adv_inputs(dtype)
    mask[1, 3:5] = 0  # a masked span inside a response: the running return passes through
    config = AlgoConfig(gamma=0.9)
    verl_out = core_algos.compute_reinforce_plus_plus_outcome_advantage(rewards, mask, config=config)
    _compare_adv("reinforce_plus_plus", ours.compute_reinforce_plus_plus_outcome_advantage(
        rewards, mask, config=config, backend=backend), verl_out, mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_gae_matches_verl_on_valid_tokens(dtype, backend):
    rewards, mask = _adv_inputs(dtype)
    mask[1, 3:5] = 0
    values = torch.randn(ADV_B, ADV_T, dtype=dtype)
    verl_out = core_algos.compute_gae_advantage_return(rewards, values, mask, gamma=0.95, lam=0.9)
    ours_out = ours.compute_gae_advantage_return(rewards, values, mask, 0.95, 0.9, backend=backend)
    _compare_adv("gae", ours_out, verl_out, mask)


def test_bad_advantage_inputs_raise_clearly():
    rewards, mask = _adv_inputs()
    with pytest.raises(ValueError, match=r"index must have one uid per sample"):
        ours.compute_grpo_outcome_advantage(rewards, mask, index=UIDS[:4])
    with pytest.raises(ValueError, match="index .* is required"):
        ours.compute_rloo_outcome_advantage(rewards, mask, index=None)
    with pytest.raises(ValueError, match="config.gamma is required"):
        ours.compute_reinforce_plus_plus_outcome_advantage(rewards, mask, config={})


# ---------------------------------------------------------------------------------------
# Fused lm_head logprobs / entropy
# ---------------------------------------------------------------------------------------

H, V = 16, 37


def _logprob_grads(module, hidden, weight, labels, temperature, g_logp, g_entropy):
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    logp, entropy = module.forward(h, w, labels, temperature)
    ((logp * g_logp).sum() + (entropy * g_entropy).sum()).backward()
    return logp.detach(), entropy.detach(), h.grad, w.grad


@pytest.mark.parametrize("shape", [(2, 7), (11,)], ids=["batched", "packed"])
@pytest.mark.parametrize("backend", ["torch", "triton"], indirect=True)
def test_fused_linear_for_ppo_matches_verl(shape, backend):
    hidden = torch.randn(*shape, H)
    weight = torch.randn(V, H) * 0.5
    labels = torch.randint(0, V, shape, dtype=torch.int32)  # verl casts to int64 itself; so do we
    g_logp, g_entropy = torch.randn(shape), torch.randn(shape)
    verl_out = _logprob_grads(VerlFusedLinearForPPO(chunk_size=4), hidden, weight, labels, 0.7, g_logp, g_entropy)
    ours_out = _logprob_grads(ours.FusedLinearForPPO(chunk_size=4, backend=backend), hidden, weight, labels, 0.7,
                              g_logp, g_entropy)
    for label, o, v in zip(("log_probs", "entropy", "d hidden", "d weight"), ours_out, verl_out):
        assert o.shape == v.shape and o.dtype == v.dtype, f"{label}: {o.shape}/{o.dtype} vs {v.shape}/{v.dtype}"
        # fp32 sums (logsumexp over the vocabulary; d weight / d hidden over tokens / the
        # vocabulary) in another order than verl's: each entry carries the rounding of the
        # largest terms, so the absolute slack scales with the output
        _assert_close(label, o, v, atol=RTOL * max(1.0, v.abs().max().item()))
    flat_logp, flat_entropy = ours.linear_cross_entropy(hidden, weight, labels, 0.7, backend=backend)
    assert flat_logp.shape == flat_entropy.shape == (labels.numel(),)
    for label, o, v in (("log_probs", flat_logp, verl_out[0]), ("entropy", flat_entropy, verl_out[1])):
        _assert_close(f"linear_cross_entropy {label}", o, v.reshape(-1), atol=RTOL * max(1.0, v.abs().max().item()))


def test_fused_linear_for_ppo_keeps_verls_dtypes_in_bf16():
    # verl's torch path returns fp32 log_probs and entropy in the hidden dtype; it rounds
    # the logits to bf16 first, so the values agree to bf16 precision only.
    hidden, weight = torch.randn(2, 5, H).bfloat16(), (torch.randn(V, H) * 0.5).bfloat16()
    labels = torch.randint(0, V, (2, 5))
    verl_logp, verl_entropy = VerlFusedLinearForPPO().forward(hidden, weight, labels)
    our_logp, our_entropy = ours.FusedLinearForPPO(backend="torch").forward(hidden, weight, labels)
    dtypes = (torch.float32, torch.bfloat16)
    assert (our_logp.dtype, our_entropy.dtype) == (verl_logp.dtype, verl_entropy.dtype) == dtypes
    torch.testing.assert_close(our_logp, verl_logp, rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(our_entropy.float(), verl_entropy.float(), rtol=2e-2, atol=5e-2)


def test_fused_linear_bad_arguments_raise_clearly():
    hidden, weight, labels = torch.randn(3, H), torch.randn(V, H), torch.randint(0, V, (3,))
    with pytest.raises(ValueError, match="impl_backend must be"):
        ours.FusedLinearForPPO(impl_backend="triton")
    with pytest.raises(ValueError, match="only reduction='none'"):
        ours.linear_cross_entropy(hidden, weight, labels, 1.0, reduction="mean")


def test_patch_fused_linear_swaps_verls_entry_points():
    import verl.utils.experimental.torch_functional as torch_functional
    import verl.utils.kernel.linear_cross_entropy as kernel_module

    saved = torch_functional.FusedLinearForPPO, kernel_module.linear_cross_entropy
    try:
        ours.patch_fused_linear()
        assert torch_functional.FusedLinearForPPO is ours.FusedLinearForPPO
        assert kernel_module.linear_cross_entropy is ours.linear_cross_entropy
    finally:
        torch_functional.FusedLinearForPPO, kernel_module.linear_cross_entropy = saved


# ---------------------------------------------------------------------------------------
# Import behaviour
# ---------------------------------------------------------------------------------------


def _python(code):
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_importing_rlhf_engine_never_imports_verl():
    done = _python("import sys, rlhf_engine, rlhf_engine.ops, rlhf_engine.integrations; "
                   "assert 'verl' not in sys.modules, 'verl was imported'")
    assert done.returncode == 0, done.stderr


def test_missing_verl_names_the_install_command():
    # sys.modules[name] = None makes `import verl` raise ImportError, as if it were absent.
    done = _python("import sys; sys.modules['verl'] = None; import rlhf_engine.integrations.verl")
    assert done.returncode != 0
    assert "pip install --no-deps verl==0.9.1" in done.stderr and "rlhf-engine[verl]" in done.stderr, done.stderr
