"""The policy-loss options that ``RLConfig.preset`` (``"trl"`` / ``"verl"``) sets, so the
trainer's loss is TRL 1.16's or verl 0.9.1's exactly where the two differ
(``rlhf_engine.ops.policy_loss`` documents each option):

==========================  ==============================  ===============================
option                      ``"trl"``                       ``"verl"``
==========================  ==============================  ===============================
``log_ratio_min`` / ``max``  no clamp (None / None)          ±20; gspo: None / 10
``kl_ratio_weight``         True (``use_bias_correction``)  False
``entropy_aggregation``     ``"token-mean"`` (batch mean)   None (the loss's aggregation)
``count_empty_seqs``        True (divide by all B)          False (non-empty sequences)
``is_weights_per_sequence`` gspo (sequence-level IS)        False
==========================  ==============================  ===============================

``sapo_tau_pos`` / ``sapo_tau_neg`` are config fields of their own (both frameworks
default to 1.0 / 1.05); ``RLConfig.kl_ratio_weight`` overrides the preset's when set.
"""

from __future__ import annotations

from rlhf_engine.reference.policy_loss import LOG_RATIO_CLAMP

# verl's GSPO clamps the sequence log-ratio from above only.
VERL_GSPO_LOG_RATIO_MAX = 10.0


def preset_loss_options(preset: str, loss: str, kl_ratio_weight: bool | None = None) -> dict:
    """The keyword arguments of ``ops.policy_loss`` / ``fused_linear_policy_loss`` that
    ``preset`` decides for ``loss`` (the table above); ``kl_ratio_weight`` None: the preset's."""
    if preset == "trl":
        options = dict(
            log_ratio_min=None, log_ratio_max=None, kl_ratio_weight=True, entropy_aggregation="token-mean",
            count_empty_seqs=True, is_weights_per_sequence=loss == "gspo",
        )
    elif preset == "verl":
        bounds = (None, VERL_GSPO_LOG_RATIO_MAX) if loss == "gspo" else (-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        options = dict(
            log_ratio_min=bounds[0], log_ratio_max=bounds[1], kl_ratio_weight=False, entropy_aggregation=None,
            count_empty_seqs=False, is_weights_per_sequence=False,
        )
    else:
        raise ValueError(f"preset must be 'trl' or 'verl', got {preset!r}")
    if kl_ratio_weight is not None:
        options["kl_ratio_weight"] = kl_ratio_weight
    return options
