"""One on-policy RL trainer for PPO, GRPO (and its variants), RLOO and REINFORCE++.

Each step is four explicit phases, so a memory planner can move models between devices
at the boundaries and every model is reachable by role (``roles``):

1. ``generate``: sample ``group_size`` responses for each of ``prompts_per_step`` prompts
   (KV-cached sampling; fp32 sampling logprobs kept for the rollout/training gap metric).
2. ``score``: recompute the policy's logprobs (the ``old`` logprobs of the ratio), the
   reference logprobs, the critic's values, and the scores (reward model or function).
   An on-policy update (one epoch, one minibatch of the whole rollout) skips the policy's
   pass: its old logprobs are its own detached ones (``RLConfig.old_logprob_pass``).
3. ``update_policy``: advantages, then ``epochs`` passes of minibatches of the clipped
   policy loss computed from hidden states by ``ops.fused_linear_policy_loss``.
4. ``update_critic`` (PPO only): clipped value loss on the GAE returns.

The algorithms differ only in the advantage estimator and where the KL goes
(``rlhf_engine/reference/kl.py``, ``advantages.py``):

* ``advantage="gae"`` (PPO, InstructGPT): token rewards ``r_t = −β·(lp_t − ref_t) +
  [t = last]·score``, GAE with the critic's values, advantages whitened.
* ``"reinforce_pp"`` (REINFORCE++): the same token rewards, discounted returns, whitened.
* ``"grpo"``, ``"dr_grpo"``, ``"rloo"``, ``"reinforce_pp_baseline"``, ``"opo"``: the
  per-sequence score relative to its group (``ops.group_advantages``), broadcast over
  the tokens.

``kl_in_reward=True`` puts ``−β·KL`` into the reward (per token for ``gae`` /
``reinforce_pp``, summed per sequence for group estimators); otherwise ``β·KL`` (estimator
``kl_estimator``) is added to the loss, as GRPO does. β is fixed or adaptive
(``kl_target``).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from rlhf_engine import ops
from rlhf_engine.algos.common import (
    clip_and_step, freeze, masked_mean, minibatch_indices, sample_responses, step_generator,
)  # fmt: skip
from rlhf_engine.algos.config import check_field
from rlhf_engine.algos.eval_metrics import explained_variance
from rlhf_engine.algos.kl_control import KLController
from rlhf_engine.algos.loss_semantics import preset_loss_options
from rlhf_engine.algos.placement import PhasePlacement, prepare_trained
from rlhf_engine.algos.precision import DTYPES, make_optimizer, parse_dtype
from rlhf_engine.algos.samples import pick_samples
from rlhf_engine.distributed.group import SINGLE, DataParallel
from rlhf_engine.models import PolicyModel, ScalarHeadModel
from rlhf_engine.models.lora import AdapterDisabledPolicy
from rlhf_engine.reference.kl import ESTIMATORS as KL_ESTIMATORS
from rlhf_engine.rollout import Rollout, SamplingConfig, score_rollout

GROUP_ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline", "opo")
TOKEN_ESTIMATORS = ("gae", "reinforce_pp")
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm", "token-sum")
LOSSES = ("ppo", "gspo", "cispo", "cispo-trl", "sapo", "reinforce")
FROZEN_SHARDINGS = ("replicate", "shard")

# (prompts, responses) as token-id lists without padding -> fp32 [B] scores
ScoreFn = Callable[[list[list[int]], list[list[int]]], torch.Tensor]
PromptFn = Callable[[int, torch.Generator], list[list[int]]]


@dataclass
class RLConfig:
    """Hyperparameters of one RL run; the algorithm presets (``ppo_config`` etc.) set the rest."""

    steps: int = 40
    prompts_per_step: int = 16
    group_size: int = 4
    max_new_tokens: int = 12
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    lr: float = 5e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    epochs: int = 1
    minibatch_size: int = 64
    micro_batch_size: Optional[int] = None  # rows per forward/backward in the updates (None: the whole minibatch)
    score_micro_batch_size: Optional[int] = None  # rows per no-grad pass in score (None: the whole rollout)
    generate_micro_batch_size: Optional[int] = None  # rows sampled at once (None: the whole rollout)
    lm_head_chunk_size: Optional[int] = None  # tokens per chunk of the fused lm_head in the update (None: the op's rule)
    advantage: str = "grpo"
    preset: str = "trl"
    scale: str = "group"
    gamma: float = 1.0
    lam: float = 0.95
    loss: str = "ppo"
    clip_low: float = 0.2
    clip_high: Optional[float] = None
    dual_clip: Optional[float] = None
    aggregation: str = "token-mean"
    kl_coef: float = 0.05
    kl_estimator: str = "k3"
    kl_in_reward: bool = False
    kl_target: Optional[float] = None
    kl_horizon: int = 10000
    entropy_coef: float = 0.0
    sapo_tau_pos: float = 1.0  # SAPO's gate temperature where A > 0 (loss "sapo")
    sapo_tau_neg: float = 1.05  # and where A <= 0
    # KL term times the importance ratio (TRL's use_bias_correction_kl); None: the preset's
    # (algos/loss_semantics.py: True for "trl", False for "verl")
    kl_ratio_weight: Optional[bool] = None
    critic_lr: float = 1e-3
    value_clip: Optional[float] = 0.2
    seed: int = 0
    # Precision, LoRA and checkpointing (what the memory planner chooses from).
    dtype: str = "fp32"  # trained roles: "fp32", or "bf16" weights with fp32 masters and AdamW state
    frozen_dtype: Optional[str] = None  # reference and reward model; None: `dtype`
    # Under torchrun: the frozen roles (reference, reward model) as full replicas on every rank
    # ("replicate": no collective in their passes) or sharded by FSDP2 like the trained ones
    # ("shard": 1/N of their weights per rank, each pass all-gathers layer by layer);
    # `rlhf-engine plan --gpus N` says which fits. No effect in one process.
    frozen_sharding: str = "replicate"
    lora_rank: int = 0  # LoRA on the policy (0: full fine-tuning); the reference is then the adapter-disabled policy
    critic_lora_rank: int = 0
    lora_alpha: float = 16.0
    policy_gradient_checkpointing: bool = False
    critic_gradient_checkpointing: bool = False
    # Whether score runs the policy's no-grad pass for the old logprobs; None: only when the
    # update needs it (see `old_logprob_pass`). True forces it (e.g. to compare the two paths).
    recompute_old_logprobs: Optional[bool] = None

    def __post_init__(self):
        for name in ("steps", "prompts_per_step", "group_size", "max_new_tokens", "epochs", "minibatch_size", "kl_horizon"):
            check_field(self, name, getattr(self, name) >= (0 if name == "steps" else 1), ">= 1" if name != "steps" else ">= 0")
        check_field(self, "temperature", self.temperature > 0, "> 0")
        check_field(self, "top_k", self.top_k >= 0, ">= 0 (0: off)")
        check_field(self, "top_p", 0 < self.top_p <= 1, "in (0, 1]")
        for name in ("lr", "critic_lr", "sapo_tau_pos", "sapo_tau_neg"):
            check_field(self, name, getattr(self, name) > 0, "> 0")
        check_field(self, "kl_ratio_weight", self.kl_ratio_weight is None or isinstance(self.kl_ratio_weight, bool),
                    "true, false or null (the preset's)")  # fmt: skip
        for name in ("weight_decay", "grad_clip", "kl_coef", "entropy_coef", "clip_low"):
            check_field(self, name, getattr(self, name) >= 0, ">= 0")
        check_field(self, "advantage", self.advantage in GROUP_ESTIMATORS + TOKEN_ESTIMATORS, f"one of {GROUP_ESTIMATORS + TOKEN_ESTIMATORS}")
        check_field(self, "loss", self.loss in LOSSES, f"one of {LOSSES}")
        check_field(self, "aggregation", self.aggregation in AGGREGATIONS, f"one of {AGGREGATIONS}")
        check_field(self, "preset", self.preset in ("trl", "verl"), "'trl' or 'verl'")
        check_field(self, "scale", self.scale in ("group", "batch", "none"), "'group', 'batch' or 'none'")
        check_field(self, "gamma", 0 <= self.gamma <= 1, "in [0, 1]")
        check_field(self, "lam", 0 <= self.lam <= 1, "in [0, 1]")
        check_field(self, "kl_target", self.kl_target is None or self.kl_target > 0, "> 0 or null")
        check_field(self, "value_clip", self.value_clip is None or self.value_clip > 0, "> 0 or null")
        # The loss op checks these too, but only at the first update, after a whole rollout.
        check_field(self, "clip_high", self.clip_high is None or self.clip_high >= 0, ">= 0 or null")
        if self.loss == "cispo-trl":
            check_field(self, "clip_high", self.clip_high is not None, "set for loss 'cispo-trl' (the raw bound on the IS weight, e.g. 5)")
        check_field(self, "dual_clip", self.dual_clip is None or self.dual_clip > 1, "> 1 or null")
        check_field(self, "kl_estimator", self.kl_estimator in KL_ESTIMATORS, f"one of {sorted(KL_ESTIMATORS)}")
        for name in ("micro_batch_size", "score_micro_batch_size", "generate_micro_batch_size", "lm_head_chunk_size"):
            check_field(self, name, getattr(self, name) is None or getattr(self, name) >= 1, ">= 1 or null")
        check_field(self, "dtype", self.dtype in DTYPES, f"one of {sorted(DTYPES)}")
        check_field(self, "frozen_dtype", self.frozen_dtype is None or self.frozen_dtype in DTYPES, f"one of {sorted(DTYPES)} or null")
        check_field(self, "frozen_sharding", self.frozen_sharding in FROZEN_SHARDINGS, f"one of {FROZEN_SHARDINGS}")
        for name in ("lora_rank", "critic_lora_rank"):
            check_field(self, name, getattr(self, name) >= 0, ">= 0 (0: full fine-tuning)")
        check_field(self, "lora_alpha", self.lora_alpha > 0, "> 0")
        if self.advantage in GROUP_ESTIMATORS and self.group_size < 2 and self.preset == "trl":
            check_field(self, "group_size", False, ">= 2 for group advantages under preset 'trl' (a singleton group gets advantage 0)")
        check_field(self, "recompute_old_logprobs", self.recompute_old_logprobs is None or isinstance(self.recompute_old_logprobs, bool),
                    "true, false or null (auto)")  # fmt: skip
        if self.recompute_old_logprobs is False:
            check_field(self, "recompute_old_logprobs", self.on_policy_update and not self.reward_kl,
                        "true or null unless the update is on-policy (epochs 1 and minibatch_size >= prompts_per_step * "
                        "group_size) and no KL is in the reward (kl_in_reward false or kl_coef 0)")  # fmt: skip

    @property
    def on_policy_update(self) -> bool:
        """One epoch and one minibatch holding the whole rollout: one optimizer step per rollout,
        taken from the very policy that sampled it, so the ratio's old logprobs are the current
        ones detached (TRL's ``num_iterations=1`` with one optimizer step per generation)."""
        return self.epochs == 1 and self.minibatch_size >= self.prompts_per_step * self.group_size

    @property
    def reward_kl(self) -> bool:
        """Whether the reward can carry a KL penalty (``kl_in_reward`` and a non-zero β; an
        adaptive β that starts at 0 stays 0). It needs the old logprobs at scoring time,
        before the update has run."""
        return self.kl_in_reward and self.kl_coef > 0

    @property
    def old_logprob_pass(self) -> bool:
        """Whether ``score`` runs the policy's no-grad pass for the old logprobs:
        ``recompute_old_logprobs`` when set, else unless the update is on-policy with no KL in
        the reward. TRL's rule (1.16, ``GRPOTrainer._generate_and_score_completions``): the
        old logprobs are computed only when ``gradient_accumulation_steps % (steps_per_generation
        * num_iterations) != 0``, else ``_compute_loss`` takes ``per_token_logps.detach()``; its
        GRPO has the KL in the loss only, and its ``RLOOTrainer``, whose KL is in the reward,
        always computes them before the rewards. Without the pass, ``update_policy`` fills
        ``old_logprobs`` from its own forward (for the KL metric and the controller)."""
        if self.recompute_old_logprobs is not None:
            return self.recompute_old_logprobs
        return not self.on_policy_update or self.reward_kl


class RLTrainer:
    """On-policy RL on a ``PolicyModel`` with a frozen reference (see the module docstring).

    Args:
        policy: trained in place. reference: frozen copy of the starting policy.
        prompts: ``prompts(n, generator)`` -> ``n`` prompts as token-id lists.
        reward_fn / reward_model: exactly one; the sequence score.
        critic: required for ``advantage="gae"`` and only then.
        gold_fn: optional hidden gold score, logged as ``gold`` (never trained on).
        log_samples: after each step, ``samples`` holds this many of its rows (prompt and
            response ids, reward, advantage; ``rlhf_engine.algos.samples.pick_samples``); 0: none.
    """

    def __init__(
        self,
        config: RLConfig,
        *,
        policy: PolicyModel,
        reference: PolicyModel | None,
        prompts: PromptFn,
        pad_token_id: int,
        eos_token_id: int,
        reward_fn: ScoreFn | None = None,
        reward_model: ScalarHeadModel | None = None,
        critic: ScalarHeadModel | None = None,
        gold_fn: ScoreFn | None = None,
        placement=None,
        parallel: DataParallel = SINGLE,
        log_samples: int = 0,
    ):
        if (reward_fn is None) == (reward_model is None):
            raise ValueError("RLTrainer: pass exactly one of reward_fn and reward_model")
        if (critic is not None) != (config.advantage == "gae"):
            raise ValueError(f"RLTrainer: a critic is needed for advantage 'gae' and only for it (advantage={config.advantage!r})")
        if (reference is None) != (config.lora_rank > 0):
            raise ValueError("RLTrainer: pass a reference for full fine-tuning, and None with lora_rank > 0 "
                             f"(the reference is then the adapter-disabled policy); lora_rank={config.lora_rank}")  # fmt: skip
        if isinstance(log_samples, bool) or not isinstance(log_samples, int) or log_samples < 0:
            raise ValueError(f"RLTrainer: log_samples must be an int >= 0, got {log_samples!r}")
        self.config, self.prompts, self.parallel = config, prompts, parallel
        self.log_samples, self.samples = log_samples, []
        # Under torchrun the trained roles are sharded (FSDP2) after their LoRA and checkpointing
        # are set, before their optimizers see the parameters. bf16 there is FSDP's mixed precision:
        # the sharded parameters stay fp32 (they are the master weights, the optimizer a plain fp32
        # AdamW), all-gathered in bf16 for the passes, gradients reduced in fp32. The frozen roles
        # are full replicas on every rank in their dtype (no collective in their passes), or
        # sharded too with frozen_sharding "shard" (their roots resharded after each score pass).
        trained_dtype = "fp32" if parallel.distributed else config.dtype
        compute = parse_dtype(config.dtype) if parallel.distributed and config.dtype != "fp32" else None
        self.policy = parallel.shard(prepare_trained(policy, trained_dtype, config.lora_rank, config.lora_alpha,
                                                     config.policy_gradient_checkpointing, config.seed), compute)  # fmt: skip
        frozen = config.frozen_dtype or config.dtype
        placed = {"dtype": parse_dtype(frozen), **({"device": parallel.device} if parallel.distributed else {})}
        self.frozen_sharded = parallel.distributed and config.frozen_sharding == "shard"

        def frozen_role(model):
            model = freeze(model.to(**placed))
            return freeze(parallel.shard(model)) if self.frozen_sharded else model

        self.reference = AdapterDisabledPolicy(self.policy) if reference is None else frozen_role(reference)
        self.reward_model = frozen_role(reward_model) if reward_model is not None else None
        if critic is not None:
            critic = parallel.shard(prepare_trained(critic, trained_dtype, config.critic_lora_rank, config.lora_alpha,
                                                    config.critic_gradient_checkpointing, config.seed + 1), compute)  # fmt: skip
        self.reward_fn, self.critic, self.gold_fn = reward_fn, critic, gold_fn
        self.pad_token_id = pad_token_id
        self.sampling = SamplingConfig(
            max_new_tokens=config.max_new_tokens, temperature=config.temperature, top_k=config.top_k,
            top_p=config.top_p, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
        )  # fmt: skip
        self.optimizer = make_optimizer(self.policy, config.lr, config.weight_decay, dtype=trained_dtype)
        self.critic_optimizer = make_optimizer(critic, config.critic_lr, dtype=trained_dtype) if critic is not None else None
        self.kl = KLController(config.kl_coef, config.kl_target, config.kl_horizon)
        self.placement = PhasePlacement(self, placement)

    # -- roles, checkpoint state ---------------------------------------------------------
    @property
    def roles(self) -> dict[str, torch.nn.Module]:
        """Every model by role (``policy``, ``reference``, ``critic``, ``reward_model``)."""
        named = {"policy": self.policy, "reference": self.reference, "critic": self.critic, "reward_model": self.reward_model}
        return {role: model for role, model in named.items() if model is not None}

    @property
    def models(self) -> dict[str, torch.nn.Module]:
        """The trained models (what a checkpoint holds)."""
        return {role: m for role, m in self.roles.items() if role in ("policy", "critic")}

    @property
    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        named = {"policy": self.optimizer, "critic": self.critic_optimizer}
        return {role: opt for role, opt in named.items() if opt is not None}

    def state_dict(self) -> dict:
        return {"kl": self.kl.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "kl" in state:
            self.kl.load_state_dict(state["kl"])

    # -- phases --------------------------------------------------------------------------
    def generate(self, step: int) -> Rollout:
        """Phase 1: ``group_size`` samples for each prompt of step ``step``, from the step's
        ``"sample"`` stream: the whole batch at once, or chunks of ``generate_micro_batch_size``
        rows drawing from it in turn (``sample_responses``)."""
        cfg, parallel = self.config, self.parallel
        prompts = self.prompts(cfg.prompts_per_step, step_generator(cfg.seed, step, "prompts"))
        generator = step_generator(cfg.seed, step, "sample")
        if not parallel.distributed:
            return sample_responses(self.policy, prompts, cfg.group_size, self.sampling, generator, cfg.generate_micro_batch_size)
        # this rank's whole groups: its contiguous share of the step's prompts, sampled with the
        # policy's layers gathered once for the whole rollout (not once per decode step)
        width = max(len(p) for p in prompts)
        with parallel.unsharded(self.policy):
            return sample_responses(self.policy, prompts[parallel.rows(cfg.prompts_per_step)], cfg.group_size, self.sampling,
                                    generator, parallel=parallel, prompt_width=width)  # fmt: skip

    def score(self, rollout: Rollout) -> tuple[Rollout, dict[str, float]]:
        """Phase 2: old (unless ``config.old_logprob_pass`` is False) and reference logprobs,
        values, scores (and gold when known)."""
        swap = self.placement.swaps_reference
        for model in self.roles.values():
            model.eval()
        # Without the policy's pass (an on-policy update) update_policy fills old_logprobs.
        policy = self.policy if self.config.old_logprob_pass else None
        with torch.no_grad():
            rollout, metrics = score_rollout(
                rollout, temperature=self.config.temperature, policy=policy, reference=None if swap else self.reference,
                critic=self.critic, reward_model=self.reward_model, reward_fn=self.reward_fn,
                micro_batch_size=self.config.score_micro_batch_size,
            )  # fmt: skip
            if swap:  # the reference's weights copied into the policy's own storage for this pass
                with self.placement.reference_weights():
                    reference_only, _ = score_rollout(rollout, temperature=self.config.temperature, reference=self.policy,
                                                      micro_batch_size=self.config.score_micro_batch_size)  # fmt: skip
                rollout = dataclasses.replace(rollout, ref_logprobs=reference_only.ref_logprobs)
        if self.frozen_sharded:
            # FSDP keeps a root unsharded after its forward (a trained one's backward follows);
            # a frozen role has no backward, so its root would stay gathered: reshard it here.
            for model in (self.reference, self.reward_model):
                if model is not None and hasattr(model, "reshard"):
                    model.reshard()
        metrics = dict(metrics)
        if self.gold_fn is not None:
            metrics["gold"] = float(self.gold_fn(*rollout.token_lists()).mean())
        if self.parallel.distributed:
            rollout, metrics = self._gather(rollout, metrics)
        return rollout, metrics

    def _gather(self, rollout: Rollout, metrics: dict[str, float]) -> tuple[Rollout, dict[str, float]]:
        """Data-parallel: every rank's scored rows gathered into the global rollout (the same on every
        rank, in rank order: the single process's rows), and the scoring metrics made global.

        The rollout is small next to the models (tokens and per-token fp32 scalars), and with all of
        it every rank computes the advantages of the global batch (batch whitening included) and
        takes its share of each global minibatch."""
        parallel = self.parallel
        rollout = Rollout(**{f.name: None if getattr(rollout, f.name) is None else parallel.gather_rows(getattr(rollout, f.name))
                             for f in dataclasses.fields(rollout)})  # fmt: skip
        mask = rollout.response_mask
        if "logprob_gap_max" in metrics:
            metrics["logprob_gap_max"] = float(((rollout.old_logprobs - rollout.logprobs).abs() * mask).max())
            metrics["entropy"] = float((rollout.entropy * mask).sum() / mask.sum().clamp(min=1))
        if "gold" in metrics:  # a mean over equal shares
            metrics["gold"] = parallel.sum_floats({"gold": metrics["gold"]})["gold"] / parallel.world_size
        return rollout, metrics

    def advantages(self, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Advantages (``[B, R]`` per token, or ``[B]`` per sequence) and, for GAE, returns.

        A NaN score marks an unscorable completion (``rlhf_engine.rewards``: no reward function
        scored it). As in TRL 1.16 (``GRPOTrainer``, ``RLOOTrainer``) a group estimator leaves it
        out of its group's baseline and std (and the batch's) and gives it advantage 0; the
        token estimators (``gae``, ``reinforce_pp``) have no group to leave it out of and refuse it."""
        cfg, mask = self.config, rollout.response_mask
        beta = self.kl.value if cfg.kl_in_reward else 0.0
        if beta and rollout.old_logprobs is None:
            raise ValueError("RLTrainer.advantages: the KL in the reward needs rollout.old_logprobs (from score)")
        # k1, the reward-side KL; β = 0 needs no old logprobs (score may have skipped them).
        token_kl = (rollout.old_logprobs - rollout.ref_logprobs) * mask if beta else torch.zeros_like(rollout.logprobs)
        scorable = self._scorable(rollout.scores)
        if cfg.advantage in TOKEN_ESTIMATORS:
            if scorable is not None:
                raise ValueError(f"RLTrainer: advantage {cfg.advantage!r} needs a score for every completion, and no reward "
                                 "function scored some (all returned None); a group estimator (grpo, rloo, "
                                 "reinforce_pp_baseline) leaves those out")  # fmt: skip
            rewards = -beta * token_kl
            last = (rollout.response_lengths - 1).clamp(min=0)
            rewards[torch.arange(rewards.shape[0], device=rewards.device), last] += rollout.scores * (rollout.response_lengths > 0)
            if cfg.advantage == "gae":
                return ops.gae(rewards, rollout.values, mask, gamma=cfg.gamma, lam=cfg.lam)
            returns = ops.discounted_returns(rewards, mask, gamma=cfg.gamma)
            return ops.masked_whiten(returns, mask), None
        scores = rollout.scores - beta * token_kl.sum(dim=1)
        lengths = rollout.response_lengths if cfg.advantage in ("opo", "reinforce_pp_baseline") else None
        options = dict(method=cfg.advantage, scale=cfg.scale if cfg.advantage == "grpo" else "group", preset=cfg.preset)
        if scorable is None:
            return ops.group_advantages(scores, group_size=cfg.group_size, lengths=lengths, **options), None
        # TRL's unscorable completions (no reward function scored them): out of their group's
        # statistics (and the batch's), advantage 0
        advantages = torch.zeros_like(scores)
        advantages[scorable] = ops.group_advantages(
            scores[scorable], group_ids=rollout.group_ids[scorable], num_groups=scores.shape[0] // cfg.group_size,
            lengths=None if lengths is None else lengths[scorable], **options,
        )  # fmt: skip
        return advantages, None

    def _scorable(self, scores: torch.Tensor) -> torch.Tensor | None:
        """None when every completion has a score (one host read), else the bool ``[B]`` mask of
        those that do. NaN means "no score" only from a reward function; from a reward model it
        is an error (a diverged model must not pass as unscorable completions)."""
        scorable = ~scores.isnan()
        if bool(scorable.all()):
            return None
        if self.reward_model is not None:
            raise ValueError(f"RLTrainer: the reward model scored NaN for {int((~scorable).sum())} of {scores.numel()} completions")
        return scorable

    def update_policy(self, rollout: Rollout, advantages: torch.Tensor, step: int) -> dict[str, float]:
        """Phase 3: ``epochs`` x minibatches of the fused clipped policy loss, each minibatch one
        optimizer step on the gradients accumulated over its micro-batches.

        On-policy (``rollout.old_logprobs`` None: score skipped the policy's pass, see
        ``RLConfig.old_logprob_pass``): the old logprobs are the update's own, detached
        (``old_logp=None``: ratio ``exp(lp - sg(lp)) = 1`` with the gradient of ``lp``), valid for
        one epoch with one minibatch only (its micro-batches all see the policy before the step).
        Those detached logprobs then fill ``rollout.old_logprobs`` in place (fp32 ``[B, R]``, 0
        where masked), as score would have, and ``logprob_gap_max`` (max ``|lp - logprobs|``
        against the sampling logprobs) is logged from them."""
        cfg, start = self.config, rollout.response_start
        rows = rollout.response_ids.shape[0]
        on_policy = rollout.old_logprobs is None
        if on_policy and not (cfg.epochs == 1 and cfg.minibatch_size >= rows):
            raise ValueError(
                f"RLTrainer.update_policy: rollout.old_logprobs is None (on-policy), which holds for one epoch with one "
                f"minibatch only; got epochs={cfg.epochs}, minibatch_size={cfg.minibatch_size} for {rows} rows "
                "(score the rollout with recompute_old_logprobs true or null)"
            )  # fmt: skip
        kl_in_loss = not cfg.kl_in_reward and self.kl.value > 0
        semantics = preset_loss_options(cfg.preset, cfg.loss, cfg.kl_ratio_weight)
        self.policy.train()
        sums: dict[str, torch.Tensor] = {}  # summed on the device: one host sync per phase, not per minibatch
        count = 0
        if on_policy:
            own_logprobs = torch.zeros_like(rollout.logprobs)
            gap = rollout.logprobs.new_zeros(())
        generator = step_generator(cfg.seed, step, "minibatches")
        for _ in range(cfg.epochs):
            for index in minibatch_indices(rows, cfg.minibatch_size, generator, rollout.response_ids.device):
                normalizer = self._loss_normalizer(rollout.response_mask[index])
                tokens = rollout.response_mask[index].sum().clamp(min=1)
                minibatch: dict[str, torch.Tensor] = {}
                # data-parallel: this rank's contiguous share of the global minibatch (all of it in one process)
                micro_batches = self._micro_batches(index[self.parallel.rows(index.numel())])
                for micro in micro_batches:
                    mb = rollout.select(micro)
                    entropy_coef = cfg.entropy_coef
                    split = len(micro_batches) > 1 or self.parallel.distributed
                    if split and entropy_coef and semantics["entropy_aggregation"] == "token-mean":
                        # the op's token mean is the micro-batch's: weighted by its share of the
                        # minibatch's tokens the bonuses add up to the minibatch's mean (one host read)
                        entropy_coef *= float(mb.response_mask.sum() / tokens)
                    hidden = self.policy.response_hidden(mb.input_ids, mb.attention_mask, start)
                    loss, metrics, logp, entropy = ops.fused_linear_policy_loss(
                        hidden, self.policy.lm_head_weight, mb.response_ids, mb.old_logprobs, advantages[micro],
                        mb.response_mask, bias=self.policy.lm_head_bias, temperature=cfg.temperature,
                        return_logprobs=True, loss=cfg.loss, clip_low=cfg.clip_low, clip_high=cfg.clip_high,
                        dual_clip=cfg.dual_clip, ref_logp=mb.ref_logprobs if kl_in_loss else None,
                        kl_coef=self.kl.value if kl_in_loss else 0.0, kl_estimator=cfg.kl_estimator,
                        entropy_coef=entropy_coef, aggregation=cfg.aggregation, normalizer=normalizer,
                        chunk_size=cfg.lm_head_chunk_size, sapo_tau_pos=cfg.sapo_tau_pos,
                        sapo_tau_neg=cfg.sapo_tau_neg, **semantics,
                    )  # fmt: skip
                    loss.backward()
                    if on_policy:
                        own_logprobs[micro] = torch.where(mb.response_mask, logp, 0.0)
                        gap = torch.maximum(gap, ((logp - mb.logprobs).abs() * mb.response_mask).max())
                    # Under the minibatch's normalizer the micro-batch losses add up to the minibatch
                    # loss. The metrics are means over the micro-batch's tokens: weighted by its share
                    # of the minibatch's tokens they add up to the minibatch means (the share of a
                    # single micro-batch is exactly 1).
                    share = mb.response_mask.sum() / tokens
                    values = {"policy_loss": loss.detach(), "entropy": masked_mean(entropy, mb.response_mask) * share}
                    values.update({k: metrics[k] * share for k in ("clipfrac", "approx_kl", "ratio_mean")})
                    _accumulate(minibatch, values)
                grad_norm = clip_and_step(self.optimizer, cfg.grad_clip)
                _accumulate(sums, {"policy_loss": minibatch.pop("policy_loss"), "grad_norm": grad_norm, **minibatch})
                count += 1
        if self.parallel.distributed:
            # the ranks' parts of the global minibatches add up (losses under the global normalizer,
            # metrics weighted by the global token share); the clipped norm is already global
            summed = [k for k in sums if k != "grad_norm"]
            sums.update(zip(summed, self.parallel.sum(torch.stack([sums[k].float() for k in summed]))))
            if on_policy:  # each row was computed by one rank, zeros elsewhere
                own_logprobs, gap = self.parallel.sum(own_logprobs), self.parallel.max(gap)
        out = {k: float(v) / count for k, v in sums.items()}
        if on_policy:
            rollout.old_logprobs = own_logprobs
            out["logprob_gap_max"] = float(gap)
        return out

    def _loss_normalizer(self, mask: torch.Tensor):
        """The denominator of ``config.aggregation`` over a whole minibatch (``mask`` ``[b, R]``),
        which each of its micro-batches divides by (``reference/aggregation.py``): the valid
        tokens (``token-mean``), the sequences (``seq-mean-token-mean`` / ``-sum``: all ``b``
        under preset ``trl``, those with a valid token under ``verl``), as 0-d tensors on the
        device (no host sync); Dr. GRPO's constant ``b * max_new_tokens``
        (``seq-mean-token-sum-norm``: the generation budget, not the batch's longest
        response); None for ``token-sum`` (micro-batch sums add up as they are)."""
        aggregation = self.config.aggregation
        if aggregation == "token-mean":
            return mask.sum()
        if aggregation in ("seq-mean-token-mean", "seq-mean-token-sum"):
            return float(mask.shape[0]) if self.config.preset == "trl" else mask.any(dim=1).sum()
        if aggregation == "seq-mean-token-sum-norm":
            return self.config.max_new_tokens * mask.shape[0]
        return None

    def _micro_batches(self, index: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """A minibatch's rows ``index`` in ``config.micro_batch_size`` pieces (one without it)."""
        return index.split(self.config.micro_batch_size or index.numel())

    def update_critic(self, rollout: Rollout, returns: torch.Tensor, step: int) -> dict[str, float]:
        """Phase 4 (PPO): ``epochs`` x minibatches of the clipped value loss (token-mean over the
        minibatch, micro-batches accumulated as in :meth:`update_policy`)."""
        cfg, start = self.config, rollout.response_start
        self.critic.train()
        losses = []  # 0-d tensors, read once at the end (no host sync per minibatch)
        generator = step_generator(cfg.seed, step, "critic_minibatches")
        for _ in range(cfg.epochs):
            for index in minibatch_indices(returns.shape[0], cfg.minibatch_size, generator, returns.device):
                tokens = rollout.response_mask[index].sum()  # the minibatch's token-mean denominator
                total = None
                for micro in self._micro_batches(index[self.parallel.rows(index.numel())]):
                    mb = rollout.select(micro)
                    values = self.critic.values(mb.input_ids, mb.attention_mask)[:, start - 1 : -1]
                    loss, _ = ops.value_loss(
                        values, mb.values, returns[micro], mb.response_mask, clip=cfg.value_clip, normalizer=tokens
                    )
                    loss.backward()
                    total = loss.detach() if total is None else total + loss.detach()
                clip_and_step(self.critic_optimizer, cfg.grad_clip)
                losses.append(total)
        return {
            "value_loss": float(self.parallel.sum(torch.stack(losses)).mean()),
            "explained_variance": float(explained_variance(rollout.values, returns, rollout.response_mask)),
        }

    def step(self, step: int) -> dict[str, float]:
        """One RL step (all four phases); returns the logged metrics (the headline ones first,
        which the progress bar shows)."""
        start_time = time.perf_counter()
        place = self.placement
        with place.phase("generate"):
            rollout = self.generate(step)
        with place.phase("score"):
            rollout, phase_metrics = self.score(rollout)
        advantages, returns = self.advantages(rollout)
        with place.phase("update_policy"):
            phase_metrics.update(self.update_policy(rollout, advantages, step))
        if self.critic is not None:
            with place.phase("update_critic"):
                phase_metrics.update(self.update_critic(rollout, returns, step))
        phase_metrics.update(place.metrics())
        mask = rollout.response_mask
        sequence_kl = ((rollout.old_logprobs - rollout.ref_logprobs) * mask).sum(dim=1)
        scored = rollout.scores[~rollout.scores.isnan()]  # unscorable completions (NaN) left out, as TRL logs
        metrics = {"reward_mean": float(scored.mean()) if scored.numel() else float("nan")}
        if "gold" in phase_metrics:
            metrics["gold"] = phase_metrics.pop("gold")
        metrics["kl"] = float(sequence_kl.mean())
        metrics["reward_std"] = float(scored.std()) if scored.numel() > 1 else 0.0
        metrics.update(phase_metrics)
        metrics["kl_coef"] = self.kl.value
        self.kl.update(metrics["kl"], mask.shape[0])
        metrics["response_length"] = float(rollout.response_lengths.float().mean())
        metrics["tokens_per_s"] = float(rollout.attention_mask.sum()) / (time.perf_counter() - start_time)
        if self.log_samples:  # after the timing: the samples log is not the step's work
            self.samples = pick_samples(rollout, advantages, self.log_samples)
        return metrics


def _accumulate(sums: dict[str, torch.Tensor], values: dict[str, torch.Tensor]) -> None:
    """``sums[k] += values[k]`` on the device (a key's first value starts its sum)."""
    for k, v in values.items():
        sums[k] = sums[k] + v if k in sums else v
