"""Held-out evaluation of a run's models, per algorithm: what ``train --eval-data`` logs and
``rlhf-engine eval`` prints.

Every evaluation runs without gradients and in eval mode (each module's train / eval flag
is put back afterwards), a training batch's worth of rows at a time (so it needs no more
memory than a training step), and draws its randomness from no training stream: a run
trains the same weights with or without it.

Metrics, named as in the algorithm's training lines so that the two compare:

* ``sft``: ``loss``, the mean negative logprob per response token over all the records (the
  training loss on the whole set), ``perplexity`` = ``exp(loss)``, ``tokens`` (their number).
* ``rm``: over the pairs (a ranking of K responses counts as its K·(K−1)/2 pairs, best
  first), :func:`~rlhf_engine.algos.reward_model.evaluate_reward_model`'s ``accuracy``
  (pairwise, ties half), ``margin`` (mean ``r_c − r_r``), ``ece``, ``temperature`` and
  ``ece_scaled``.
* ``dpo``: the training loss and its metrics (:func:`~rlhf_engine.algos.dpo.pair_loss`),
  means over the pairs: ``loss``, ``reward_accuracy``, ``chosen_reward`` and
  ``rejected_reward`` (``β·(lp − ref)`` of the summed response logprobs against the
  reference), ``reward_margin`` (their difference), and ``nll_loss`` under RPO.
* ``ppo``, ``grpo``, ``rloo``, ``reinforce_pp``: one sample per record's prompt at the run's
  sampling settings, drawn from a fixed evaluation stream (``step_generator(seed, 0,
  "eval")``: every evaluation of a run sees the same noise, so they differ by the policy
  only), scored by the run's own :meth:`RLTrainer.score` (its reward model or reward
  function): ``reward_mean``, ``kl`` (mean over the samples of ``Σ_t (lp_t − ref_t)`` with
  the sampling logprobs, the training lines' estimate of KL(policy ‖ reference)),
  ``response_length`` (mean generated tokens, EOS included), and ``gold`` when the trainer
  has a gold score.
"""

from __future__ import annotations

import contextlib
import math
import sys

import torch

from rlhf_engine.algos.common import collate, model_device, sample_responses, step_generator
from rlhf_engine.algos.dpo import DPOConfig, pair_loss
from rlhf_engine.algos.reward_model import evaluate_reward_model
from rlhf_engine.algos.rl import RLTrainer
from rlhf_engine.algos.sft import sft_loss
from rlhf_engine.models import PolicyModel, ScalarHeadModel

EVAL_STREAM = "eval"
_LOG_FLOAT_MAX = math.log(sys.float_info.max)  # exp of more overflows: the perplexity is inf


@contextlib.contextmanager
def evaluating(*models: torch.nn.Module):
    """``models`` in eval mode under ``torch.no_grad()``; afterwards every submodule gets back
    its own train / eval flag (a trained policy holding a frozen part stays that way)."""
    flags = [(module, module.training) for model in models for module in model.modules()]
    for model in models:
        model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in flags:
            module.training = training


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def evaluate_sft(policy: PolicyModel, examples: list[tuple[list[int], list[int]]], *, pad_id: int,
                 batch_size: int) -> dict[str, float]:  # fmt: skip
    """``loss`` (token-mean NLL of the responses over all ``examples``), ``perplexity``,
    ``tokens``; ``batch_size`` examples per forward."""
    nll, tokens = 0.0, 0.0
    with evaluating(policy):
        for chunk in _chunks(examples, batch_size):
            batch = collate([p for p, _ in chunk], [r for _, r in chunk], pad_id, model_device(policy))
            _, metrics = sft_loss(policy, batch)
            nll += metrics["loss"] * metrics["tokens"]  # the chunk's token mean back to its sum
            tokens += metrics["tokens"]
    loss = nll / max(tokens, 1.0)
    return {"loss": loss, "perplexity": math.exp(loss) if loss < _LOG_FLOAT_MAX else math.inf, "tokens": tokens}


def ranking_pairs(records: list[dict]) -> list[dict]:
    """Reward-model records as pairs: a pair as it is, a ranking ``{"prompt", "responses"}``
    (best first) as every ``(responses[i], responses[j])`` with ``i < j``."""
    pairs = []
    for record in records:
        if "responses" not in record:
            pairs.append(record)
            continue
        responses = record["responses"]
        pairs += [{"prompt": record["prompt"], "chosen": responses[i], "rejected": responses[j]}
                  for i in range(len(responses)) for j in range(i + 1, len(responses))]  # fmt: skip
    return pairs


def evaluate_rewards(model: ScalarHeadModel, records: list[dict], *, pad_id: int, batch_size: int) -> dict[str, float]:
    """Pairwise ``accuracy``, ``margin``, ``ece``, ``temperature``, ``ece_scaled`` of a reward
    model on pair or ranking records (:func:`ranking_pairs`), ``batch_size`` pairs per forward."""
    with evaluating(model):
        return evaluate_reward_model(model, ranking_pairs(records), pad_id=pad_id, batch_size=batch_size)


def evaluate_dpo(policy: PolicyModel, reference: PolicyModel, pairs: list[dict], config: DPOConfig, *,
                 pad_id: int) -> dict[str, float]:  # fmt: skip
    """The DPO loss of ``config`` and its metrics over all ``pairs``, ``config.batch_size``
    pairs per forward (each a mean over its pairs, weighted by their number)."""
    sums: dict[str, float] = {}
    with evaluating(policy, reference):
        for chunk in _chunks(pairs, config.batch_size):
            loss, metrics = pair_loss(policy, reference, chunk, config, pad_id)
            for name, value in {"loss": loss, **metrics}.items():
                sums[name] = sums.get(name, 0.0) + float(value) * len(chunk)
    return {name: total / len(pairs) for name, total in sums.items()}


def evaluate_rl(trainer: RLTrainer, records: list[dict]) -> dict[str, float]:
    """``reward_mean``, ``kl``, ``response_length`` (and ``gold``) of one sample per record's
    ``"prompt"`` from ``trainer``'s policy (an :class:`~rlhf_engine.algos.rl.RLTrainer`),
    scored by the trainer. The records go a training rollout's rows at a time
    (``prompts_per_step · group_size``), each chunk sampled and scored with the config's
    micro-batches and through the memory plan's phases, as a step would."""
    cfg, place = trainer.config, trainer.placement
    generator = step_generator(cfg.seed, 0, EVAL_STREAM)
    sums = {"reward_mean": 0.0, "kl": 0.0, "response_length": 0.0}
    with evaluating(*trainer.roles.values()):
        for chunk in _chunks(records, cfg.prompts_per_step * cfg.group_size):
            prompts = [r["prompt"] for r in chunk]
            with place.phase("generate"):
                rollout = sample_responses(trainer.policy, prompts, 1, trainer.sampling, generator, cfg.generate_micro_batch_size)
            with place.phase("score"):
                rollout, metrics = trainer.score(rollout)
            sums["reward_mean"] += float(rollout.scores.float().sum())
            sums["kl"] += float(((rollout.logprobs - rollout.ref_logprobs) * rollout.response_mask).sum())
            sums["response_length"] += float(rollout.response_lengths.sum())
            if "gold" in metrics:
                sums["gold"] = sums.get("gold", 0.0) + metrics["gold"] * len(chunk)
    place.metrics()  # the evaluation's peaks and moves are not the next step's: drop them
    return {name: total / len(records) for name, total in sums.items()}


def evaluate_run(algo: str, trainer, records: list) -> dict[str, float]:
    """The metrics of ``trainer``'s models on ``records`` (as ``train.load_records(algo, ...)``
    reads them); see the module docstring."""
    if algo == "sft":
        return evaluate_sft(trainer.policy, records, pad_id=trainer.pad_id, batch_size=trainer.config.batch_size)
    if algo == "rm":
        return evaluate_rewards(trainer.model, records, pad_id=trainer.pad_id, batch_size=trainer.config.batch_size)
    if algo == "dpo":
        return evaluate_dpo(trainer.policy, trainer.reference, records, trainer.config, pad_id=trainer.pad_id)
    if isinstance(trainer, RLTrainer):  # ppo, grpo, rloo, reinforce_pp
        return evaluate_rl(trainer, records)
    raise ValueError(f"evaluate_run: no evaluation for --algo {algo!r} with a {type(trainer).__name__}")
