"""Reward-model training on human preferences (InstructGPT's second stage).

Records are pairs ``{"prompt", "chosen", "rejected"}`` (optionally ``"margin"``: Llama 2's
margin loss) or rankings ``{"prompt", "responses"}`` listing K responses best first. The
reward is the scalar head read at the last non-pad token. Losses
(``algos/preference_losses.py``): Bradley-Terry on pairs; on rankings either InstructGPT's
K-choose-2 (every pair of a prompt, weighted ``1/C(K,2)``) or Plackett-Luce.
Evaluation: held-out pairwise accuracy and expected calibration error, before and after
fitting a temperature.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhf_engine.algos.common import SingleModelTrainer, collate, model_device, optimizer_step, pair_batch, step_generator
from rlhf_engine.algos.config import OptimConfig, check_field
from rlhf_engine.algos.eval_metrics import expected_calibration_error, fit_temperature, pairwise_accuracy
from rlhf_engine.algos.preference_losses import bradley_terry_loss, k_choose_2_pairs, plackett_luce_loss
from rlhf_engine.distributed.group import SINGLE, DataParallel
from rlhf_engine.models import ScalarHeadModel

RANKING_LOSSES = ("k_choose_2", "plackett_luce")


@dataclass
class RewardModelConfig(OptimConfig):
    steps: int = 300
    ranking_loss: str = "k_choose_2"
    center_coef: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        check_field(self, "ranking_loss", self.ranking_loss in RANKING_LOSSES, f"one of {RANKING_LOSSES}")
        check_field(self, "center_coef", self.center_coef >= 0, ">= 0")


def sequence_rewards(model: ScalarHeadModel, prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> torch.Tensor:
    """fp32 ``[B]``: the reward of each (prompt, response) pair."""
    batch = collate(prompts, responses, pad_id, model_device(model))
    return model.rewards(batch.input_ids, batch.attention_mask)


def pair_rewards(model: ScalarHeadModel, records: list[dict], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``[B]`` rewards of the chosen and of the rejected responses of pair records."""
    batch = pair_batch(records, pad_id, model_device(model))
    chosen, rejected = model.rewards(batch.input_ids, batch.attention_mask).split(len(records))
    return chosen, rejected


def _is_ranking(record: dict) -> bool:
    return "responses" in record


class RewardModelTrainer(SingleModelTrainer):
    """Trains a ``ScalarHeadModel`` on pair or ranking records (all of one kind); under ``parallel``
    each rank trains on its contiguous share of every step's global batch."""

    role = "reward_model"

    def __init__(self, model: ScalarHeadModel, records: list[dict], config: RewardModelConfig, *, pad_id: int,
                 parallel: DataParallel = SINGLE):  # fmt: skip
        if not records:
            raise ValueError("RewardModelTrainer: records is empty")
        kinds = {_is_ranking(r) for r in records}
        if len(kinds) != 1:
            raise ValueError("RewardModelTrainer: records mix pairs (chosen/rejected) and rankings (responses)")
        self.rankings = kinds.pop()
        super().__init__(model, config.lr, config.weight_decay, parallel)
        self.model, self.records, self.config, self.pad_id = self.trained_model, records, config, pad_id

    def _pair_loss(self, batch: list[dict]) -> tuple[torch.Tensor, dict]:
        chosen, rejected = pair_rewards(self.model, batch, self.pad_id)
        margin = None
        if any("margin" in r for r in batch):
            margin = torch.tensor([float(r.get("margin", 0.0)) for r in batch], device=chosen.device)
        return bradley_terry_loss(chosen, rejected, margin=margin, center_coef=self.config.center_coef)

    def _ranking_loss(self, batch: list[dict]) -> tuple[torch.Tensor, dict]:
        prompts, responses, rankings = [], [], []
        width = max(len(r["responses"]) for r in batch)
        for record in batch:
            first = len(responses)
            for response in record["responses"]:
                prompts.append(record["prompt"])
                responses.append(response)
            count = len(record["responses"])
            rankings.append(list(range(first, first + count)) + [-1] * (width - count))
        rewards = sequence_rewards(self.model, prompts, responses, self.pad_id)
        rankings = torch.tensor(rankings, device=rewards.device)
        if self.config.ranking_loss == "plackett_luce":
            valid = rankings >= 0
            loss = plackett_luce_loss(rewards[rankings.clamp(min=0)], mask=valid)
            return loss, {}
        pairs = k_choose_2_pairs(rankings)
        return bradley_terry_loss(
            rewards[pairs.chosen_index], rewards[pairs.rejected_index], weights=pairs.weight,
            center_coef=self.config.center_coef,
        )  # fmt: skip

    def step(self, step: int) -> dict[str, float]:
        generator = step_generator(self.config.seed, step, "reward_model")
        index = torch.randint(len(self.records), (self.config.batch_size,), generator=generator).tolist()
        batch = [self.records[i] for i in index[self.parallel.rows(self.config.batch_size)]]
        self.model.train()
        loss, metrics = (self._ranking_loss if self.rankings else self._pair_loss)(batch)
        # Every loss here is a mean over records (pairs, or prompts of a ranking) and each rank has
        # an equal share: the global loss and metrics are the ranks' means averaged, and FSDP sums
        # the gradients of the losses scaled by 1 / world size.
        world = self.parallel.world_size
        out = self.parallel.sum_floats({"loss": float(loss.detach()) / world, **{k: float(v) / world for k, v in metrics.items()}})
        out["grad_norm"] = float(optimizer_step(self.optimizer, loss / world if world > 1 else loss, self.config.grad_clip))
        return out


def evaluate_reward_model(model: ScalarHeadModel, pairs: list[dict], *, pad_id: int, batch_size: int = 256) -> dict[str, float]:
    """Held-out ``accuracy`` (:func:`pairwise_accuracy`), ``margin`` (the mean of ``r_c − r_r``),
    ``ece`` (of ``σ(r_c − r_r)``), and ``ece_scaled`` with the fitted ``temperature``; the
    rewards of ``batch_size`` pairs at a time, without gradients."""
    model.eval()
    chosen, rejected = [], []
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            part_chosen, part_rejected = pair_rewards(model, pairs[start : start + batch_size], pad_id)
            chosen.append(part_chosen)
            rejected.append(part_rejected)
    chosen, rejected = torch.cat(chosen), torch.cat(rejected)
    temperature = fit_temperature(chosen, rejected)
    return {
        "accuracy": pairwise_accuracy(chosen, rejected),
        "margin": float((chosen.double() - rejected.double()).mean()),
        "ece": expected_calibration_error(chosen, rejected),
        "temperature": float(temperature),
        "ece_scaled": expected_calibration_error(chosen, rejected, temperature=float(temperature)),
    }
