"""Adapters that plug rlhf_engine's fused ops into other RL frameworks.

Each submodule imports its framework itself, when it is imported: ``import rlhf_engine``
never imports one. ``rlhf_engine.integrations.verl``: verl's policy-loss registry,
advantage estimators and fused logprob / entropy kernel. ``rlhf_engine.integrations.trl``:
TRL's DPO trainer with its lm_head logprobs on our fused op.
"""
