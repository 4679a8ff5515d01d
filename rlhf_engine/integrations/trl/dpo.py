"""``FusedDPOTrainer``: TRL 1.16's ``DPOTrainer`` with its per-token logprobs computed by
rlhf_engine's fused lm_head op.

Where TRL 1.16 computes them: ``DPOTrainer.__init__`` patches the policy (its base model
under PEFT) and the reference model with ``add_fused_lm_head``, and ``_compute_loss`` (and
``compute_ref_log_probs``, for ``precompute_ref_log_probs``) call ``model(...,
fused_lm_head=True)`` and read per-token ``log_probs``, ``entropy``, ``mean_logits``,
``is_top1`` and, with ``use_weighting``, ``log_sum_sq_probs``. The loss types, their
combination with ``loss_weights``, ``label_smoothing``, ``f_divergence_type``,
``ld_alpha``, WPO weighting and every metric are written inline in ``_compute_loss``
from those fields. So the one thing this trainer changes is which ``add_fused_lm_head``
``DPOTrainer.__init__`` calls: ours (:mod:`rlhf_engine.integrations.trl.lm_head`), with
TRL's signature and output. TRL's loss and metric code runs unchanged.
"""

from __future__ import annotations

import trl.trainer.dpo_trainer as _dpo_module
from trl import DPOTrainer

from rlhf_engine.integrations.trl.lm_head import swapped_into
from rlhf_engine.integrations.trl.refusals import refuse_aux_loss


class FusedDPOTrainer(DPOTrainer):
    """TRL 1.16's ``DPOTrainer`` (same arguments, same training, same logged metrics) whose
    policy and reference logprobs come from :func:`rlhf_engine.ops.fused_linear_logprobs`
    on the last hidden states: the ``[B, T, V]`` logits never exist, only the positions
    with a completion label go through the lm_head, and on CUDA the forward is one Triton
    GEMM with an online-logsumexp epilogue (no logits in memory).

    Extra keyword arguments: ``backend`` (our op's backend, ``"auto"``) and ``chunk_size``
    (tokens per chunk of logits, None for the op's default).

    The policy's ``logits/chosen``, ``logits/rejected`` and ``mean_token_accuracy``
    metrics (and the WPO weights with ``use_weighting``) need a mean, an argmax and a
    second logsumexp over the vocabulary: they are computed exactly, without gradient, in
    one extra pass over chunks of tokens (``2·n·H·V`` FLOPs for ``n`` completion tokens).

    Raises:
        ValueError: at construction, for what the op cannot compute exactly: models that
            softcap or scale their logits, the MoE load-balancing loss
            (``router_aux_loss_coef``), DeepSpeed ZeRO-3.
    """

    def __init__(self, *args, backend: str = "auto", chunk_size: int | None = None, **kwargs):
        with swapped_into(_dpo_module, backend, chunk_size):
            super().__init__(*args, **kwargs)
        # checked here, not at the first step; the head itself refuses configs that always return router logits
        refuse_aux_loss(self)
