"""``rlhf-engine train``: the trainers on a user's local model and JSONL data.

Data (``--data``: JSONL, JSON, Parquet, CSV or a saved ``datasets`` folder; plain strings or
chat turns through the tokenizer's chat template; field names, ``max_prompt_length`` and
``max_length`` from the ``data:`` mapping of the config or the ``--prompt-field`` ... flags):
see :mod:`rlhf_engine.train_data`. In short:

* ``sft``: ``{"prompt", "response"}``, ``{"prompt", "completion"}`` or ``{"messages"}``
* ``rm``: ``{"prompt", "chosen", "rejected"}`` (optional number ``"margin"``), or rankings
  ``{"prompt", "responses": [...]}`` best first
* ``dpo``: ``{"prompt", "chosen", "rejected"}`` (the prompt may be implicit)
* ``ppo``, ``grpo``, ``rloo``, ``reinforce_pp``, ``rejection_sampling``: ``{"prompt"}``
  and any other fields, scored by ``--reward-model DIR`` (a reward model saved by
  ``train --algo rm``), by reward functions ``--reward-fn FILE.py:FUNCTION`` (repeatable,
  ``--reward-weights``; TRL's convention, :mod:`rlhf_engine.rewards`: they get the prompt
  as given, the decoded response and every other field of the record), or, with neither,
  ``{"prompt", "answer"}``: reward 1 when the response text equals the answer (stripped),
  else 0. PPO always needs a reward model (it trains a critic initialised from it); with
  ``--reward-fn`` too, the functions score and the reward model only starts the critic.
  Other algorithms take one of ``--reward-model`` and ``--reward-fn``.

Loading prints one line (records, truncations, drops) unless ``quiet`` and writes it to
``data_stats.json`` in the output folder.

``--config FILE.yaml`` sets fields of the algorithm's config dataclass (``SFTConfig``,
``RewardModelConfig``, ``DPOConfig``, ``RejectionSamplingConfig``, or ``RLConfig`` on top
of the algorithm's preset; for ``grpo`` also ``variant``; ``data:`` a mapping of
:class:`~rlhf_engine.train_data.DataConfig` fields). Rejection sampling runs in one process
only (no torchrun), without ``--eval-data``.
The output folder gets ``metrics.jsonl`` (also sent to the ``--report-to`` sinks: TensorBoard,
W&B), for RL algorithms ``samples.jsonl`` (``--log-samples K`` prompts and completions of each
step with their rewards), ``curves.png`` (every logged metric per step, ``rlhf_engine.curves``),
checkpoints every ``checkpoint_every`` steps and the final model with its tokenizer in
``model/`` (so that folder can be the ``--model`` of a later run); ``--resume`` continues from
the latest checkpoint there, first dropping the log lines (metrics and samples) of steps after
it (they are run again).

``--eval-data FILE`` (records of the ``--data`` format) evaluates the run's model before the
first step, after every ``--eval-every N`` steps and after the last one, with the metrics of
``rlhf_engine.algos.eval_runs`` (SFT loss and perplexity, reward-model pairwise accuracy, DPO
reward accuracy and margins, RL reward, KL and length of one sample per eval prompt), logged
as phase ``ALGO_eval`` at the step they follow (``-1``: before training). Evaluation changes
nothing of the training (no gradient, no draw from a training random stream). One process only.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import os
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from rlhf_engine.algos.common import check_device, freeze, model_device
from rlhf_engine.algos.config import config_from_dict, read_yaml_mapping
from rlhf_engine.algos.dpo import DPOConfig, DPOTrainer
from rlhf_engine.algos.eval_runs import evaluate_run
from rlhf_engine.algos.grpo import grpo_preset
from rlhf_engine.algos.loop import eval_points, run_steps
from rlhf_engine.algos.ppo import PPO_DEFAULTS
from rlhf_engine.algos.precision import parse_dtype
from rlhf_engine.memory.run_specs import RL_ALGOS
from rlhf_engine.algos.reinforce_pp import REINFORCE_PP_DEFAULTS
from rlhf_engine.algos.rejection_sampling import RejectionSamplingConfig, RejectionSamplingTrainer
from rlhf_engine.algos.reward_model import RewardModelConfig, RewardModelTrainer, sequence_rewards
from rlhf_engine.algos.rl import RLConfig, RLTrainer
from rlhf_engine.algos.rloo import RLOO_DEFAULTS
from rlhf_engine.algos.sft import SFTConfig, SFTTrainer
from rlhf_engine.distributed.batches import check_world_size
from rlhf_engine.distributed.checkpoint import export_policy, export_scalar_head
from rlhf_engine.distributed.group import SINGLE, DataParallel, destroy_process_group, init_process_group, launched_by_torchrun
from rlhf_engine.models import PolicyModel, ScalarHeadModel, llama_config
from rlhf_engine.models.configs import MODEL_SIZES
from rlhf_engine.models.tokenizers import load_tokenizer
from rlhf_engine.rewards import RecordSampler, TextReward, describe, exact_match, resolve_reward_fns
from rlhf_engine.sinks import check_report_to
from rlhf_engine.train_data import DataConfig, DataStats, load_data, load_data_config, load_records  # noqa: F401 (load_records: the API)
from rlhf_engine.train_outputs import prepare_out, report_data, train_outputs
from rlhf_engine.train_plan import place_for_first_phase, plan_run

ALGOS = ("sft", "rm", "ppo", "grpo", "rloo", "reinforce_pp", "dpo", "rejection_sampling")
SAMPLING_ALGOS = (*RL_ALGOS, "rejection_sampling")  # the ones a reward scores samples for
RL_PRESETS = {"ppo": PPO_DEFAULTS, "rloo": RLOO_DEFAULTS, "reinforce_pp": REINFORCE_PP_DEFAULTS}  # grpo: grpo_preset
LOG_SAMPLES = 4  # --log-samples default for the RL algorithms
EVAL_UNDER_TORCHRUN = ("--eval-data runs in one process only, not under torchrun (--nproc): train without it and "
                       "evaluate the saved model with `rlhf-engine eval --model OUT/model --data FILE`")


def load_config(algo: str, path: str | Path | None):
    """The algorithm's config: YAML fields over its defaults (errors name file and field); the
    ``data:`` mapping is the data's (:func:`~rlhf_engine.train_data.load_data_config`)."""
    values = read_yaml_mapping(path) if path is not None else {}
    values.pop("data", None)
    source = str(path) if path is not None else "config"
    if algo == "grpo":
        try:
            preset = grpo_preset(values.pop("variant", "grpo"))
        except ValueError as error:
            raise ValueError(f"{source}: {error}") from None
        return config_from_dict(RLConfig, {**preset, **values}, source=source)
    if algo in RL_PRESETS:
        return config_from_dict(RLConfig, {**RL_PRESETS[algo], **values}, source=source)
    cls = {"sft": SFTConfig, "rm": RewardModelConfig, "dpo": DPOConfig, "rejection_sampling": RejectionSamplingConfig}[algo]
    return config_from_dict(cls, values, source=source)


def load_policy(model: str, vocab_size: int, tokenizer, seed: int, device: str, dtype: torch.dtype = torch.float32) -> PolicyModel:
    """The policy in ``dtype`` on ``device`` (a folder is read in ``dtype``: a bf16 run never
    holds an fp32 copy)."""
    if model in MODEL_SIZES:
        config = llama_config(model, vocab_size, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id)  # fmt: skip
        return PolicyModel.from_config(config, seed=seed).to(device=device, dtype=dtype)
    policy = PolicyModel.from_pretrained(model, dtype=dtype)
    check_tokenizer_fits(model, tokenizer, policy.vocab_size)
    return policy.to(device)


def run_identity(model: str, config, reward_model_path: str | None, data: DataConfig | None = None,
                 reward_fns: list | None = None, reward_weights: list[float] | None = None) -> dict:  # fmt: skip
    """What a checkpoint records of its run, and a resume must match (``run_steps``'s ``run``):
    the model (a folder by its absolute path), the reward model, the config as given, the
    data config's fields that differ from the defaults (none: no ``data`` entry, so checkpoints
    written before the data config existed still resume), and the reward functions (``file.py:fn``
    as given, a callable as ``module:qualname``) with their weights when there are any."""
    def where(path: str | None):  # a built-in size by its name
        return path if path is None or path in MODEL_SIZES else str(Path(path).resolve())

    run = {"model": where(model), "reward_model": where(reward_model_path), "config": dataclasses.asdict(config)}
    changed = {k: v for k, v in dataclasses.asdict(data or DataConfig()).items() if v != getattr(DataConfig, k)}
    if changed:
        run["data"] = changed
    if reward_fns:
        run["reward_fns"] = [describe(f) for f in reward_fns]
        run["reward_weights"] = list(reward_weights) if reward_weights is not None else [1.0] * len(reward_fns)
    return run


def check_tokenizer_fits(model: str, tokenizer, vocab_size: int) -> None:
    """ValueError when ``tokenizer`` makes ids the model's embedding (``vocab_size`` rows) has
    no row for: a Qwen2 tokenizer without a pad token gets ``<|endoftext|>`` added as a new
    token by transformers, and the first padded batch would crash deep in ``torch.embedding``."""
    special = {"pad": tokenizer.pad_token_id, "bos": getattr(tokenizer, "bos_token_id", None),
               "eos": tokenizer.eos_token_id}  # fmt: skip
    outside = {name: i for name, i in special.items() if i is not None and i >= vocab_size}
    if outside or tokenizer.vocab_size > vocab_size:
        which = ", ".join(f"{name} token id {i}" for name, i in outside.items()) or f"size {tokenizer.vocab_size}"
        raise ValueError(
            f"model {model}: the tokenizer's {which} is outside the model's embedding ({vocab_size} rows; the "
            f"tokenizer has {tokenizer.vocab_size} tokens): resize the model to the tokenizer "
            f"(model.resize_token_embeddings(len(tokenizer)), then save it) or use the tokenizer it was trained with"
        )


def build_trainer(algo: str, config, policy: PolicyModel, records: list, tokenizer, reward_model_path: str | None, placement=None,
                  device: torch.device | None = None, parallel: DataParallel = SINGLE, *, eval_records: list | None = None,
                  reference: PolicyModel | None = None, log_samples: int = 0, reward_fns: list | None = None,
                  reward_weights: list[float] | None = None, answer_field: str = "answer"):  # fmt: skip
    """The trainer of ``algo`` on ``records``. RL and rejection sampling: scored as
    :func:`_scoring` says, ``eval_records`` (the ``--eval-data`` records) by the same scorer
    but never trained on; an RL trainer keeps ``log_samples`` samples of each step
    (``RLTrainer``). ``reference``: DPO's and RL's (default: a copy of ``policy``; RL with
    LoRA: the adapter-disabled policy, and no other may be given). ``answer_field``: the data
    config's, the field the built-in answer match reads."""
    pad = tokenizer.pad_token_id
    if algo == "sft":
        return SFTTrainer(policy, records, config, pad_id=pad, parallel=parallel)
    if algo == "rm":
        return RewardModelTrainer(ScalarHeadModel.from_policy(policy), records, config, pad_id=pad, parallel=parallel)
    if algo == "dpo":
        reference = copy.deepcopy(policy) if reference is None else reference
        return DPOTrainer(policy, reference, records, config, pad_id=pad, parallel=parallel)
    if algo == "rejection_sampling":
        sampler = RecordSampler(records, config.samples_per_prompt)
        scoring = _scoring(algo, records, eval_records, tokenizer, reward_model_path, reward_fns, reward_weights, sampler,
                           torch.float32, model_device(policy), answer_field=answer_field)  # fmt: skip
        score_fn = scoring.get("reward_fn") or _model_score(freeze(scoring["reward_model"]), pad)
        return RejectionSamplingTrainer(policy, config, prompts=sampler, score_fn=score_fn, pad_token_id=pad,
                                        eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    # the rows a process scores: its share of the step's prompts, group_size samples of each
    sampler = RecordSampler(records, config.group_size, parallel.rows(config.prompts_per_step))
    scoring = _scoring(algo, records, eval_records, tokenizer, reward_model_path, reward_fns, reward_weights, sampler,
                       parse_dtype(config.frozen_dtype or config.dtype), model_device(policy), parallel,
                       answer_field=answer_field)  # fmt: skip
    if algo == "ppo":
        scoring["critic"] = copy.deepcopy(scoring["reward_model"])
        if "reward_fn" in scoring:  # the reward model only initialises the critic
            del scoring["reward_model"]
    if reference is None and not config.lora_rank:  # LoRA: the adapter-disabled policy
        reference = copy.deepcopy(policy)
    if placement is not None and placement.bytes_moved_per_step:
        place_for_first_phase(placement, device, policy=policy, reference=reference, **scoring)
    return RLTrainer(
        config, policy=policy, reference=reference, prompts=sampler, pad_token_id=pad,
        eos_token_id=tokenizer.eos_token_id, placement=placement, parallel=parallel, log_samples=log_samples, **scoring,
    )  # fmt: skip


def _scoring(algo: str, records: list, eval_records: list | None, tokenizer, reward_model_path: str | None,
             reward_fns: list | None, reward_weights: list[float] | None, sampler: RecordSampler, dtype: torch.dtype,
             device: torch.device, parallel: DataParallel = SINGLE, answer_field: str = "answer") -> dict[str, Any]:  # fmt: skip
    """What scores the samples: ``{"reward_fn": TextReward}`` from ``reward_fns`` (or the built-in
    exact match when every record, ``eval_records`` too, has an ``answer``), or
    ``{"reward_model": model}``. PPO loads its reward model in any case (its critic starts from
    it): with reward functions both keys."""
    needs_model = algo == "ppo"
    if reward_fns and reward_model_path is not None and not needs_model:
        raise ValueError(f"--algo {algo}: give --reward-fn or --reward-model, not both (the reward model scores on "
                         "its own; write a reward function that calls it to combine them)")  # fmt: skip
    if needs_model and reward_model_path is None:
        raise ValueError("--algo ppo needs --reward-model DIR (its critic starts from the reward model"
                         + (", which --reward-fn does not replace)" if reward_fns else ")"))  # fmt: skip
    scoring: dict[str, Any] = {}
    if reward_model_path is not None:
        scoring["reward_model"] = ScalarHeadModel.load(reward_model_path, dtype=dtype).to(device)
    if reward_fns:
        scoring["reward_fn"] = TextReward(tokenizer, reward_fns, reward_weights, sampler=sampler, parallel=parallel)
    elif reward_model_path is None:
        if not all(r["answer"] is not None for r in records):
            raise ValueError(f"--algo {algo} needs --reward-model DIR, --reward-fn FILE.py:FUNCTION or an 'answer' in every record")
        if any(r["answer"] is None for r in eval_records or []):
            raise ValueError("--eval-data: every record needs an 'answer' (the run scores by answer match), or give "
                             "--reward-model DIR or --reward-fn")  # fmt: skip
        scoring["reward_fn"] = TextReward(tokenizer, [exact_match(answer_field)], sampler=sampler, parallel=parallel)
    return scoring


def _model_score(reward_model: ScalarHeadModel, pad_id: int):
    """ScoreFn of a reward model (``sequence_rewards`` without gradients)."""
    def score(prompts: list[list[int]], responses: list[list[int]]) -> torch.Tensor:
        with torch.no_grad():
            return sequence_rewards(reward_model, prompts, responses, pad_id)

    return score


def check_log_samples(algo: str, log_samples: int | None) -> int:
    """``--log-samples``: samples per step for an RL algorithm (None: ``LOG_SAMPLES``), 0 for the
    others (which sample nothing: setting it for them is an error)."""
    if log_samples is None:
        return LOG_SAMPLES if algo in RL_ALGOS else 0
    if isinstance(log_samples, bool) or not isinstance(log_samples, int) or log_samples < 0:
        raise ValueError(f"--log-samples must be a number of samples >= 0 (0: off), got {log_samples!r}")
    if algo not in RL_ALGOS and log_samples:
        raise ValueError(f"--log-samples: --algo {algo} samples no completions (it logs samples of the RL algorithms {RL_ALGOS})")
    return log_samples


def run_train(
    algo: str, model: str, data: str | Path, out: str | Path, *, config_path: str | Path | None = None,
    resume: bool = False, reward_model_path: str | None = None, checkpoint_every: int = 10,
    stop_after: int | None = None, quiet: bool = False, device: str = "cpu", plan: str | None = None,
    gpu_memory: str | None = None, keep_last: int | None = None, eval_data: str | Path | None = None,
    eval_every: int | None = None, data_options: dict | None = None, report_to=None, log_samples: int | None = None,
    reward_fns: list | None = None, reward_weights: list[float] | None = None,
) -> list[dict]:  # fmt: skip
    """Train ``algo`` on ``device`` and return the per-step metrics of this call (see the module
    docstring). ``plan``: ``"auto"`` (the default on CUDA) or ``"off"`` (the default elsewhere),
    see :func:`plan_run`; ``gpu_memory`` overrides the GPU's size for the plan. ``eval_data``:
    records read as ``data`` is, evaluated (``rlhf_engine.algos.eval_runs``) before the first
    step, after every ``eval_every`` steps (None or 0: none in between) and after the last,
    logged as phase ``f"{algo}_eval"`` (one process only: refused under torchrun). ``data_options``:
    :class:`~rlhf_engine.train_data.DataConfig` fields over the config's ``data:`` (the flags).
    ``report_to``: sinks beside ``metrics.jsonl`` (``rlhf_engine.sinks``); ``log_samples``:
    samples per RL step in ``samples.jsonl`` (:func:`check_log_samples`). ``quiet``: no progress
    bar (for transformers' bars too, wrap the call in ``rlhf_engine.quiet.quiet_transformers``,
    as the CLI does). ``reward_fns``: reward functions in TRL's convention (callables or
    ``"file.py:fn"`` / ``"module:fn"`` strings, :mod:`rlhf_engine.rewards`) for the RL
    algorithms and rejection sampling, with ``reward_weights`` (one each; default all 1)."""
    if algo not in ALGOS:
        raise ValueError(f"--algo must be one of {ALGOS}, got {algo!r}")
    if checkpoint_every < 0:
        raise ValueError(f"--checkpoint-every must be >= 0, got {checkpoint_every}")
    if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1):
        raise ValueError(f"--keep-last must be a number of checkpoints >= 1, got {keep_last!r}")
    rewards = load_rewards(algo, reward_fns, reward_weights)  # a bad spec fails before any model loads
    device = check_device(device)
    report_to, log_samples = check_report_to(report_to), check_log_samples(algo, log_samples)
    config = load_config(algo, config_path)
    data_config = load_data_config(config_path, data_options)
    if eval_data is None and eval_every is not None:
        raise ValueError("--eval-every needs --eval-data FILE (what to evaluate on)")
    if eval_data is not None and algo == "rejection_sampling":
        raise ValueError("--eval-data: rejection_sampling has no evaluation (its policy can be evaluated with "
                         "`rlhf-engine eval --algo grpo ...`, which samples and scores it as an RL run)")  # fmt: skip
    schedule = eval_points(config.steps, eval_every or 0) if eval_data is not None else []
    if launched_by_torchrun():
        if eval_data is not None:
            raise ValueError(EVAL_UNDER_TORCHRUN)
        return _run_distributed(algo, config, model, data, out, device, plan, resume=resume, reward_model_path=reward_model_path,
                                checkpoint_every=checkpoint_every, stop_after=stop_after, quiet=quiet,
                                gpu_memory=gpu_memory, keep_last=keep_last, data_config=data_config, report_to=report_to,
                                log_samples=log_samples, rewards=rewards, reward_specs=reward_fns)  # fmt: skip
    tokenizer = load_tokenizer(model)
    records, stats = load_data(algo, data, tokenizer, data_config)
    eval_records, eval_stats = load_eval_data(algo, eval_data, tokenizer, data_config) if eval_data is not None else (None, None)
    # before the plan fills in micro-batches
    run = run_identity(model, config, reward_model_path, data_config, reward_fns, reward_weights)
    mode = plan or ("auto" if device.type == "cuda" and algo in RL_ALGOS else "off")
    # The plan covers the evaluation's rollouts too (the longest prompt of either file): an eval
    # prompt longer than every training prompt may change its micro-batches, never overrun them.
    planned = records + (eval_records or [])
    config, placement = plan_run(algo, config, model, tokenizer, planned, reward_model_path, device, mode, gpu_memory,
                                 reward_scores="reward_fns" not in rewards)  # fmt: skip
    torch.manual_seed(config.seed)
    # A plan that offloads builds every model on the CPU; each goes where the plan puts it.
    build_on = torch.device("cpu") if placement is not None and placement.bytes_moved_per_step else device
    dtype = parse_dtype(config.dtype) if algo in RL_ALGOS else torch.float32
    policy = load_policy(model, tokenizer.vocab_size, tokenizer, config.seed, build_on, dtype)
    trainer = build_trainer(algo, config, policy, records, tokenizer, reward_model_path, placement, device,
                            eval_records=eval_records, log_samples=log_samples, answer_field=data_config.answer_field,
                            **rewards)  # fmt: skip
    out = Path(out)
    resumed_from = prepare_out(out, resume)
    report_data(stats, out / "data_stats.json", quiet)
    if eval_stats is not None:
        report_data(eval_stats, out / "eval_data_stats.json", quiet)
    evaluate = _evaluator(algo, trainer, eval_records, quiet) if eval_records is not None else None
    with train_outputs(out, algo, config.steps + len(schedule), trainer, tokenizer, quiet=quiet, report_to=report_to, run=run,
                       resumed_from=resumed_from) as (log, on_step):  # fmt: skip
        history = run_steps(
            trainer, steps=config.steps, phase=algo, log=log, checkpoint_dir=out / "checkpoints",
            checkpoint_every=checkpoint_every, resume=resume, stop_after=stop_after, run=run, keep_last=keep_last,
            on_step=_chain(_reward_metrics(trainer), on_step), evaluate=evaluate, eval_every=eval_every or 0,
        )  # fmt: skip
    final = trainer.models["reward_model" if algo == "rm" else "policy"]
    final.save(out / "model")
    tokenizer.save(out / "model")  # so the folder can be the --model of a later run
    return history


def load_rewards(algo: str, reward_fns: list | None, reward_weights: list[float] | None) -> dict:
    """``build_trainer``'s reward arguments: the functions loaded (once, so a bad spec fails
    before any model loads) and their weights; {} without any."""
    if reward_fns is None and reward_weights is None:
        return {}
    if algo not in SAMPLING_ALGOS:
        raise ValueError(f"--reward-fn / --reward-weights score sampled responses, and --algo {algo} samples none "
                         f"(use one of {SAMPLING_ALGOS})")  # fmt: skip
    if reward_fns is None:
        raise ValueError("--reward-weights needs --reward-fn (one weight per function)")
    return {"reward_fns": resolve_reward_fns(reward_fns, reward_weights)[0], "reward_weights": reward_weights}


def _reward_metrics(trainer):
    """An ``on_step`` adding ``rewards/<name>/mean`` per reward function (None when the trainer
    scores with a reward model). Under torchrun every rank runs it (the means are summed over them)."""
    scorer = getattr(trainer, "reward_fn", None) or getattr(trainer, "score_fn", None)
    if not isinstance(scorer, TextReward):
        return None
    return lambda step, metrics: metrics.update(scorer.metrics())


def _chain(*hooks):
    """One ``on_step`` calling ``hooks`` in order (None ones skipped; None when all are)."""
    hooks = [h for h in hooks if h is not None]
    if not hooks:
        return None

    def on_step(step: int, metrics: dict) -> None:
        for hook in hooks:
            hook(step, metrics)

    return on_step


def load_eval_data(algo: str, path: str | Path, tokenizer, data: DataConfig | None = None) -> tuple[list, DataStats]:
    """``--eval-data``: records of ``algo``'s format and their stats, read as ``--data`` is
    (:func:`~rlhf_engine.train_data.load_data`, which checks the rest: a missing path is named
    here under its own flag)."""
    if not Path(path).exists():
        raise ValueError(f"--eval-data {path}: no such file")
    return load_data(algo, path, tokenizer, data)


def format_eval(algo: str, step: int, metrics: dict) -> str:
    """One line for an evaluation logged after ``step`` (-1: before training)."""
    when = "before training" if step < 0 else f"after step {step}"
    shown = ", ".join(f"{k}={'nan' if v is None else f'{v:.4g}'}" for k, v in metrics.items())
    return f"{algo} eval {when}: {shown}"


def _evaluator(algo: str, trainer, records: list, quiet: bool):
    """``run_steps``'s ``evaluate``: the run's metrics on ``records``, printed unless ``quiet``."""
    def evaluate(step: int) -> dict[str, float]:
        metrics = evaluate_run(algo, trainer, records)
        if not quiet:
            tqdm.write(format_eval(algo, step, metrics))
        return metrics

    return evaluate


def _run_distributed(algo: str, config, model: str, data, out, device: torch.device, plan: str | None, *, resume: bool,
                     reward_model_path: str | None, checkpoint_every: int, stop_after: int | None, quiet: bool,
                     gpu_memory: str | None = None, keep_last: int | None = None,
                     data_config: DataConfig | None = None, report_to=(), log_samples: int = 0, rewards: dict | None = None,
                     reward_specs: list | None = None) -> list[dict]:  # fmt: skip
    """:func:`run_train` on every rank of a torchrun launch: FSDP2 for the trained roles, each rank
    its share of every batch, sharded checkpoints; rank 0 alone writes the log and the model folder
    (gathered). The world-size checks run before anything is read or loaded."""
    world_size = int(os.environ["WORLD_SIZE"])
    check_world_size(algo, config, world_size)
    parallel = init_process_group(device)
    try:
        history = _train_ranks(algo, config, model, data, Path(out), parallel, resume=resume, reward_model_path=reward_model_path,
                               checkpoint_every=checkpoint_every, stop_after=stop_after, quiet=quiet, plan=plan,
                               gpu_memory=gpu_memory, keep_last=keep_last, data_config=data_config, report_to=report_to,
                               log_samples=log_samples, rewards=rewards or {}, reward_specs=reward_specs)  # fmt: skip
        # Every rank done with every collective, and the models (whose FSDP state holds gloo work
        # and tensors) freed, before the group goes: a gloo group torn down under a live peer or
        # with pending work can abort the process at exit.
        parallel.barrier()
    finally:
        gc.collect()
        destroy_process_group()
    return history


def _train_ranks(algo: str, config, model: str, data, out: Path, parallel: DataParallel, *, resume: bool,
                 reward_model_path: str | None, checkpoint_every: int, stop_after: int | None, quiet: bool,
                 plan: str | None, gpu_memory: str | None, keep_last: int | None,
                 data_config: DataConfig | None, report_to=(), log_samples: int = 0, rewards: dict | None = None,
                 reward_specs: list | None = None) -> list[dict]:  # fmt: skip
    """The body of :func:`_run_distributed` (its models go out of scope when it returns). The
    plan (``--plan auto``, the default for RL on CUDA) is rank 0's under FSDP2, the same on
    every rank (it reads only the configs, the data and the GPU's size), made before any
    model is loaded. Rank 0 alone writes the logs, the samples of the global rollout (the same
    on every rank) and the curves."""
    tokenizer = load_tokenizer(model)
    records, stats = load_data(algo, data, tokenizer, data_config)
    rewards = rewards or {}
    # the same at any world size (before the plan)
    run = run_identity(model, config, reward_model_path, data_config, reward_specs, rewards.get("reward_weights"))
    mode = plan or ("auto" if parallel.device.type == "cuda" and algo in RL_ALGOS else "off")
    config, _ = plan_run(algo, config, model, tokenizer, records, reward_model_path, parallel.device, mode, gpu_memory,
                         world_size=parallel.world_size, reward_scores="reward_fns" not in rewards)  # fmt: skip
    torch.manual_seed(config.seed)
    policy = load_policy(model, tokenizer.vocab_size, tokenizer, config.seed, parallel.device)
    trainer = build_trainer(algo, config, policy, records, tokenizer, reward_model_path, None, parallel.device, parallel,
                            log_samples=log_samples if parallel.is_main else 0, answer_field=(data_config or DataConfig()).answer_field,
                            **rewards)  # fmt: skip
    resumed_from = None
    if parallel.is_main:
        resumed_from = prepare_out(out, resume)
        report_data(stats, out / "data_stats.json", quiet)
    parallel.barrier()
    outputs = contextlib.nullcontext((None, None))
    if parallel.is_main:
        outputs = train_outputs(out, algo, config.steps, trainer, tokenizer, quiet=quiet, report_to=report_to, run=run,
                                resumed_from=resumed_from)  # fmt: skip
    with outputs as (log, on_step):
        history = run_steps(
            trainer, steps=config.steps, phase=algo, log=log, checkpoint_dir=out / "checkpoints",
            checkpoint_every=checkpoint_every, resume=resume, stop_after=stop_after, run=run, keep_last=keep_last,
            on_step=_chain(_reward_metrics(trainer), on_step),  # the reward means on every rank: a collective
        )  # fmt: skip
    if algo == "rm":
        export_scalar_head(trainer.models["reward_model"], out / "model", parallel)
    else:
        export_policy(trainer.models["policy"], out / "model", parallel)
    if parallel.is_main:
        tokenizer.save(out / "model")
    return history
