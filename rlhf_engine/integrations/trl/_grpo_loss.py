"""The loss step of :class:`~rlhf_engine.integrations.trl.grpo.FusedGRPOTrainer`: TRL 1.16's
GRPO options mapped once onto :func:`rlhf_engine.ops.fused_linear_policy_loss`
(:func:`loss_plan`), and the call itself on the completion positions' hidden states
(:class:`LossStep`, run inside the policy's forward through ``head_fn``).

Layout: TRL's per-token tensors are ``[B, T]`` over the completion (``T`` =
``completion_ids.size(1)``), per-sequence ones ``[B]`` or ``[B, 1]``. The op gets only the
``n`` scored positions (completion tokens that are not padding), packed: ``[n]`` with
``cu_seqlens [B + 1]`` (an all-padding completion is a sequence of length 0). Every
tensor handed to the op is per token ``[n]``, so a batch where ``n == B`` is never read
as per-sequence.
"""

from __future__ import annotations

import dataclasses

import torch

from rlhf_engine.ops import fused_linear_logprobs, fused_linear_policy_loss

CLIPPED_LOSSES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
# The loss types whose TRL normalizer counts tokens from num_items_in_batch (the whole generation batch).
ITEM_NORMALIZED = ("dapo", "cispo", "vespo")
# The loss types whose value TRL divides by the gradient-accumulation steps itself.
ACCUMULATION_SCALED = ("grpo", "sapo", "bnpo", "dr_grpo", "luspo")


@dataclasses.dataclass(frozen=True)
class LossPlan:
    """How one GRPOConfig maps onto the op.

    ``op_loss``: the op's ``loss``; ``sequence_weight``: ``"cispo"`` / ``"vespo"`` when the
    loss is ``reinforce`` times a detached per-sequence weight computed from the current
    logprobs (TRL's sequence-level cispo weight ``sg(min(s_b, ε_high))``, or vespo's gamma
    weights); ``aggregation`` and ``normalizer`` (``"batch"`` = B, ``"tokens"`` = max(Σ m, 1),
    ``"max_length"`` = B · max_completion_length, ``"items"`` = TRL's num_items_in_batch rule),
    each times the accumulation steps where TRL divides by them."""

    loss_type: str
    sequence_level: bool
    op_loss: str
    sequence_weight: str | None
    aggregation: str
    normalizer: str
    clip_low: float
    clip_high: float
    delta: float | None
    beta: float
    bias_correction_kl: bool


def loss_plan(args) -> LossPlan:
    """The :class:`LossPlan` of a ``trl.GRPOConfig``.

    Raises:
        ValueError: naming the options, for combinations the op cannot compute exactly.
    """
    loss_type, level = args.loss_type, args.importance_sampling_level
    sequence = level == "sequence"
    if level not in ("token", "sequence"):
        raise ValueError(f"importance_sampling_level must be 'token' or 'sequence', got {level!r}")
    if loss_type == "sapo" and sequence:
        raise ValueError(
            "FusedGRPOTrainer: loss_type='sapo' with importance_sampling_level='sequence' (a soft gate on the "
            "sequence ratio) is not a loss rlhf_engine's policy_loss computes; use importance_sampling_level='token' "
            "or trl.GRPOTrainer"
        )
    bias_correction = bool(args.use_bias_correction_kl) and args.beta != 0.0
    if loss_type in ("cispo", "vespo") and sequence and bias_correction:
        raise ValueError(
            f"FusedGRPOTrainer: loss_type={loss_type!r} with importance_sampling_level='sequence', beta != 0 and "
            "use_bias_correction_kl=True weights the KL by the sequence ratio, which rlhf_engine's reinforce form of "
            "this loss does not compute; use importance_sampling_level='token', use_bias_correction_kl=False or "
            "trl.GRPOTrainer"
        )
    if loss_type in CLIPPED_LOSSES:
        op_loss, weight = ("gspo" if sequence else "ppo"), None
    elif loss_type == "cispo":
        op_loss, weight = ("reinforce", "cispo") if sequence else ("cispo-trl", None)
    elif loss_type == "sapo":
        op_loss, weight = "sapo", None
    elif loss_type == "vespo":
        # vespo never uses the ratio of importance_sampling_level: only its KL correction would.
        op_loss, weight = "reinforce", "vespo"
    else:
        raise ValueError(f"FusedGRPOTrainer: unknown loss_type {loss_type!r}")
    if loss_type in ("grpo", "sapo"):
        aggregation, normalizer = "seq-mean-token-mean", "batch"
    else:
        normalizer = {"bnpo": "tokens", "dr_grpo": "max_length", "luspo": "batch"}.get(loss_type, "items")
        aggregation = "token-sum"
    epsilon_high = args.epsilon if args.epsilon_high is None else args.epsilon_high
    return LossPlan(
        loss_type=loss_type, sequence_level=sequence, op_loss=op_loss, sequence_weight=weight,
        aggregation=aggregation, normalizer=normalizer, clip_low=args.epsilon, clip_high=epsilon_high,
        delta=args.delta if loss_type in CLIPPED_LOSSES else None, beta=args.beta,
        bias_correction_kl=bias_correction,
    )  # fmt: skip


class LossStep:
    """One ``_compute_loss`` of the trainer: called by the policy's forward as ``head_fn(h [n,
    H], w [V, H], b, y [n], label_mask [B, L])`` -> the 0-d loss TRL's ``_compute_loss``
    returns, with gradients to ``h``, ``w`` (and ``b``). Keeps, detached, what the metrics
    need: ``logp`` / ``entropy`` ``[B, T]`` (0 off the scored positions), ``old_logp``,
    ``advantages`` (``[B, 1]`` or ``[B, T]``), ``mask``, ``entropy_mask``, ``phi_seq``,
    ``policy_loss`` (the loss before the entropy bonus and TRL's own accumulation scaling)."""

    def __init__(self, trainer, inputs, plan: LossPlan, *, backend: str, chunk_size: int | None):
        self.trainer, self.inputs, self.plan = trainer, inputs, plan
        self.op = dict(temperature=trainer.temperature, backend=backend, chunk_size=chunk_size)
        self.mode = "train" if trainer.model.training else "eval"
        self.accumulation = trainer.current_gradient_accumulation_steps if self.mode == "train" else 1
        completion_mask = inputs["completion_mask"]
        self.mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        advantages = inputs["advantages"]
        self.advantages = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
        self.entropy_mask = self.phi_seq = None

    def __call__(self, hidden, weight, bias, labels, label_mask):
        trainer, plan, inputs = self.trainer, self.plan, self.inputs
        length = self.mask.shape[1]
        scored = label_mask[:, -length:]  # TRL scores only completion positions: all lie in the last T
        self._scored = scored
        cu_seqlens = torch.zeros(scored.shape[0] + 1, dtype=torch.int64, device=scored.device)
        cu_seqlens[1:] = scored.sum(-1).cumsum(0)
        old = inputs.get("old_per_token_logps")
        weights = self._weights(hidden, weight, bias, labels, old)
        entropy_coef = self._applied_entropy_coef()
        # TRL's bonus acts on the high-entropy tokens when there is an entropy mask; the op's token
        # mean would take every valid token, so that bonus gets a differentiable pass of its own.
        bonus_apart = self.entropy_mask is not None
        ref = inputs["ref_per_token_logps"] if plan.beta != 0.0 else None
        loss, metrics, logp, entropy = fused_linear_policy_loss(
            hidden, weight, labels, self._packed(old), self._packed(self.advantages), self._packed(self.mask),
            bias=bias, loss=plan.op_loss, clip_low=plan.clip_low, clip_high=plan.clip_high, delta=plan.delta,
            log_ratio_min=None, log_ratio_max=None, sapo_tau_pos=trainer.args.sapo_temperature_pos,
            sapo_tau_neg=trainer.args.sapo_temperature_neg, ref_logp=self._packed(ref), kl_coef=plan.beta,
            kl_estimator="k3", kl_ratio_weight=plan.bias_correction_kl,
            entropy_coef=0.0 if bonus_apart else entropy_coef / self.accumulation, entropy_aggregation="token-mean",
            is_weights=self._packed(weights), is_weights_per_sequence=plan.op_loss == "gspo",
            aggregation=plan.aggregation, normalizer=self._normalizer(), cu_seqlens=cu_seqlens, return_logprobs=True,
            **self.op,
        )  # fmt: skip
        policy = loss.detach()
        if not bonus_apart and entropy_coef != 0.0:
            policy = policy + entropy_coef / self.accumulation * metrics["entropy"]
        if bonus_apart and entropy_coef != 0.0:
            loss = loss - entropy_coef / self.accumulation * self._masked_entropy(hidden, weight, bias, labels)
        scale = self.accumulation if plan.loss_type in ACCUMULATION_SCALED else 1
        self.policy_loss = policy * scale
        self.logp, self.entropy = self._unpacked(logp), self._unpacked(entropy)
        self.old_logp = self.logp if old is None else old
        return loss

    def _packed(self, x):
        """``[B, T]``, ``[B, 1]`` or ``[B]`` -> ``[n]`` at the scored positions (None stays None)."""
        if x is None:
            return None
        x = x.unsqueeze(1) if x.dim() == 1 else x
        return x.expand(self._scored.shape)[self._scored]

    def _unpacked(self, values):
        """``[n]`` -> fp32 ``[B, T]``, 0 off the scored positions (TRL's per-token layout)."""
        return values.new_zeros(self._scored.shape).masked_scatter(self._scored, values)

    def _weights(self, hidden, weight, bias, labels, old):
        """The product of TRL's multipliers of the policy-gradient term (``[B, T]``, ``[B, 1]`` or
        None): the off-policy sequence mask, the high-entropy mask, vLLM's ratio, the cispo /
        vespo sequence weights. The first, second and last need the current logprobs: one
        no-grad head forward, before the loss."""
        trainer, plan, inputs = self.trainer, self.plan, self.inputs
        needs_logp = (
            trainer.off_policy_mask_threshold is not None or trainer.top_entropy_quantile < 1.0
            or plan.sequence_weight is not None
        )  # fmt: skip
        if not needs_logp:
            logp = entropy = None
        else:
            with torch.no_grad():
                logp, entropy = fused_linear_logprobs(
                    hidden.detach(), weight.detach(), labels, bias=None if bias is None else bias.detach(),
                    return_entropy=True, **self.op,
                )  # fmt: skip
            logp, entropy = self._unpacked(logp), self._unpacked(entropy)
        old = logp if old is None else old
        factors = []
        if trainer.off_policy_mask_threshold is not None:
            factors.append(trainer.get_off_policy_mask(
                advantages=self.advantages, per_token_logps=logp,
                sampling_per_token_logps=inputs.get("sampling_per_token_logps", old), mask=self.mask,
                off_policy_threshold=trainer.off_policy_mask_threshold,
            ))  # fmt: skip
        if trainer.top_entropy_quantile < 1.0:
            self.entropy_mask = trainer.get_high_entropy_mask(entropy, self.mask, 1 - trainer.top_entropy_quantile)
            factors.append(self.entropy_mask)
        if trainer.use_vllm and trainer.vllm_importance_sampling_correction and plan.loss_type != "vespo":
            factors.append(inputs["importance_sampling_ratio"])
        if plan.sequence_weight == "cispo":
            log_ratio = ((logp - old) * self.mask).sum(-1, keepdim=True) / self.mask.sum(-1, keepdim=True).clamp(min=1)
            factors.append(torch.exp(log_ratio).clamp(max=plan.clip_high))
        elif plan.sequence_weight == "vespo":
            args = trainer.args
            self.phi_seq = trainer.get_gamma_weights(
                advantages=self.advantages, log_ratio_per_token=logp - old, mask=self.mask,
                importance_sampling_ratio=inputs.get("importance_sampling_ratio"), k_pos=args.vespo_k_pos,
                lambda_pos=args.vespo_lambda_pos, k_neg=args.vespo_k_neg, lambda_neg=args.vespo_lambda_neg,
            )  # fmt: skip
            factors.append(self.phi_seq)
        if not factors:
            return None
        product = factors[0]
        for factor in factors[1:]:
            product = product * factor
        return product.to(torch.float32)  # the masks are bool / the mask's integer dtype

    def _applied_entropy_coef(self) -> float:
        """The bonus coefficient of this micro-batch: 0 without a bonus; adaptive control
        applies it only while the last window's entropy is at or below the target."""
        trainer = self.trainer
        if not trainer._entropy_bonus_enabled:
            return 0.0
        if trainer.use_adaptive_entropy and trainer._last_world_entropy > trainer.args.entropy_target:
            return 0.0
        return trainer.entropy_coef

    def _masked_entropy(self, hidden, weight, bias, labels):
        """``Σ H e / max(Σ e, 1)`` over the high-entropy tokens ``e`` (mask × entropy mask),
        differentiable: one more head pass."""
        _, entropy = fused_linear_logprobs(hidden, weight, labels, bias=bias, return_entropy=True, **self.op)
        effective = self._packed(self.mask * self.entropy_mask).to(entropy.dtype)
        return (entropy * effective).sum() / effective.sum().clamp(min=1.0)

    def _normalizer(self):
        """The loss's denominator (see :class:`LossPlan`), accumulation included."""
        trainer, kind, batch = self.trainer, self.plan.normalizer, self.mask.shape[0]
        if kind == "batch":
            return batch * self.accumulation
        if kind == "tokens":
            return self.mask.sum().clamp(min=1).to(torch.float32) * self.accumulation
        if kind == "max_length":
            return batch * trainer.max_completion_length * self.accumulation
        # num_items_in_batch counts the tokens of the whole generation batch (all processes).
        items = self.inputs["num_items_in_batch"].clamp(min=1.0) / trainer.accelerator.num_processes
        if self.mode == "train":
            items = items * self.accumulation / trainer.args.steps_per_generation
        return items.to(torch.float32)


def advance_entropy_controller(trainer, step: LossStep) -> None:
    """TRL's adaptive entropy control, one training micro-batch: add this micro-batch's
    ``(Σ H e, Σ e)`` (``e`` the tokens the bonus acts on) to the window; at the optimizer
    step, the window's global mean entropy raises ``entropy_coef`` by ``entropy_coef_delta``
    (up to ``entropy_coef_max``) when it is at or below ``entropy_target``, else lowers it
    (down to ``entropy_coef_min``), and becomes the gate of the next window."""
    args = trainer.args
    effective = step.mask if step.entropy_mask is None else step.mask * step.entropy_mask
    stats = torch.stack([(step.entropy * effective).sum(), effective.sum()])
    window = trainer._entropy_window_stats
    trainer._entropy_window_stats = stats if window is None else window + stats
    if not trainer.accelerator.sync_gradients:
        return
    totals = trainer.accelerator.reduce(trainer._entropy_window_stats, reduction="sum")
    entropy = (totals[0] / totals[1].clamp(min=1.0)).item()
    if entropy <= args.entropy_target:
        trainer.entropy_coef = min(trainer.entropy_coef + args.entropy_coef_delta, args.entropy_coef_max)
    else:
        trainer.entropy_coef = max(trainer.entropy_coef - args.entropy_coef_delta, args.entropy_coef_min)
    trainer._last_world_entropy = entropy
    trainer._entropy_window_stats = None
