"""The placement executor: makes a memory plan's per-phase residency true at phase boundaries.

An RL step runs four phases in order (``rlhf_engine/algos/rl.py``): ``generate`` (policy),
``score`` (policy, reference, critic, reward model; no grad), ``update_policy`` (policy and
its optimizer), ``update_critic`` (critic and its optimizer; PPO only). A **schedule** says,
for each phase, where each role's weights and each trained role's optimizer state live::

    {"generate": {"weights": {"policy": "device", "reference": "offload", ...},
                  "optimizer": {"policy": "offload", ...}},
     "score": {...}, "update_policy": {...}, "update_critic": {...}}

Weight residencies: ``"device"`` (on the compute device), ``"offload"`` (in host memory,
pinned when the device is CUDA), and for the reference only ``"swap"`` (its weights stay in
pinned host memory; its scoring pass runs *in the policy's own parameter storage* under
:meth:`PlacementExecutor.reference_weights`, so the GPU never holds a second copy of the
weights, as NeMo-RL does) or ``"adapter"`` (LoRA: the reference is the policy with its
adapter disabled; nothing moves). Optimizer-state residencies: ``"device"`` or ``"offload"``.

:meth:`PlacementExecutor.enter` moves tensors by reassigning ``tensor.data`` (parameters,
their ``.grad``, buffers, and the tensors in ``optimizer.state``), so every object keeps its
identity: optimizers, tied weights and any other holder of a parameter stay valid. Each
tensor gets one host buffer, allocated at its first offload and reused at every later one.
Copies issued for a phase are logged (``moved_bytes``, the ``on_move`` hook).

Streams (CUDA): the moves of the phase being entered run on the current stream, and
``enter`` returns once the offloaded tensors have landed in host memory (they can be read,
e.g. checkpointed, at once; the GPU memory they held is free for the phase). What the *next*
phase needs on the device is then prefetched on a side stream, overlapping the current
phase's compute; the next ``enter`` makes the current stream wait for those copies before
the tensors are used. With ``prefetch=True`` a phase's device bytes therefore include what
the next phase onloads. On the CPU every copy is synchronous, through the same code path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch

PHASES = ("generate", "score", "update_policy", "update_critic")
ROLES = ("policy", "reference", "critic", "reward_model")
TRAINED_ROLES = ("policy", "critic")
WEIGHT_RESIDENCIES = ("device", "offload", "swap", "adapter")
REFERENCE_ONLY = ("swap", "adapter")
OPTIMIZER_RESIDENCIES = ("device", "offload")
# The roles each phase computes with (their weights must not be offloaded then), and the role it trains.
PHASE_NEEDS = {"generate": ("policy",), "score": ROLES, "update_policy": ("policy",), "update_critic": ("critic",)}
PHASE_TRAINS = {"update_policy": "policy", "update_critic": "critic"}

Schedule = Mapping[str, Mapping[str, Mapping[str, str]]]


@dataclass(frozen=True)
class Move:
    """One tensor copy issued by the executor.

    ``phase``: the phase being entered when it was issued (a prefetch serves the phase after).
    ``part``: ``"weights"``, ``"optimizer"`` or ``"swap"`` (the reference pass's copies:
    ``stash:``/``restore:`` the policy's own weights, ``load:`` the reference's into them).
    ``name``: the parameter or buffer name (``<param>.grad`` for a gradient,
    ``<param>:<key>`` for optimizer state). ``to``: ``"device"`` or ``"offload"``.
    """

    phase: str | None
    role: str
    part: str
    name: str
    to: str
    nbytes: int
    prefetch: bool = False


def check_schedule(schedule: Schedule, roles: Iterable[str], trained: Iterable[str]) -> dict[str, dict[str, dict[str, str]]]:
    """``schedule`` validated against the models' ``roles`` and the optimizers' ``trained``
    roles; returns a plain-dict copy with its phases in step order.

    Raises ValueError naming the phase, the role and what was expected: an unknown or missing
    phase (``update_critic`` exactly when there is a critic), an unknown or missing role, an
    unknown residency, ``swap``/``adapter`` for a role other than the reference or not the
    reference's residency in every phase, a role the phase computes with marked
    ``offload``, or the optimizer a phase steps not on the device.
    """
    roles, trained = set(roles), set(trained)
    if not isinstance(schedule, Mapping):
        raise TypeError(f"schedule must be a mapping phase -> {{'weights': ..., 'optimizer': ...}}, got {type(schedule).__name__}")
    unknown = sorted(set(schedule) - set(PHASES))
    if unknown:
        raise ValueError(f"schedule: unknown phase(s) {unknown}; expected phases among {PHASES}")
    required = {"generate", "score", "update_policy"} | ({"update_critic"} if "critic" in roles else set())
    missing = [p for p in PHASES if p in required and p not in schedule]
    if missing:
        raise ValueError(f"schedule: missing phase(s) {missing} (phases needed with roles {sorted(roles)}: {sorted(required)})")
    if "update_critic" in schedule and "critic" not in roles:
        raise ValueError("schedule: phase 'update_critic' given, but there is no critic model")
    normalized = {}
    for phase in (p for p in PHASES if p in schedule):
        entry = schedule[phase]
        if not isinstance(entry, Mapping) or not set(entry) <= {"weights", "optimizer"}:
            raise ValueError(f"schedule[{phase!r}] must be a mapping with keys 'weights' and 'optimizer', got {entry!r}")
        weights = _check_residencies(phase, "weights", entry.get("weights", {}), roles, WEIGHT_RESIDENCIES)
        optimizer = _check_residencies(phase, "optimizer", entry.get("optimizer", {}), trained, OPTIMIZER_RESIDENCIES)
        for role, residency in weights.items():
            if residency in REFERENCE_ONLY and role != "reference":
                raise ValueError(f"schedule[{phase!r}]['weights'][{role!r}] is {residency!r}, which only the reference can be")
            if residency == "offload" and role in PHASE_NEEDS[phase]:
                raise ValueError(f"schedule[{phase!r}]['weights'][{role!r}] is 'offload', but phase {phase!r} computes with the {role}")
        stepped = PHASE_TRAINS.get(phase)
        if stepped in optimizer and optimizer[stepped] != "device":
            raise ValueError(f"schedule[{phase!r}]['optimizer'][{stepped!r}] must be 'device' (phase {phase!r} steps it), got 'offload'")
        normalized[phase] = {"weights": weights, "optimizer": optimizer}
    modes = {entry["weights"]["reference"] for entry in normalized.values() if "reference" in entry["weights"]}
    if modes & set(REFERENCE_ONLY) and len(modes) > 1:
        raise ValueError(f"schedule: the reference's residency must be the same 'swap' or 'adapter' in every phase, got {sorted(modes)}")
    return normalized


def _check_residencies(phase: str, part: str, residencies, roles: set[str], allowed: tuple[str, ...]) -> dict[str, str]:
    """``residencies`` (role -> residency) must name exactly ``roles``; a reference that is the
    policy's disabled adapter needs no model of its own."""
    where = f"schedule[{phase!r}][{part!r}]"
    if not isinstance(residencies, Mapping):
        raise ValueError(f"{where} must be a mapping role -> residency, got {residencies!r}")
    for role, residency in residencies.items():
        if residency not in allowed:
            raise ValueError(f"{where}[{role!r}] must be one of {allowed}, got {residency!r}")
        adapter = role == "reference" and residency == "adapter"
        if role not in ROLES or (role not in roles and not adapter):
            kind = "model" if part == "weights" else "optimizer"
            raise ValueError(f"{where} names role {role!r}, which has no {kind} here (roles: {sorted(roles)})")
    missing = sorted(roles - set(residencies))
    if missing:
        raise ValueError(f"{where} lacks a residency for role(s) {missing}")
    return dict(residencies)


class PlacementExecutor:
    """Moves models and optimizer state between ``device`` and ``offload_device`` per ``schedule``.

    Args:
        models: role -> module (roles among ``policy``, ``reference``, ``critic``,
            ``reward_model``; the policy is required). Each module's tensors must all be on
            ``device`` or all on ``offload_device`` (then they start offloaded).
        optimizers: role -> optimizer over that role's parameters (``policy``, ``critic``);
            its state, if any, on the parameters' device.
        schedule: see the module docstring and :func:`check_schedule`.
        device: the compute device. offload_device: where offloaded tensors live.
        pin_memory: host buffers in page-locked memory (default: True iff ``device`` is CUDA
            and ``offload_device`` the CPU); needed for copies that overlap compute.
        prefetch: onload what the next phase needs during the current one (side stream).
        on_move: called with a :class:`Move` for every tensor copy issued.

    Attributes:
        phase: the phase entered last (None before the first ``enter``).
        moved_bytes: phase -> bytes copied since that phase was last entered (both
            directions, prefetches for the next phase and the reference pass's copies included).
    """

    def __init__(
        self,
        models: Mapping[str, torch.nn.Module],
        optimizers: Mapping[str, torch.optim.Optimizer],
        schedule: Schedule,
        *,
        device: str | torch.device,
        offload_device: str | torch.device = "cpu",
        pin_memory: bool | None = None,
        prefetch: bool = True,
        on_move: Callable[[Move], None] | None = None,
    ):
        self.device, self.offload_device = _as_device("device", device), _as_device("offload_device", offload_device)
        if pin_memory is None:
            pin_memory = self.device.type == "cuda" and self.offload_device.type == "cpu"
        if pin_memory and (self.device.type != "cuda" or self.offload_device.type != "cpu"):
            raise ValueError(
                f"PlacementExecutor: pin_memory=True needs a CUDA device and offload_device 'cpu', got {self.device} / {self.offload_device}"
            )
        self.models, self.optimizers = _check_models(models), _check_optimizers(optimizers, models)
        self.schedule = check_schedule(schedule, self.models, self.optimizers)
        self.phases = tuple(self.schedule)
        self.pin_memory, self.prefetch, self.on_move = bool(pin_memory), bool(prefetch), on_move
        ref_modes = {e["weights"].get("reference") for e in self.schedule.values()} & set(REFERENCE_ONLY)
        self.reference_mode = ref_modes.pop() if ref_modes else None
        # The units that move: (role, "weights") and (role, "optimizer"); an adapter reference is the policy itself.
        self._units = [(role, "weights") for role in self.models if not (role == "reference" and self.reference_mode == "adapter")]
        self._units += [(role, "optimizer") for role in self.optimizers]
        _check_unshared({role: self.models[role] for role, part in self._units if part == "weights"})
        self._param_names = {role: {id(p): n for n, p in self.models[role].named_parameters()} for role in self.optimizers}
        self._swap_pairs = _swap_pairs(self.models["policy"], self.models["reference"]) if self.reference_mode == "swap" else []
        self._host: dict[tuple[str, str, str], torch.Tensor] = {}  # one host buffer per tensor, reused across steps
        self._away: dict[tuple[str, str], list[tuple[str, torch.Tensor]]] = {}  # offloaded unit -> its tensors
        self._pending: dict[tuple[str, str], list[tuple[torch.Tensor, torch.Tensor]]] = {}  # prefetched, not yet adopted
        self._where = {unit: self._initial_residency(unit) for unit in self._units}
        self._stream: torch.cuda.Stream | None = None
        self.phase: str | None = None
        self.moved_bytes = {phase: 0 for phase in self.phases}

    # -- public ---------------------------------------------------------------------------
    def where(self, role: str, part: str = "weights") -> str:
        """``"device"`` or ``"offload"``: where ``role``'s weights (or optimizer state) are now;
        a prefetched unit counts as offloaded until the phase that needs it is entered."""
        if (role, part) not in self._where:
            raise ValueError(f"PlacementExecutor.where: no moved unit ({role!r}, {part!r}); units: {sorted(self._where)}")
        return self._where[(role, part)]

    def enter(self, phase: str) -> None:
        """Make ``phase``'s residency true, then start prefetching what the next phase needs.

        Offloads come first (their GPU memory is free before anything is onloaded); the call
        returns once they have landed in host memory. Onloads not prefetched are queued on
        the current stream, ahead of the phase's compute.
        """
        if phase not in self.schedule:
            raise ValueError(f"PlacementExecutor.enter: phase must be one of {self.phases}, got {phase!r}")
        self.phase, self.moved_bytes[phase] = phase, 0
        self._adopt_prefetched()
        targets = self._targets(phase)
        with torch.no_grad():
            offloads = [unit for unit in self._units if targets[unit] == "offload" and self._where[unit] == "device"]
            for unit in offloads:
                self._offload(unit)
            offloaded = self._record_event() if offloads else None
            for unit in self._units:
                if targets[unit] == "device" and self._where[unit] == "offload":
                    self._onload(unit, prefetch=False)
            if self.prefetch:
                upcoming = self._targets(self.phases[(self.phases.index(phase) + 1) % len(self.phases)])
                for unit in self._units:
                    if upcoming[unit] == "device" and self._where[unit] == "offload":
                        self._onload(unit, prefetch=True)
        if offloaded is not None:
            offloaded.synchronize()

    @contextlib.contextmanager
    def reference_weights(self) -> Iterator[torch.nn.Module]:
        """Inside, the policy module computes as the reference (``swap`` schedules); yields it.

        The policy's weights and buffers are copied to pinned host buffers, the reference's
        copied into the policy's own storage, and the policy's copied back on exit, so the
        policy's parameters are the same objects with bitwise the same values afterwards.
        The policy is in eval mode inside (as the frozen reference is). Gradients must be
        off: the restore happens behind autograd's back.
        """
        if self.reference_mode != "swap":
            mode = self.reference_mode or "device/offload"
            raise RuntimeError(f"PlacementExecutor.reference_weights: the schedule's reference residency is not 'swap' (it is {mode})")
        if torch.is_grad_enabled():
            raise RuntimeError("PlacementExecutor.reference_weights: run the reference pass under torch.no_grad()")
        if self._where[("policy", "weights")] != "device":
            raise RuntimeError("PlacementExecutor.reference_weights: the policy's weights are offloaded; enter a phase with them on the device")
        policy = self.models["policy"]
        stashes = []
        with torch.no_grad():
            for name, mine, theirs in self._swap_pairs:
                stashes.append(self._copy_to_host(("policy", "swap", name), mine))
                self._log("policy", "swap", f"stash:{name}", "offload", mine)
            for name, mine, theirs in self._swap_pairs:
                mine.copy_(theirs, non_blocking=self._async)
                self._log("reference", "swap", f"load:{name}", "device", mine)
        training = policy.training
        policy.eval()
        try:
            yield policy
        finally:
            policy.train(training)
            with torch.no_grad():
                for (name, mine, _), stash in zip(self._swap_pairs, stashes):
                    mine.copy_(stash, non_blocking=self._async)
                    self._log("policy", "swap", f"restore:{name}", "device", mine)

    # -- moves ----------------------------------------------------------------------------
    @property
    def _async(self) -> bool:
        return self.device.type == "cuda"

    def _targets(self, phase: str) -> dict[tuple[str, str], str]:
        """unit -> ``"device"`` / ``"offload"`` in ``phase`` (a swapped reference is always offloaded)."""
        entry = self.schedule[phase]
        return {(role, part): "offload" if entry[part][role] == "swap" else entry[part][role] for role, part in self._units}

    def _tensors(self, unit: tuple[str, str]) -> list[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` for every tensor of ``unit`` on the compute device (host-side scalars
        such as AdamW's ``step`` counter stay where the optimizer keeps them)."""
        role, part = unit
        named = self._named_weights(role) if part == "weights" else self._named_state(role)
        return [(name, t) for name, t in named if t.device == self.device]

    def _named_weights(self, role: str) -> Iterator[tuple[str, torch.Tensor]]:
        """Parameters, their gradients (``<name>.grad``) and buffers of ``role``'s model."""
        model = self.models[role]
        for name, p in model.named_parameters():
            yield name, p
            if p.grad is not None:
                yield f"{name}.grad", p.grad
        yield from model.named_buffers()

    def _named_state(self, role: str) -> Iterator[tuple[str, torch.Tensor]]:
        """The tensors in ``role``'s optimizer state (``<param name>:<key>``); for an
        optimizer over fp32 master copies (``MasterWeightAdamW``) the masters themselves
        (``<param name>.master``) and their gradients too: they are optimizer state."""
        optimizer, names = self.optimizers[role], self._param_names[role]
        model_of = dict(zip(map(id, getattr(optimizer, "master_params", ())), getattr(optimizer, "model_params", ())))
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) in model_of:
                    name = f"{names[id(model_of[id(p)])]}.master"
                    yield name, p
                    if p.grad is not None:
                        yield f"{name}.grad", p.grad
                else:
                    name = names[id(p)]
                for key, value in optimizer.state.get(p, {}).items():
                    if isinstance(value, torch.Tensor):
                        yield f"{name}:{key}", value

    def _offload(self, unit: tuple[str, str]) -> None:
        away = []
        for name, t in self._tensors(unit):
            t.data = self._copy_to_host((*unit, name), t)
            self._log(*unit, name, "offload", t)
            away.append((name, t))
        self._away[unit], self._where[unit] = away, "offload"

    def _onload(self, unit: tuple[str, str], *, prefetch: bool) -> None:
        """Copy ``unit``'s offloaded tensors to the device: now on the current stream, or
        (``prefetch``) on the side stream, adopted by the next ``enter``."""
        away = self._away.pop(unit)
        # Allocated on the current stream, the stream that uses them once they are handed over.
        copies = [(t, torch.empty_like(t, device=self.device)) for _, t in away]
        side = self._side_stream() if prefetch else None
        if side is not None:
            # The host buffers were just written by the current stream's offload copies, and the
            # new blocks may still be in use there: the side stream starts after both.
            side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            for (name, t), (_, dev) in zip(away, copies):
                dev.copy_(t, non_blocking=self._async)
                if side is not None:
                    dev.record_stream(side)  # not reused by the allocator before this copy finishes
                self._log(*unit, name, "device", dev, prefetch=prefetch)
        if prefetch:
            self._pending[unit] = copies
            return
        for t, dev in copies:
            t.data = dev
        self._where[unit] = "device"

    def _adopt_prefetched(self) -> None:
        """Make the current stream wait for the prefetch copies, then hand their tensors over."""
        if not self._pending:
            return
        if self._stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self._stream)
        for unit, copies in self._pending.items():
            for t, dev in copies:
                t.data = dev
            self._where[unit] = "device"
        self._pending.clear()

    def _copy_to_host(self, key: tuple[str, str, str], t: torch.Tensor) -> torch.Tensor:
        """``t`` copied into its host buffer (allocated on first use, reused after); returns the buffer."""
        buffer = self._host.get(key)
        if buffer is None or buffer.shape != t.shape or buffer.dtype != t.dtype:
            buffer = torch.empty(t.shape, dtype=t.dtype, device=self.offload_device, pin_memory=self.pin_memory)
            self._host[key] = buffer
        buffer.copy_(t, non_blocking=self._async)
        return buffer

    def _initial_residency(self, unit: tuple[str, str]) -> str:
        """Where ``unit`` starts: ``"device"`` unless its tensors are all on the offload device;
        those become the host buffers (copied into pinned ones first when pinning)."""
        role, part = unit
        if part == "optimizer":
            stray = [n for n, t in self._named_state(role) if t.dim() > 0 and t.device != self.device]
            if stray:
                raise ValueError(f"PlacementExecutor: optimizers[{role!r}] state must be on {self.device} (where it steps), found {stray[:3]}")
            return "device"
        tensors = list(self._named_weights(role))
        devices = {t.device for _, t in tensors}
        if devices <= {self.device}:
            return "device"
        if devices != {self.offload_device}:
            found = sorted(map(str, devices))
            raise ValueError(f"PlacementExecutor: models[{role!r}] must be all on {self.device} or all on {self.offload_device}, found {found}")
        with torch.no_grad():
            for name, t in tensors:
                if self.pin_memory and not t.is_pinned():
                    t.data = self._copy_to_host((role, part, name), t)
                self._host[(role, part, name)] = t.data
        self._away[unit] = tensors
        return "offload"

    def _side_stream(self) -> torch.cuda.Stream | None:
        if self.device.type == "cuda" and self._stream is None:
            self._stream = torch.cuda.Stream(device=self.device)
        return self._stream

    def _record_event(self) -> torch.cuda.Event | None:
        """An event after the offload copies just queued (None on the CPU, where they are done)."""
        if not self._async:
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def _log(self, role: str, part: str, name: str, to: str, t: torch.Tensor, *, prefetch: bool = False) -> None:
        nbytes = t.numel() * t.element_size()
        if self.phase is not None:
            self.moved_bytes[self.phase] += nbytes
        if self.on_move is not None:
            self.on_move(Move(self.phase, role, part, name, to, nbytes, prefetch))


def _as_device(name: str, device) -> torch.device:
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"PlacementExecutor: {name} must be a torch device such as 'cpu' or 'cuda', got {device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"PlacementExecutor: {name} {device}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is None:
        # Tensors report their index; compare like with like.
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _check_models(models) -> dict[str, torch.nn.Module]:
    if not isinstance(models, Mapping):
        raise TypeError(f"PlacementExecutor: models must be a mapping role -> nn.Module, got {type(models).__name__}")
    for role, model in models.items():
        if role not in ROLES:
            raise ValueError(f"PlacementExecutor: models has unknown role {role!r}; expected roles among {ROLES}")
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"PlacementExecutor: models[{role!r}] must be a torch.nn.Module, got {type(model).__name__}")
    if "policy" not in models:
        raise ValueError(f"PlacementExecutor: models must include the 'policy', got roles {sorted(models)}")
    return dict(models)


def _check_optimizers(optimizers, models) -> dict[str, torch.optim.Optimizer]:
    if not isinstance(optimizers, Mapping):
        raise TypeError(f"PlacementExecutor: optimizers must be a mapping role -> Optimizer, got {type(optimizers).__name__}")
    for role, optimizer in optimizers.items():
        if role not in TRAINED_ROLES or role not in models:
            raise ValueError(f"PlacementExecutor: optimizers has role {role!r}; expected a trained role among {TRAINED_ROLES} with a model")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"PlacementExecutor: optimizers[{role!r}] must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        own = {id(p) for p in models[role].parameters()}
        # A master-weight optimizer steps fp32 copies of the model's parameters (model_params).
        stepped = getattr(optimizer, "model_params", None) or [p for group in optimizer.param_groups for p in group["params"]]
        if any(id(p) not in own for p in stepped):
            raise ValueError(f"PlacementExecutor: optimizers[{role!r}] steps parameters that are not models[{role!r}]'s")
    return dict(optimizers)


def _check_unshared(models: dict[str, torch.nn.Module]) -> None:
    """Moving one role must not move another's tensors."""
    owner: dict[int, str] = {}
    for role, model in models.items():
        for t in list(model.parameters()) + list(model.buffers()):
            other = owner.setdefault(id(t), role)
            if other != role:
                raise ValueError(f"PlacementExecutor: models[{other!r}] and models[{role!r}] share tensors; each moved role needs its own")


def _swap_pairs(policy: torch.nn.Module, reference: torch.nn.Module) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """``(name, policy tensor, reference tensor)`` for every parameter and buffer; ValueError
    unless both modules have the same names, shapes and dtypes."""
    mine = dict(policy.named_parameters()) | dict(policy.named_buffers())
    theirs = dict(reference.named_parameters()) | dict(reference.named_buffers())
    problems = [f"{n} only in the policy" for n in mine if n not in theirs]
    problems += [f"{n} only in the reference" for n in theirs if n not in mine]
    problems += [
        f"{n}: policy {tuple(t.shape)} {t.dtype}, reference {tuple(theirs[n].shape)} {theirs[n].dtype}"
        for n, t in mine.items() if n in theirs and (t.shape != theirs[n].shape or t.dtype != theirs[n].dtype)
    ]  # fmt: skip
    if problems:
        raise ValueError(f"PlacementExecutor: reference 'swap' needs the reference to have the policy's architecture; {problems[:3]}")
    return [(name, t, theirs[name]) for name, t in mine.items()]
