"""Traced peaks: run the trainer's phases on real-size models without their memory.

Under ``FakeTensorMode`` tensors carry shapes, dtypes and devices but no data, so a 7B
model's forward, backward, optimizer step and generation run on a laptop CPU in seconds;
``torch.distributed._tools.mem_tracker.MemTracker`` counts the bytes every allocation
would take (rounded up to 512 bytes, as the CUDA caching allocator does). This is how
the planner's formulas (:mod:`rlhf_engine.memory.estimate`) are validated without a GPU:
PyTorch's own tests hold MemTracker within 10% of CUDA's ``max_memory_allocated``.

What is traced, per phase, is the trainer's own code path: ``PolicyModel`` /
``ScalarHeadModel`` on ``transformers`` models built from the config, the fused lm_head
loss ``ops.fused_linear_policy_loss`` and ``ops.value_loss``, AdamW (with fp32 master
weights for bf16 roles), with every model and optimizer state resident, as
``--plan off`` keeps them:

* ``generate``: the prompt prefill (``next_token_logits`` on ``[B, P]``), then the last
  decode step with the KV cache at its final length ``P + R - 1`` (the cache only grows,
  so the last step holds the most), sampling included.
* ``score``: each model's no-grad pass over a micro-batch of ``[n, P + R]``.
* ``update_policy`` / ``update_critic``: forward + backward of the first two micro-batches
  of a minibatch (the second with the first's gradients resident), then the optimizer step.

Passes after those repeat allocations already made and freed (see ``_splits``).

Two things a fake trace cannot see are added from their declarations: the workspace
inside the fused lm_head's custom op (its fake kernel allocates only the outputs; see
:func:`rlhf_engine.memory.estimate.lm_head_workspace`), and nothing else.
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass

import torch

from rlhf_engine.memory.estimate import PHASES, RoleSpec, Workload, lm_head_workspace

DEVICE = torch.device("cpu")  # fake tensors on the CPU: no CUDA needed


@dataclass
class TracedPeak:
    """A phase's traced peak: ``tracked`` bytes MemTracker saw at its highest (``by_kind``:
    MemTracker's split of it into parameters, gradients, activations, temporaries,
    optimizer state), ``workspace`` the declared lm_head workspace added on top,
    ``peak = tracked + workspace``."""

    tracked: int
    workspace: int
    by_kind: dict[str, int]

    @property
    def peak(self) -> int:
        return self.tracked + self.workspace


def _build(spec: RoleSpec):
    """The role's model (fake tensors), in its dtype, with LoRA / checkpointing as specified."""
    from transformers import AutoModel, AutoModelForCausalLM

    from rlhf_engine.models import PolicyModel, ScalarHeadModel

    previous = torch.get_default_dtype()
    torch.set_default_dtype(spec.torch_dtype)  # module.to(dtype) does not work under fake mode
    try:
        if spec.head == "lm":
            model = PolicyModel(AutoModelForCausalLM.from_config(spec.config, attn_implementation="sdpa"))
        else:
            model = ScalarHeadModel(AutoModel.from_config(spec.config, attn_implementation="sdpa"))
    finally:
        torch.set_default_dtype(previous)
    if spec.lora_rank:
        from rlhf_engine.models.lora import LoraSettings, apply_lora

        with _moves_in_place():
            apply_lora(model, LoraSettings(rank=spec.lora_rank), seed=0)
    if not spec.trained:
        # Frozen roles run only under no_grad here; their parameters keep requires_grad
        # because MemTracker hooks every tracked parameter's gradient.
        model.eval()
    elif spec.checkpointing:
        model.gradient_checkpointing_enable()
    return model


def _optimizer(model: torch.nn.Module, spec: RoleSpec):
    """The trainer's optimizer for ``spec`` with its state allocated (as after a first step)."""
    from rlhf_engine.algos.precision import make_optimizer

    optimizer = make_optimizer(model, lr=1e-6, dtype=spec.dtype)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return optimizer


def _tokens(batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.zeros(batch, length, dtype=torch.long, device=DEVICE)
    return ids, torch.ones(batch, length, dtype=torch.bool, device=DEVICE)


def _splits(total: int, micro: int, keep: int) -> list[int]:
    """The first ``keep`` micro-batches of ``total`` rows in passes of ``micro``. Later passes
    of the same size allocate exactly what an earlier one did once its memory is back (the
    last is never larger), so a trace runs only the distinct ones: one no-grad pass per
    model, and two update passes (the first creates the gradients, the second runs with
    them resident)."""
    return [min(micro, total - start) for start in range(0, total, micro)][:keep]


def _generate(policy, spec: RoleSpec, work: Workload, fresh) -> None:
    from transformers import DynamicCache

    from rlhf_engine.rollout.sampling import sample_tokens

    shape = spec.shape
    for rows in _splits(work.rollout_batch, work.generate_micro_batch, keep=1):
        ids, mask = _tokens(rows, work.prompt_length)
        fresh()
        logits, cache = policy.next_token_logits(ids, mask, torch.zeros_like(ids), None)
        sample_tokens(logits / 1.0, 0, 1.0, None)
        del logits, cache
        length = work.prompt_length + work.response_length - 1
        cache = DynamicCache(config=spec.config)
        kv = torch.empty(rows, shape.num_kv_heads, length, shape.head_dim, dtype=spec.torch_dtype, device=DEVICE)
        for layer in range(shape.num_layers):
            cache.update(torch.empty_like(kv), torch.empty_like(kv), layer)
        del kv
        step_ids, _ = _tokens(rows, 1)
        full_mask = torch.ones(rows, length + 1, dtype=torch.bool, device=DEVICE)
        fresh()
        logits, cache = policy.next_token_logits(step_ids, full_mask, step_ids, cache)
        z = logits / 1.0
        token = sample_tokens(z, 0, 1.0, None)
        logp = z.gather(1, token[:, None]).squeeze(1) - torch.logsumexp(z, dim=-1)  # as generate keeps it
        del logits, cache, z, logp


def _score(models: dict, specs: dict[str, RoleSpec], work: Workload, fresh, after_pass=lambda role: None) -> None:
    """Each model's no-grad pass in turn; ``after_pass(role)`` runs after each role's (the
    FSDP trace reshards a frozen sharded root there, as the trainer must)."""
    from rlhf_engine import ops

    length = work.prompt_length + work.response_length
    start = work.prompt_length
    for role in ("policy", "reference", "critic", "reward_model"):
        if role not in models or (role == "reference" and specs[role].is_adapter_view):
            continue
        if role == "policy" and not work.score_policy_pass:  # on-policy: the update computes them
            continue
        model = models[role]
        for rows in _splits(work.rollout_batch, work.score_micro_batch, keep=1):
            ids, mask = _tokens(rows, length)
            fresh()
            with torch.no_grad():
                if specs[role].head == "lm":
                    hidden = model.response_hidden(ids, mask, start)
                    labels = ids[:, start:]
                    ops.fused_linear_logprobs(hidden, model.lm_head_weight, labels, bias=model.lm_head_bias,
                                              return_entropy=role == "policy", backend="triton")  # fmt: skip
                elif role == "reward_model":
                    model.rewards(ids, mask)
                else:
                    model.values(ids, mask)
            del ids, mask
        after_pass(role)
    if "reference" in specs and specs["reference"].is_adapter_view:
        from rlhf_engine.models.lora import adapter_disabled

        with adapter_disabled(models["policy"]), torch.no_grad():
            for rows in _splits(work.rollout_batch, work.score_micro_batch, keep=1):
                ids, mask = _tokens(rows, length)
                fresh()
                hidden = models["policy"].response_hidden(ids, mask, start)
                ops.fused_linear_logprobs(hidden, models["policy"].lm_head_weight, ids[:, start:], backend="triton")


def _update(role: str, model, optimizer, spec: RoleSpec, work: Workload, fresh, workspace: int = 0) -> None:
    """Two update micro-batches and the optimizer step. ``workspace``: bytes of the fused
    lm_head's invisible workspace to hold as a placeholder tensor while the op computes (its
    forward on the one-pass path, its backward on GSPO's), so the trace sees it at its moment
    (0: the caller adds it to the peak instead)."""
    from rlhf_engine import ops

    length = work.prompt_length + work.response_length
    start = work.prompt_length
    model.train()
    for rows in _splits(work.update_rows, work.update_micro_batch, keep=2):
        ids, mask = _tokens(rows, length)
        per_token = torch.zeros(rows, work.response_length, device=DEVICE)
        response_mask = mask[:, start:]
        fresh()
        held = []
        if role == "policy":
            hidden = model.response_hidden(ids, mask, start)
            held.append(torch.empty(workspace if work.lm_head_one_pass else 0, dtype=torch.uint8, device=DEVICE))
            loss, _ = ops.fused_linear_policy_loss(
                hidden, model.lm_head_weight, ids[:, start:], per_token, torch.zeros(rows, device=DEVICE), response_mask,
                bias=model.lm_head_bias, normalizer=float(work.minibatch_size * work.response_length), backend="triton",
            )  # fmt: skip
            held.clear()
            if not work.lm_head_one_pass:  # the recompute backward: until the op has made d hidden
                held.append(torch.empty(workspace, dtype=torch.uint8, device=DEVICE))
                hidden.register_hook(lambda grad: held.clear())
        else:
            values = model.values(ids, mask)[:, start - 1 : -1]
            loss, _ = ops.value_loss(values, per_token, per_token, response_mask, clip=0.2,
                                     normalizer=float(work.minibatch_size * work.response_length))  # fmt: skip
        loss.backward()
        del ids, mask, per_token, response_mask, loss
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def trace_phase(phase: str, specs: dict[str, RoleSpec], work: Workload) -> TracedPeak:
    """The traced peak of ``phase`` with every role of ``specs`` resident (weights, and the
    trained roles' optimizer state), under ``FakeTensorMode`` on the CPU."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    if phase not in PHASES:
        raise ValueError(f"trace_phase: phase must be one of {PHASES}, got {phase!r}")
    with FakeTensorMode(), _triton_fakes():
        models = {role: _build(spec) for role, spec in specs.items() if not spec.is_adapter_view}
        optimizers = {role: _optimizer(models[role], spec) for role, spec in specs.items() if spec.trained}
        tracker = _FrozenAwareMemTracker()
        masters = [m for opt in optimizers.values() for m in getattr(opt, "master_params", ())]
        tracker.track_external(*models.values(), *optimizers.values(), *masters)
        # MemTracker refuses a module called twice in one region unless its per-module
        # stats are cleared first; the device-wide peak it keeps is unaffected.
        fresh = tracker.reset_mod_stats
        with tracker:
            if phase == "generate":
                models["policy"].eval()  # as sample_responses runs it: eval mode, no gradients
                with torch.no_grad():
                    _generate(models["policy"], specs["policy"], work, fresh)
            elif phase == "score":
                for model in models.values():
                    model.eval()  # as RLTrainer.score runs them
                _score(models, specs, work, fresh)
            else:
                role = "policy" if phase == "update_policy" else "critic"
                _update(role, models[role], optimizers[role], specs[role], work, fresh)
        snapshot = tracker.get_tracker_snapshot("peak")[DEVICE]
    by_kind = {getattr(kind, "value", kind): count for kind, count in snapshot.items() if count}
    return TracedPeak(tracked=by_kind.pop("Total"), workspace=lm_head_workspace(phase, specs, work), by_kind=by_kind)


class _NoHook:
    def remove(self) -> None:
        pass


def _frozen_aware_tracker_class():
    from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker

    class FrozenAwareMemTracker(MemTracker):
        """MemTracker that also tracks parameters without gradients (LoRA's frozen base):
        it hooks every tracked parameter's gradient, which a frozen one cannot take."""

        def _track_module_params_and_buffers(self, module, install_grad_hooks: bool = True):
            for p in module.parameters():
                if not p.requires_grad and self._param_to_grad_hook_handles.get(p) is None:
                    self._param_to_grad_hook_handles[p] = (_NoHook(), _NoHook())
            return super()._track_module_params_and_buffers(module, install_grad_hooks)

        def _update_peak_stats(self, peak_state) -> None:
            # Only the device-wide peak is read here. MemTracker also keeps each module's
            # peak, by visiting every module it has seen on every op: quadratic in depth
            # (a full-depth 7B LoRA trace spent most of its minutes there).
            for device, snap in self._curr_mem_snap.items():
                if self._peak_mem.get(device, 0) < snap[_TOTAL_KEY]:
                    self._peak_mem[device] = snap[_TOTAL_KEY]
                    self._peak_mem_snap[device] = dict(snap)

    return FrozenAwareMemTracker


def _FrozenAwareMemTracker():
    return _frozen_aware_tracker_class()()


@contextlib.contextmanager
def _moves_in_place():
    """``Module.to(device, dtype)`` on the fake CPU device by assigning ``.data``.

    peft moves each new adapter to its base layer's device and dtype with ``Module.to``,
    whose parameter swap does not work on fake parameters. Every tensor here is on the fake
    CPU device, so only the dtype can change; it is set parameter by parameter. Any other
    move still goes to ``Module.to``."""
    original = torch.nn.Module.to

    def to(module, *args, **kwargs):
        device, target, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        if device is not None and device.type != DEVICE.type:
            return original(module, *args, **kwargs)
        for t in itertools.chain(module.parameters(), module.buffers()):
            if target is not None and t.is_floating_point() and t.dtype != target:
                t.data = t.data.to(target)
        return module

    torch.nn.Module.to = to
    try:
        yield
    finally:
        torch.nn.Module.to = original


@contextlib.contextmanager
def _triton_fakes():
    """Let ``backend="triton"`` resolve on fake CPU tensors: its custom ops then run their
    fake kernels, which allocate exactly the Triton kernels' outputs (what a GPU run
    allocates; the torch backend's CPU temporaries are not part of a GPU plan)."""
    from rlhf_engine import _backend

    saved = _backend.triton_runs_on
    _backend.triton_runs_on = lambda device: True
    try:
        yield
    finally:
        _backend.triton_runs_on = saved


__all__ = ["TracedPeak", "trace_phase"]
