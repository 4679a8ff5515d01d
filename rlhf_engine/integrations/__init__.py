"""Adapters that plug rlhf_engine's fused ops into other RL frameworks.

Each submodule imports its framework itself, when it is imported: ``import rlhf_engine``
never imports one. ``rlhf_engine.integrations.verl``: verl's policy-loss registry,
advantage estimators and fused logprob / entropy kernel.
"""
