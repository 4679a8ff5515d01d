"""Training algorithms (PPO, GRPO, RLOO, REINFORCE++, DPO, reward-model and SFT steps) and
their losses and evaluation metrics; each a small module that composes ops."""
