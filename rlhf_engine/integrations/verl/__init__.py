"""verl integration: rlhf_engine's fused ops behind verl 0.9.1's own names and signatures.

One line, in the driver and (through verl's plugin hook) in every Ray worker::

    VERL_USE_EXTERNAL_MODULES=rlhf_engine.integrations.verl python -m verl.trainer.main_ppo ...

Importing this package imports verl and calls :func:`register`, which puts our policy losses
into ``verl.trainer.ppo.core_algos.POLICY_LOSS_REGISTRY`` under verl's names. verl's actor
looks the loss up by name on every micro-batch, so nothing else changes.

What is here:

* Policy losses (``loss_mode``): ``vanilla`` (PPO, always with verl's dual clip
  ``c = clip_ratio_c``), ``gpg`` (REINFORCE), ``cispo``, ``gspo`` (the sequence log-ratio
  clamped from above at 10, as verl), ``sapo`` (``tau_pos`` / ``tau_neg`` from the
  config; always ``seq-mean-token-mean``, as verl), ``dppo_tv`` / ``dppo_kl`` (the cap
  ``clip_ratio_c``), ``geo_mean`` (GMPO: the batch mean of the sequence losses, whatever
  ``loss_agg_mode``, as verl), ``clip_cov`` and ``kl_cov`` (PRIME-RL:
  the covariance pre-pass in torch, the loss by the fused op; ``clip_cov`` draws its tokens
  with ``torch.randperm`` on torch's default generator as verl does, so the same seed
  gives verl's pick; ``config.policy_loss``'s fields). Each has verl's signature
  ``(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
  rollout_is_weights) -> (0-d loss, metrics)``, with verl's metric names as Python floats,
  and is computed by :func:`rlhf_engine.ops.policy_loss` (any backend; the cov losses by
  :func:`~rlhf_engine.ops.clip_cov_loss` / :func:`~rlhf_engine.ops.kl_cov_loss` on it).
* Advantage estimators with verl's signatures and returns (:data:`ADVANTAGE_ESTIMATORS`),
  built on :func:`~rlhf_engine.ops.group_advantages`, :func:`~rlhf_engine.ops.gae`,
  :func:`~rlhf_engine.ops.discounted_returns` and :func:`~rlhf_engine.ops.masked_whiten`.
  They are *not* put into verl's advantage registry: ``register_adv_est`` refuses to
  replace an existing name, and verl calls GAE and GRPO directly rather than through the
  registry. Call them yourself (e.g. from a custom ``compute_advantage``).
* :class:`FusedLinearForPPO` and :func:`linear_cross_entropy`: verl's two fused
  lm_head logprob / entropy entry points, computed by
  :func:`rlhf_engine.ops.fused_linear_logprobs`; :func:`patch_fused_linear` swaps them in.

Not supported (verl keeps its own): the losses ``dro`` (verl importance-weights the
quadratic term too) and ``bypass_mode`` (no matching op), and the estimators ``remax``, ``gpg``, ``grpo_passk``,
``gdpo``, ``optimal_token_baseline``, ``tir_optimal_token_baseline``.

Differences that remain, all below fp32 rounding: our ops compute in fp32 whatever the
input dtype (verl computes in the input dtype), and divide by exact token counts where verl
adds 1e-8 (``masked_mean``; ``seq-mean-token-mean``'s per-sequence count).
"""

from rlhf_engine.integrations.verl.advantages import (
    ADVANTAGE_ESTIMATORS,
    compute_gae_advantage_return,
    compute_grpo_outcome_advantage,
    compute_opo_outcome_advantage,
    compute_reinforce_plus_plus_baseline_outcome_advantage,
    compute_reinforce_plus_plus_outcome_advantage,
    compute_rloo_outcome_advantage,
    compute_rloo_vectorized_outcome_advantage,
)
from rlhf_engine.integrations.verl.lm_head import FusedLinearForPPO, linear_cross_entropy, patch_fused_linear
from rlhf_engine.integrations.verl.policy_losses import (
    LOSS_AGG_MODES,
    POLICY_LOSSES,
    VERL_VERSION,
    compute_policy_loss_cispo,
    compute_policy_loss_clip_cov,  # defined in cov_losses, which policy_losses imports last
    compute_policy_loss_dppo_kl,
    compute_policy_loss_dppo_tv,
    compute_policy_loss_geo_mean,
    compute_policy_loss_gpg,
    compute_policy_loss_gspo,
    compute_policy_loss_kl_cov,
    compute_policy_loss_sapo,
    compute_policy_loss_vanilla,
    register,
)

# Registering on import is what makes VERL_USE_EXTERNAL_MODULES=rlhf_engine.integrations.verl
# work: verl imports the module in every process and the registry is then ours.
register()
