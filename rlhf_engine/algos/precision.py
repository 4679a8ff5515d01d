"""Training precision per role: fp32, or bf16 weights with fp32 master weights and optimizer state.

A role's dtype is named ``"fp32"`` or ``"bf16"`` (:func:`parse_dtype`). A frozen role (reference,
reward model) in bf16 is just its model cast to bf16, with no optimizer. A trained role gets its
optimizer from :func:`make_optimizer`:

* ``"fp32"``: ``torch.optim.AdamW`` over the fp32 parameters (what ``common.make_optimizer`` builds).

Both run torch's fused AdamW kernel (CPU and CUDA): fastest on a GPU, and it allocates no
temporaries, where the default multi-tensor path on CUDA would hold a copy of a moment
for the whole model during the step (a spike the memory plan would have to carry).
* ``"bf16"``: :class:`MasterWeightAdamW`. The model's parameters, so its forward, backward and
  gradients, are bf16; the optimizer steps an fp32 master copy of each parameter with fp32
  ``exp_avg`` / ``exp_avg_sq`` and rounds the masters back into the bf16 parameters. Without the
  masters most updates would round to nothing: bf16 keeps 8 significant bits, so a weight does not
  move under an update below ``2**-9`` to ``2**-8`` of itself, and AdamW moves each weight by about
  ``lr`` per step (at lr 1e-6, every weight larger than about 5e-4 would stay put).

Memory per trained parameter, in bytes (:func:`trained_param_bytes`, checked against the
optimizer's tensors by the tests)::

    dtype  weight  grad  master  exp_avg  exp_avg_sq  total
    fp32   4       4     0       4        4           16
    bf16   2       2     4       4        4           16

``grad`` is the gradient as backward leaves it. In a bf16 optimizer step the gradients move to the
masters as fp32 (``step_grad``: 4 B), each bf16 gradient freed as its copy is made, so from
:meth:`MasterWeightAdamW.grads_to_masters` to ``zero_grad`` a bf16 role holds
``2 + 4 + 4 + 4 + 4 = 18`` B per trained parameter (the activations are freed by then).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch.optim.adamw import adamw

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ADAMW_BETAS = (0.9, 0.95)  # every trainer's AdamW betas (those of common.make_optimizer)


def parse_dtype(name: str, field: str = "dtype") -> torch.dtype:
    """The torch dtype of a role's dtype name: ``"fp32"`` -> float32, ``"bf16"`` -> bfloat16.

    Raises:
        ValueError naming ``field`` (the config field the name came from) for any other value.
    """
    if not isinstance(name, str) or name not in DTYPES:
        raise ValueError(f"{field} must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def trained_param_bytes(dtype: str) -> dict[str, int]:
    """Bytes per trained parameter of a role trained in ``dtype`` (see the module docstring):
    ``weight``, ``grad`` (as backward leaves it), ``master``, ``exp_avg``, ``exp_avg_sq``, and
    ``step_grad``, the gradient's bytes while the optimizer steps (it replaces ``grad`` then)."""
    weight = parse_dtype(dtype).itemsize
    master = 4 if weight < 4 else 0
    return {"weight": weight, "grad": weight, "master": master, "exp_avg": 4, "exp_avg_sq": 4, "step_grad": 4}


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float = 0.0, *, dtype: str = "fp32") -> torch.optim.Optimizer:
    """The optimizer over ``model``'s trainable parameters for a role trained in ``dtype``:
    ``torch.optim.AdamW`` for ``"fp32"``, :class:`MasterWeightAdamW` for ``"bf16"``; betas
    :data:`ADAMW_BETAS`, eps 1e-8.

    Raises:
        ValueError for an unknown ``dtype``, a model without trainable parameters, or trainable
        parameters not already in ``dtype`` (cast the model first: ``model.to(parse_dtype(dtype))``).
    """
    torch_dtype = parse_dtype(dtype)
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError(f"make_optimizer: {type(model).__name__} has no trainable parameters (a frozen role has no optimizer)")
    for name, p in named:
        if p.dtype != torch_dtype:
            raise ValueError(
                f"make_optimizer: dtype={dtype!r} needs the trainable parameters in {torch_dtype}, got {p.dtype} for {name!r}"
            )
    params = [p for _, p in named]
    if dtype == "fp32":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=ADAMW_BETAS, fused=True)
    return MasterWeightAdamW(params, lr=lr, weight_decay=weight_decay)


class MasterWeightAdamW(torch.optim.Optimizer):
    """AdamW (Loshchilov & Hutter, 2019) on fp32 master copies of bf16 parameters.

    The optimizer's own parameters (``param_groups``, keys of ``state``) are the fp32 masters
    ``master_params``; ``model_params`` are the bf16 parameters the model computes with, in the
    same order. One step:

    1. :meth:`grads_to_masters`: ``master.grad = param.grad.float()`` (added when it is set), then
       ``param.grad = None``;
    2. the caller clips: ``clip_grad_norm_`` over ``param_groups`` now sees the fp32 gradients;
    3. :meth:`step`: ``torch.optim.adamw.adamw`` (what ``torch.optim.AdamW`` runs, so the masters
       follow AdamW on the fp32-upcast gradients exactly) on the masters that have a gradient,
       then ``param.copy_(master)``: each bf16 weight is its master rounded to nearest even.
       ``step`` runs 1 itself when the caller did not (then nothing was clipped).
    4. ``zero_grad``: clears the masters' and the model parameters' gradients.

    ``state_dict()`` is the base optimizer's plus ``"master_params"`` (the fp32 masters in
    parameter order): :meth:`load_state_dict` restores the masters themselves rather than
    re-deriving them from the rounded weights, so a resumed run continues bitwise.

    Args:
        params: the bf16 leaf tensors to train (one group; each at most once).
        lr, betas, eps, weight_decay: AdamW's (decoupled weight decay ``lr * weight_decay * master``).
    """

    def __init__(
        self, params: Iterable[torch.Tensor], lr: float, weight_decay: float = 0.0, betas: tuple[float, float] = ADAMW_BETAS,
        eps: float = 1e-8,
    ):  # fmt: skip
        op = "MasterWeightAdamW"
        if isinstance(params, torch.Tensor) or not isinstance(params, Iterable):
            raise TypeError(f"{op}: params must be an iterable of tensors, got {type(params).__name__}")
        params = list(params)
        if not params:
            raise ValueError(f"{op}: params is empty")
        for i, p in enumerate(params):
            expected = f"{op}: params[{i}] must be a bfloat16 leaf tensor that requires grad"
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"{expected}, got {type(p).__name__}")
            if not p.is_leaf or not p.requires_grad or p.dtype != torch.bfloat16:
                raise TypeError(f"{expected}, got a {p.dtype} tensor (leaf={p.is_leaf}, requires_grad={p.requires_grad})")
        if len({id(p) for p in params}) != len(params):
            raise ValueError(f"{op}: params holds a tensor more than once")
        betas_ok = isinstance(betas, tuple) and len(betas) == 2 and all(0 <= b < 1 for b in betas)
        for name, value, ok, expected in [
            ("lr", lr, isinstance(lr, float | int) and lr >= 0, "a number >= 0"),
            ("weight_decay", weight_decay, isinstance(weight_decay, float | int) and weight_decay >= 0, "a number >= 0"),
            ("betas", betas, betas_ok, "a tuple of two numbers in [0, 1)"),
            ("eps", eps, isinstance(eps, float | int) and eps >= 0, "a number >= 0"),
        ]:  # fmt: skip
            if not ok:
                raise ValueError(f"{op}: {name} must be {expected}, got {value!r}")
        self.model_params = params
        self.master_params = [p.detach().float() for p in params]
        super().__init__(self.master_params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def grads_to_masters(self) -> None:
        """Move each model parameter's bf16 gradient into its master's ``.grad`` as fp32 (added to
        a gradient already there), freeing the bf16 one. Call between backward and clipping."""
        for p, master in zip(self.model_params, self.master_params):
            if p.grad is None:
                continue
            grad = p.grad.float()
            p.grad = None
            master.grad = grad if master.grad is None else master.grad.add_(grad)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """:meth:`grads_to_masters` (if the caller has not), AdamW on the masters with a gradient,
        each stepped master rounded into its bf16 parameter. Returns ``closure()``'s loss, if any."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.grads_to_masters()
        group = self.param_groups[0]
        stepped = [(p, m) for p, m in zip(self.model_params, self.master_params) if m.grad is not None]
        for _, m in stepped:
            state = self.state[m]
            if not state:  # as torch.optim.AdamW (capturable off): a CPU step count, zero moments
                state["step"] = torch.tensor(0.0, dtype=torch.float32, device=m.device)  # fused: on the masters' device
                state["exp_avg"] = torch.zeros_like(m, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(m, memory_format=torch.preserve_format)
        states = [self.state[m] for _, m in stepped]
        beta1, beta2 = group["betas"]
        adamw(
            [m for _, m in stepped], [m.grad for _, m in stepped], [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states], [], [s["step"] for s in states], amsgrad=False, beta1=beta1, beta2=beta2,
            lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"], maximize=False, fused=True,
        )  # fmt: skip
        for p, m in stepped:
            p.copy_(m)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the masters' gradients and the model parameters' (to None, or zeros in place)."""
        super().zero_grad(set_to_none=set_to_none)
        for p in self.model_params:
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.zero_()

    def state_dict(self) -> dict:
        """The base optimizer's state dict plus ``"master_params"``: the fp32 masters, in order."""
        state = super().state_dict()
        state["master_params"] = list(self.master_params)
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a :meth:`state_dict`: AdamW's state, the masters, and the bf16 parameters
        rounded from them (which are then what the checkpoint's weights hold).

        Raises:
            ValueError when ``state_dict`` has no fp32 masters matching the parameters (e.g. an
            fp32 run's AdamW state: a bf16 run cannot resume from it bitwise).
        """
        op = "MasterWeightAdamW.load_state_dict"
        masters = state_dict.get("master_params") if isinstance(state_dict, dict) else None
        if masters is None:
            raise ValueError(f"{op}: state_dict has no 'master_params' (it was not saved by a MasterWeightAdamW)")
        if len(masters) != len(self.master_params) or any(
            not isinstance(saved, torch.Tensor) or saved.dtype != torch.float32 or saved.shape != m.shape
            for saved, m in zip(masters, self.master_params)
        ):
            expected = [tuple(m.shape) for m in self.master_params[:3]]
            raise ValueError(f"{op}: 'master_params' must be {len(self.master_params)} fp32 tensors of shapes {expected}...")
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "master_params"})
        with torch.no_grad():
            for p, m, saved in zip(self.model_params, self.master_params, masters):
                m.copy_(saved)
                p.copy_(m)


__all__ = ["ADAMW_BETAS", "DTYPES", "MasterWeightAdamW", "make_optimizer", "parse_dtype", "trained_param_bytes"]
