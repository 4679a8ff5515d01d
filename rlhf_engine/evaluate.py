"""``rlhf-engine eval``: a saved model's metrics on a data file, the ones ``train --eval-data``
logs (``rlhf_engine.algos.eval_runs``), computed the same way.

``--model`` is a folder as ``train`` writes it (``OUT/model``; for ``--algo rm`` a reward
model), ``--data`` data of the algorithm's ``train`` format (any file type ``train`` reads),
``--config`` the run's YAML (its ``seed``, sampling settings, DPO ``beta`` / ``loss_type``,
batch sizes: the eval's micro-batches; its ``data:`` field names and limits). The reference (``--ref-model``, a folder or a built-in size) is what the
run's reference was, its starting ``--model``: DPO's implicit rewards ``β·(lp − ref)`` are
measured against it, so ``--algo dpo`` needs it; for the RL algorithms it gives ``kl``
(without it no ``kl`` is reported). RL samples are scored as the run scored them: by
``--reward-model DIR``, by ``--reward-fn FILE.py:FUNCTION`` (repeatable, ``--reward-weights``),
or by answer match with an ``"answer"`` in every record.

To score exactly as the run did, the RL evaluation builds the run's trainer
(``train.build_trainer``) around the loaded models, and holds what that trainer holds
besides: a reference (a copy of the policy without ``--ref-model``), PPO's critic (a copy of
the reward model), and for ``dtype: bf16`` the optimizer's fp32 master weights.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from rlhf_engine.algos.common import check_device
from rlhf_engine.algos.eval_runs import evaluate_run
from rlhf_engine.algos.precision import parse_dtype
from rlhf_engine.algos.reward_model import RewardModelTrainer
from rlhf_engine.memory.run_specs import RL_ALGOS
from rlhf_engine.models import ScalarHeadModel
from rlhf_engine.models.configs import MODEL_SIZES
from rlhf_engine.models.tokenizers import load_tokenizer
from rlhf_engine.train import ALGOS, build_trainer, load_config, load_policy, load_rewards
from rlhf_engine.train_data import load_data_config, load_records


def run_eval(algo: str, model: str, data: str | Path, *, config_path: str | Path | None = None,
             reward_model_path: str | None = None, ref_model: str | None = None, device: str = "cpu",
             reward_fns: list | None = None, reward_weights: list[float] | None = None) -> dict[str, float]:  # fmt: skip
    """The metrics of ``model`` on ``data`` for ``algo`` (see the module docstring); ValueError
    naming the flag for a combination that has no meaning. ``reward_fns`` / ``reward_weights``:
    the run's reward functions (:mod:`rlhf_engine.rewards`), for RL samples scored by them."""
    if algo not in ALGOS:
        raise ValueError(f"--algo must be one of {ALGOS}, got {algo!r}")
    rewards = load_rewards(algo, reward_fns, reward_weights)
    if algo == "dpo" and ref_model is None:
        raise ValueError("--algo dpo needs --ref-model: the model the DPO run started from (its --model), against which "
                         "the implicit rewards beta * (logp - ref_logp) are measured")  # fmt: skip
    if ref_model is not None and algo in ("sft", "rm"):
        raise ValueError(f"--ref-model is for --algo dpo and the RL algorithms, not --algo {algo}")
    if reward_model_path is not None and algo not in RL_ALGOS:
        raise ValueError(f"--reward-model scores RL samples; --algo {algo} does not take it")
    if algo == "rm" and model in MODEL_SIZES:
        raise ValueError(f"--algo rm evaluates a reward model folder (saved by train --algo rm), not the built-in size {model!r}")
    device = check_device(device)
    config = load_config(algo, config_path)
    tokenizer = load_tokenizer(model)
    data_config = load_data_config(config_path)
    records = load_records(algo, data, tokenizer, data_config)
    torch.manual_seed(config.seed)  # as train does before it builds the models
    if algo == "rm":
        trainer = RewardModelTrainer(ScalarHeadModel.load(model).to(device), records, config, pad_id=tokenizer.pad_token_id)
        return evaluate_run(algo, trainer, records)
    rl = algo in RL_ALGOS
    dtype, frozen = (parse_dtype(config.dtype), parse_dtype(config.frozen_dtype or config.dtype)) if rl else (torch.float32,) * 2
    policy = load_policy(model, tokenizer.vocab_size, tokenizer, config.seed, device, dtype)
    reference = load_policy(ref_model, tokenizer.vocab_size, tokenizer, config.seed, device, frozen) if ref_model else None
    if rl:  # a saved policy is a merged model (a LoRA run's too): evaluated without an adapter
        config = dataclasses.replace(config, lora_rank=0)
    trainer = build_trainer(algo, config, policy, records, tokenizer, reward_model_path, None, device, reference=reference,
                            answer_field=data_config.answer_field, **rewards)  # fmt: skip
    metrics = evaluate_run(algo, trainer, records)
    if rl and ref_model is None:  # the reference was a copy of the policy: a KL of 0 says nothing
        del metrics["kl"]
    return metrics
