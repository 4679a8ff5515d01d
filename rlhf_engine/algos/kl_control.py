"""The KL coefficient β: fixed, or adaptive (Ziegler et al. 2019, "Fine-Tuning Language
Models from Human Preferences").

Adaptive rule, after each step with observed KL ``kl`` over ``n`` samples::

    e = clip(kl / target - 1, -0.2, 0.2);   β <- β · (1 + e · n / horizon)
"""

from __future__ import annotations


class KLController:
    """Holds β. ``target=None`` keeps it fixed; otherwise it follows the adaptive rule."""

    def __init__(self, init: float, target: float | None = None, horizon: int = 10000):
        if init < 0:
            raise ValueError(f"KLController: init must be >= 0, got {init}")
        if target is not None and target <= 0:
            raise ValueError(f"KLController: target must be > 0 or None, got {target}")
        if horizon <= 0:
            raise ValueError(f"KLController: horizon must be > 0, got {horizon}")
        self.value, self.target, self.horizon = float(init), target, horizon

    def update(self, kl: float, n_samples: int) -> float:
        """Apply the adaptive rule (no-op when fixed); returns the new β."""
        if self.target is not None:
            error = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + error * n_samples / self.horizon
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])
