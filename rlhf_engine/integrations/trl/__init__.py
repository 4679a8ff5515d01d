"""TRL integration: rlhf_engine's fused lm_head ops inside TRL 1.16's own trainers.

One line::

    from rlhf_engine.integrations.trl import FusedDPOTrainer as DPOTrainer
    from rlhf_engine.integrations.trl import FusedGRPOTrainer as GRPOTrainer
    from rlhf_engine.integrations.trl import FusedRLOOTrainer as RLOOTrainer

What is here:

* :class:`FusedDPOTrainer`: ``trl.DPOTrainer`` with the policy and reference per-token
  logprobs (and TRL's per-token metric fields) computed from the last hidden states by
  :func:`rlhf_engine.ops.fused_linear_logprobs`. Every TRL 1.16 ``loss_type`` (sigmoid,
  hinge, ipo, exo_pair, nca_pair, robust, bco_pair, sppo_hard, aot, aot_unpaired,
  apo_zero, apo_down, discopop, sft, sigmoid_norm), lists of them with ``loss_weights``,
  ``label_smoothing``, ``f_divergence_type``, ``ld_alpha``, ``use_weighting``,
  ``precompute_ref_log_probs``, PEFT (reference = adapters disabled, or a ``ref``
  adapter) and a separate ``ref_model`` are TRL's own code, unchanged.
* :class:`FusedGRPOTrainer`: ``trl.GRPOTrainer`` whose loss step is one
  :func:`rlhf_engine.ops.fused_linear_policy_loss` call on the completion tokens' hidden
  states, every ``loss_type`` and option mapped onto the op (:mod:`.grpo`), TRL's metrics
  recomputed from the op's detached logprobs; old / reference logprobs from our head.
* :class:`FusedRLOOTrainer`: ``trl.RLOOTrainer`` whose sequence-ratio loss is
  :func:`rlhf_engine.ops.fused_linear_logprobs` + :func:`rlhf_engine.ops.policy_loss` (:mod:`.rloo`).
* :func:`add_fused_lm_head`: the drop-in for ``trl.trainer.utils.add_fused_lm_head``
  (TRL's signature and ``FusedCausalLMOutput``) that the trainer puts in place of TRL's.

Refused with a ValueError at construction, by all three trainers: models that softcap or
scale their logits (``final_logit_softcapping``, ``logit_scale``, ``output_multiplier``,
``lm_head_multiplier``, ``logits_scaling`` in the text config), the MoE load-balancing
loss, DeepSpeed ZeRO-3; by the GRPO trainer, the options its docstring names.

Importing this package imports TRL; ``import rlhf_engine`` never does.
"""

TRL_VERSION = "1.16.0"
_INSTALL_HINT = f"rlhf_engine.integrations.trl needs trl=={TRL_VERSION}: pip install 'rlhf-engine[trl]'"

try:
    import trl as _trl
except ImportError as err:
    raise ImportError(f"{_INSTALL_HINT} ({err})") from err

# The drop-ins replace internal seams of TRL (add_fused_lm_head and FusedCausalLMOutput, the
# GRPO / RLOO trainers' _compute_loss and their inputs), which other releases may move or
# change: refuse them instead of training on a guess.
if _trl.__version__.split(".")[:2] != TRL_VERSION.split(".")[:2]:
    raise ImportError(f"{_INSTALL_HINT} (found trl=={_trl.__version__})")

from rlhf_engine.integrations.trl.dpo import FusedDPOTrainer  # noqa: E402
from rlhf_engine.integrations.trl.grpo import FusedGRPOTrainer  # noqa: E402
from rlhf_engine.integrations.trl.lm_head import add_fused_lm_head  # noqa: E402
from rlhf_engine.integrations.trl.rloo import FusedRLOOTrainer  # noqa: E402

__all__ = ["TRL_VERSION", "FusedDPOTrainer", "FusedGRPOTrainer", "FusedRLOOTrainer", "add_fused_lm_head"]
