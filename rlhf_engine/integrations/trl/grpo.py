"""``FusedGRPOTrainer``: TRL 1.16's ``GRPOTrainer`` with its policy loss computed from the
last hidden states by :func:`rlhf_engine.ops.fused_linear_policy_loss`.

Where TRL 1.16 computes it: ``GRPOTrainer._compute_loss`` runs the policy with
``fused_lm_head=True`` (per-token logprobs and entropy ``[B, T]``), then builds the
per-token loss of its ``loss_type`` in torch, multiplies the policy-gradient term by the
off-policy sequence mask, the high-entropy token mask and vLLM's importance-sampling
ratio, adds ``beta`` times the k3 KL, aggregates, subtracts the entropy bonus and logs
its metrics. The old, reference and rollout logprobs come from
``_get_per_token_logps_and_entropies`` (no gradient) in ``_generate_and_score_completions``.

This trainer changes two things: ``__init__`` patches the models with our
``add_fused_lm_head`` (:mod:`rlhf_engine.integrations.trl.lm_head`), so every no-grad
logprob TRL computes is :func:`rlhf_engine.ops.fused_linear_logprobs`; and
``_compute_loss`` runs the policy's backbone and hands the completion positions' hidden
states to one :func:`fused_linear_policy_loss` call (:class:`_LossStep`), whose options
are chosen once from the config (:func:`loss_plan`). The metrics are TRL's, under TRL's
names, computed from the op's detached logprobs (:mod:`._grpo_metrics`).

Per ``loss_type`` (``r_t = exp(lp_t - old_t)``, token level; ``s_b = exp(Σ_t (lp - old) m /
Σ_t m)``, sequence level; ``m`` = completion mask × tool mask; ``B`` completions; ``G``
gradient-accumulation steps in training, 1 in evaluation):

=============  =====================================  ==========================================
loss_type      our op's loss                          aggregation / normalizer
=============  =====================================  ==========================================
grpo           ppo (token) / gspo (sequence)          seq-mean-token-mean / ``B·G``
bnpo           ppo / gspo                             token-sum / ``max(Σ m, 1)·G``
dr_grpo        ppo / gspo                             token-sum / ``B·max_completion_length·G``
dapo           ppo / gspo                             token-sum / ``max(N, 1) / P · G / S`` (*)
luspo          ppo / gspo                             token-sum / ``B·G``
cispo          cispo-trl (token); reinforce weighted  token-sum / as dapo
               by ``sg(min(s_b, ε_high))`` (sequence)
sapo           sapo (token only)                      seq-mean-token-mean / ``B·G``
vespo          reinforce weighted by TRL's            token-sum / as dapo
               ``get_gamma_weights``
=============  =====================================  ==========================================

(*) ``N`` = ``num_items_in_batch`` (the generation batch's token count over all ``P``
processes), ``S`` = ``steps_per_generation``; in evaluation ``max(N, 1) / P``.

``ppo``/``gspo`` get ``clip_low = epsilon``, ``clip_high = epsilon_high``, ``delta``; no
log-ratio clamp anywhere (TRL clamps none). ``beta`` is the op's ``kl_coef`` (k3, TRL's
estimator) with ``kl_ratio_weight = use_bias_correction_kl``. The off-policy mask, the
high-entropy mask, vLLM's ratio and the cispo / vespo sequence weights are the op's
``is_weights`` (the policy-gradient term only, as TRL; at sequence level as their masked
mean per sequence, which is what TRL's broadcast of a ``[B, 1]`` loss over ``[B, T]``
weights computes). The entropy bonus is the op's ``entropy_coef / G`` with
``entropy_aggregation="token-mean"``.
"""

from __future__ import annotations

import torch
import trl.trainer.grpo_trainer as _grpo_module
from trl import GRPOTrainer

from rlhf_engine.integrations.trl._grpo_loss import LossStep, advance_entropy_controller, loss_plan
from rlhf_engine.integrations.trl._grpo_metrics import log_loss_metrics
from rlhf_engine.integrations.trl.lm_head import swapped_into
from rlhf_engine.integrations.trl.refusals import refuse_aux_loss, refuse_multimodal


class FusedGRPOTrainer(GRPOTrainer):
    """TRL 1.16's ``GRPOTrainer`` (same arguments, same training, same logged metrics) whose
    policy loss is :func:`rlhf_engine.ops.fused_linear_policy_loss` on the completion
    positions' last hidden states: the ``[B, T, V]`` logits never exist, and on the one-pass
    path the lm_head's logits are made once per chunk for value and gradient together.
    The old and reference logprobs are :func:`rlhf_engine.ops.fused_linear_logprobs`.

    Supported: every ``loss_type`` of TRL 1.16 (grpo, bnpo, dr_grpo, dapo, luspo, cispo,
    sapo, vespo), ``importance_sampling_level`` token and sequence, ``epsilon`` /
    ``epsilon_high``, ``delta``, ``beta`` with and without ``use_bias_correction_kl``,
    ``top_entropy_quantile``, ``entropy_coef`` (static and adaptive),
    ``off_policy_mask_threshold``, vLLM's importance-sampling correction, tool masks,
    gradient accumulation, PEFT, a separate reference model.

    Extra keyword arguments: ``backend`` (our ops' backend, ``"auto"``) and ``chunk_size``
    (tokens per chunk of logits, None for the op's default).

    Extra head work over TRL's (one no-grad head forward, ``2·n·H·V`` FLOPs for ``n``
    completion tokens): when the off-policy mask, the high-entropy mask, vespo or
    sequence-level cispo need the current logprobs before the loss. With both
    ``top_entropy_quantile < 1`` and an entropy bonus, the bonus (over the high-entropy
    tokens only, as TRL) takes a second differentiable head pass.

    Raises:
        ValueError: at construction, for what the op cannot compute exactly:
            ``loss_type="sapo"`` with ``importance_sampling_level="sequence"``; cispo or
            vespo at sequence level with ``beta != 0`` and ``use_bias_correction_kl``; the
            MoE load-balancing loss (``router_aux_loss_coef``); models that softcap or
            scale their logits; DeepSpeed ZeRO-3. At the loss step, a vision-language
            batch (pixel values, image grids, ...).
    """

    def __init__(self, *args, backend: str = "auto", chunk_size: int | None = None, **kwargs):
        with swapped_into(_grpo_module, backend, chunk_size):
            super().__init__(*args, **kwargs)
        refuse_aux_loss(self)
        self._loss_plan = loss_plan(self.args)
        self._op_options = dict(backend=backend, chunk_size=chunk_size)

    def _compute_loss(self, model, inputs):
        refuse_multimodal(self, inputs)
        prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        completion_length = completion_ids.size(1)
        # TRL's scored positions: the completion tokens that are not padding.
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        labels[:, :-completion_length] = -100
        step = LossStep(self, inputs, self._loss_plan, **self._op_options)
        with self.accelerator.autocast():
            loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, head_fn=step)
        if self.use_adaptive_entropy and step.mode == "train":
            advance_entropy_controller(self, step)
        log_loss_metrics(self, step)
        return loss

