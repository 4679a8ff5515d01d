"""memory/executor.py: which tensors move where at which phase boundary, the reference swap,
and that moving models and optimizer state never changes a number.

On the CPU both ends of a move are the CPU, but every move is still a real copy into a
separate host buffer (and back into a fresh tensor), so the numeric tests catch a copy that
is missing, stale or aliased. The ``on_move`` hook records what was asked to move. The
``gpu`` tests check the CUDA side: freed device memory, and results through the side stream.
"""

import dataclasses

import pytest
import torch

from rlhf_engine.algos.ppo import ppo_config
from rlhf_engine.algos.rl import RLTrainer
from rlhf_engine.memory.executor import PlacementExecutor, check_schedule
from rlhf_engine.models import PolicyModel, ScalarHeadModel, llama_config
from rlhf_engine.rollout import response_logprobs, score_rollout

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB, PAD, EOS = 32, 0, 2
FOUR_PHASES = ("generate", "score", "update_policy", "update_critic")
P, R, C, M = ("policy", "weights"), ("reference", "weights"), ("critic", "weights"), ("reward_model", "weights")
PO, CO = ("policy", "optimizer"), ("critic", "optimizer")


def fresh_seed() -> int:
    return int(torch.randint(2**31 - 1, ()))


def weights(policy, reference, critic, reward_model):
    return {"policy": policy, "reference": reference, "critic": critic, "reward_model": reward_model}


def offloading_schedule(reference: str = "offload") -> dict:
    """Each phase keeps on the device only what it computes with; ``reference="swap"`` never
    puts the reference there."""
    ref_score = "device" if reference == "offload" else reference
    return {
        "generate": {"weights": weights("device", reference, "offload", "offload"), "optimizer": {"policy": "offload", "critic": "offload"}},
        "score": {"weights": weights("device", ref_score, "device", "device"), "optimizer": {"policy": "offload", "critic": "offload"}},
        "update_policy": {"weights": weights("device", reference, "offload", "offload"), "optimizer": {"policy": "device", "critic": "offload"}},
        "update_critic": {"weights": weights("offload", reference, "device", "offload"), "optimizer": {"policy": "offload", "critic": "device"}},
    }  # fmt: skip


def resident_schedule() -> dict:
    return {phase: {"weights": weights(*["device"] * 4), "optimizer": {"policy": "device", "critic": "device"}} for phase in FOUR_PHASES}


def tiny_models(seed: int, device: str = "cpu") -> dict[str, torch.nn.Module]:
    config = llama_config("tiny", VOCAB, pad_token_id=PAD, eos_token_id=EOS)
    models = {
        "policy": PolicyModel.from_config(config, seed=seed),
        "reference": PolicyModel.from_config(config, seed=seed + 1),
        "critic": ScalarHeadModel.from_config(config, seed=seed + 2),
        "reward_model": ScalarHeadModel.from_config(config, seed=seed + 3),
    }
    return {role: model.to(device) for role, model in models.items()}


def token_batch(device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, VOCAB, (3, 7), device=device)
    return ids, torch.ones_like(ids, dtype=torch.bool)


def trained_optimizers(models: dict, device: str = "cpu") -> dict[str, torch.optim.Optimizer]:
    """AdamW for the policy and the critic after one step (so each has state), with the
    gradients of a second backward left in place (so ``.grad`` moves too)."""
    ids, mask = token_batch(device)
    optimizers = {}
    for role, loss_fn in (("policy", lambda m: m.response_logprobs(ids, mask, 2).sum()), ("critic", lambda m: m.values(ids, mask).sum())):
        model = models[role]
        optimizers[role] = torch.optim.AdamW(model.parameters(), lr=1e-2)
        loss_fn(model).backward()
        optimizers[role].step()
        loss_fn(model).backward()
    return optimizers


def unit_tensors(models: dict, optimizers: dict, unit: tuple[str, str]) -> dict[str, torch.Tensor]:
    """Every tensor of ``unit`` by the name a ``Move`` gives it."""
    role, part = unit
    model = models[role]
    if part == "weights":
        named = dict(model.named_parameters()) | dict(model.named_buffers())
        named |= {f"{n}.grad": p.grad for n, p in model.named_parameters() if p.grad is not None}
        return named
    names = {id(p): n for n, p in model.named_parameters()}
    optimizer = optimizers[role]
    # MasterWeightAdamW: its fp32 masters (and their state) are named after the model's parameters.
    masters = {id(m): p for p, m in zip(getattr(optimizer, "model_params", ()), getattr(optimizer, "master_params", ()))}
    named = {f"{names[id(p)]}.master": m for m, p in ((m, masters[id(m)]) for m in getattr(optimizer, "master_params", ()))}
    name_of = lambda p: f"{names[id(masters[id(p)])]}.master" if id(p) in masters else names[id(p)]  # noqa: E731
    named |= {f"{name_of(p)}:{k}": v for p, state in optimizer.state.items() for k, v in state.items() if torch.is_tensor(v)}
    return named


def snapshot(models: dict, optimizers: dict) -> dict[tuple, torch.Tensor]:
    units = [(role, "weights") for role in models] + [(role, "optimizer") for role in optimizers]
    return {(unit, name): t.detach().to("cpu", copy=True) for unit in units for name, t in unit_tensors(models, optimizers, unit).items()}


def assert_bitwise(expected: dict, models: dict, optimizers: dict) -> None:
    actual = snapshot(models, optimizers)
    assert actual.keys() == expected.keys()
    for key, t in expected.items():
        assert torch.equal(actual[key], t), key


# -- schedule validation --------------------------------------------------------------------
def edited(path: tuple, value) -> dict:
    schedule = offloading_schedule()
    *outer, last = path
    node = schedule
    for key in outer:
        node = node[key]
    if value is None:
        del node[last]
    else:
        node[last] = value
    return schedule


@pytest.mark.parametrize("schedule, message", [
    (edited(("warmup",), {"weights": {}}), "unknown phase"),
    (edited(("update_critic",), None), "missing phase"),
    (edited(("score", "weights", "critic"), None), "lacks a residency for role(s) ['critic']"),
    (edited(("score", "weights", "value_head"), "device"), "names role 'value_head'"),
    (edited(("score", "weights", "critic"), "gpu"), "schedule['score']['weights']['critic'] must be one of"),
    (edited(("update_policy", "weights", "critic"), "swap"), "only the reference can be"),
    (edited(("generate", "weights", "policy"), "adapter"), "only the reference can be"),
    (edited(("generate", "weights", "policy"), "offload"), "phase 'generate' computes with the policy"),
    (edited(("score", "weights", "reference"), "offload"), "phase 'score' computes with the reference"),
    (edited(("update_critic", "weights", "critic"), "offload"), "phase 'update_critic' computes with the critic"),
    (edited(("update_policy", "optimizer", "policy"), "offload"), "['optimizer']['policy'] must be 'device'"),
    (edited(("score", "optimizer", "critic"), "swap"), "schedule['score']['optimizer']['critic'] must be one of"),
    (edited(("score", "weights", "reference"), "swap"), "the same 'swap' or 'adapter' in every phase"),
    (edited(("score", "extra"), {}), "keys 'weights' and 'optimizer'"),
])  # fmt: skip
def test_bad_schedules_are_rejected_with_the_phase_and_role(schedule, message):
    roles, trained = ("policy", "reference", "critic", "reward_model"), ("policy", "critic")
    with pytest.raises(ValueError, match="schedule") as error:
        check_schedule(schedule, roles, trained)
    assert message in str(error.value)


def test_schedule_phases_follow_the_roles():
    two_roles = {phase: {"weights": {"policy": "device", "reference": "adapter"}} for phase in ("generate", "score", "update_policy")}
    assert list(check_schedule(two_roles, ["policy"], [])) == ["generate", "score", "update_policy"]  # an adapter needs no model
    with pytest.raises(ValueError, match="'update_critic' given, but there is no critic"):
        check_schedule(dict(two_roles, update_critic=two_roles["generate"]), ["policy"], [])
    with pytest.raises(TypeError, match="schedule must be a mapping"):
        check_schedule([("generate", {})], ["policy"], [])


def test_bad_models_and_optimizers_are_rejected():
    models = tiny_models(fresh_seed())
    optimizers = {"policy": torch.optim.AdamW(models["policy"].parameters()), "critic": torch.optim.AdamW(models["critic"].parameters())}
    schedule = offloading_schedule()
    with pytest.raises(ValueError, match="unknown role 'actor'"):
        PlacementExecutor(dict(models, actor=models["policy"]), optimizers, schedule, device="cpu")
    with pytest.raises(TypeError, match=r"models\['critic'\] must be a torch.nn.Module"):
        PlacementExecutor(dict(models, critic="critic"), optimizers, schedule, device="cpu")
    with pytest.raises(ValueError, match=r"optimizers\['critic'\] steps parameters that are not models\['critic'\]'s"):
        PlacementExecutor(models, dict(optimizers, critic=optimizers["policy"]), schedule, device="cpu")
    with pytest.raises(ValueError, match="share tensors"):
        PlacementExecutor(dict(models, reference=models["policy"]), optimizers, schedule, device="cpu")
    with pytest.raises(ValueError, match="device must be a torch device"):
        PlacementExecutor(models, optimizers, schedule, device="gpu0")
    with pytest.raises(ValueError, match="pin_memory=True needs a CUDA device"):
        PlacementExecutor(models, optimizers, schedule, device="cpu", pin_memory=True)
    mixed = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2, device="meta"))
    with pytest.raises(ValueError, match=r"models\['reward_model'\] must be all on cpu or all on cpu"):
        PlacementExecutor(dict(models, reward_model=mixed), optimizers, schedule, device="cpu")
    small = PolicyModel.from_config(llama_config("small", VOCAB), seed=0)
    with pytest.raises(ValueError, match="reference 'swap' needs the reference to have the policy's architecture"):
        PlacementExecutor(dict(models, reference=small), optimizers, offloading_schedule("swap"), device="cpu")


def test_an_adapter_reference_is_the_policy_and_never_moves():
    models = tiny_models(fresh_seed())
    models["reference"] = models["policy"]  # LoRA: the reference is the policy with its adapter off
    schedule = offloading_schedule()
    for entry in schedule.values():
        entry["weights"]["reference"] = "adapter"
    moves = []
    executor = PlacementExecutor(models, {}, {k: {"weights": v["weights"]} for k, v in schedule.items()}, device="cpu", on_move=moves.append)
    for phase in FOUR_PHASES * 2:
        executor.enter(phase)
    assert moves and {m.role for m in moves} == {"policy", "critic", "reward_model"}
    with pytest.raises(ValueError, match=r"no moved unit \('reference', 'weights'\)"):
        executor.where("reference")
    with pytest.raises(ValueError, match="phase must be one of"):
        executor.enter("rollout")


# -- what moves where, and when ----------------------------------------------------------------
# Starting with everything on the device, the offloading schedule's boundaries over two steps:
# (units offloaded at the entry, units the entry prefetches for the next phase).
BOUNDARIES = [
    ("generate", {R, C, M, PO, CO}, {R, C, M}),
    ("score", set(), {PO}),
    ("update_policy", {R, C, M}, {C, CO}),
    ("update_critic", {P, PO}, {P}),
    ("generate", {C, CO}, {R, C, M}),  # the reference and reward model are still offloaded
    ("score", set(), {PO}),
    ("update_policy", {R, C, M}, {C, CO}),
    ("update_critic", {P, PO}, {P}),
]


@pytest.mark.parametrize("prefetch", [True, False])
def test_each_boundary_moves_exactly_the_units_whose_residency_changes(prefetch):
    models = tiny_models(fresh_seed())
    optimizers = trained_optimizers(models)
    before = snapshot(models, optimizers)
    params_before = {role: [id(p) for p in model.parameters()] for role, model in models.items()}
    moves = []
    executor = PlacementExecutor(models, optimizers, offloading_schedule(), device="cpu", prefetch=prefetch, on_move=moves.append)
    schedule = offloading_schedule()
    host_ptrs = {}  # (unit, name) -> data_ptr of its host buffer at its first offload
    previous_prefetch = set()
    for phase, offloaded, prefetched in BOUNDARIES:
        moves.clear()
        executor.enter(phase)
        by_group = {}
        for move in moves:
            assert move.phase == phase
            by_group.setdefault(((move.role, move.part), move.to, move.prefetch), []).append(move)
        # Without prefetch, what would have been prefetched at the previous entry is onloaded at this one.
        expected = {(unit, "offload", False) for unit in offloaded}
        expected |= {(unit, "device", True) for unit in prefetched} if prefetch else {(unit, "device", False) for unit in previous_prefetch}
        previous_prefetch = prefetched
        assert by_group.keys() == expected, phase
        for (unit, to, _), group in by_group.items():
            tensors = unit_tensors(models, optimizers, unit)
            assert sorted(m.name for m in group) == sorted(tensors), (phase, unit)
            assert all(m.nbytes == tensors[m.name].numel() * tensors[m.name].element_size() for m in group)
            if to == "offload":
                for m in group:  # one host buffer per tensor, reused at every later offload
                    assert host_ptrs.setdefault((unit, m.name), tensors[m.name].data_ptr()) == tensors[m.name].data_ptr()
        assert executor.moved_bytes[phase] == sum(m.nbytes for m in moves)
        for role, part in [*[(role, "weights") for role in models], *[(role, "optimizer") for role in optimizers]]:
            assert executor.where(role, part) == schedule[phase][part][role], (phase, role, part)
    assert_bitwise(before, models, optimizers)
    assert {role: [id(p) for p in model.parameters()] for role, model in models.items()} == params_before
    for role, optimizer in optimizers.items():
        assert [id(p) for group in optimizer.param_groups for p in group["params"]] == params_before[role]


# -- the reference swap ------------------------------------------------------------------------
def test_reference_swap_computes_the_reference_in_the_policys_storage():
    models = tiny_models(fresh_seed())
    policy, reference = models["policy"], models["reference"]
    ids, mask = token_batch()
    moves = []
    executor = PlacementExecutor(models, {}, {k: {"weights": v["weights"]} for k, v in offloading_schedule("swap").items()},
                                 device="cpu", on_move=moves.append)  # fmt: skip
    executor.enter("generate")
    executor.enter("score")
    params = list(policy.parameters())
    values = {name: t.clone() for name, t in (dict(policy.named_parameters()) | dict(policy.named_buffers())).items()}
    pointers = [p.data_ptr() for p in params]
    policy.train()
    with torch.no_grad():
        expected_ref = reference.response_logprobs(ids, mask, 2)
        expected_policy = policy.response_logprobs(ids, mask, 2)
        assert not torch.equal(expected_ref, expected_policy)  # two different models, else the test proves nothing
        moves.clear()
        with executor.reference_weights() as swapped:
            assert swapped is policy and not policy.training
            assert torch.equal(policy.response_logprobs(ids, mask, 2), expected_ref)
        assert torch.equal(policy.response_logprobs(ids, mask, 2), expected_policy)
    assert policy.training
    assert list(policy.parameters()) == params and all(a is b for a, b in zip(policy.parameters(), params))
    assert [p.data_ptr() for p in policy.parameters()] == pointers
    for name, t in (dict(policy.named_parameters()) | dict(policy.named_buffers())).items():
        assert torch.equal(t, values[name]), name
    # Stash, load and restore: each of the policy's tensors three times.
    nbytes = sum(t.numel() * t.element_size() for t in values.values())
    assert {m.name.split(":")[0] for m in moves} == {"stash", "load", "restore"}
    assert sum(m.nbytes for m in moves) == 3 * nbytes == executor.moved_bytes["score"]
    assert executor.where("reference") == "offload"


def test_reference_weights_refuses_outside_a_swap_schedule_or_with_gradients():
    models = tiny_models(fresh_seed())
    executor = PlacementExecutor(models, {}, {k: {"weights": v["weights"]} for k, v in offloading_schedule().items()}, device="cpu")
    with pytest.raises(RuntimeError, match="not 'swap'"), torch.no_grad(), executor.reference_weights():
        pass
    executor = PlacementExecutor(models, {}, {k: {"weights": v["weights"]} for k, v in offloading_schedule("swap").items()}, device="cpu")
    with pytest.raises(RuntimeError, match="torch.no_grad"), executor.reference_weights():
        pass
    executor.enter("update_critic")  # the policy offloaded: nothing to swap into
    with pytest.raises(RuntimeError, match="policy's weights are offloaded"), torch.no_grad(), executor.reference_weights():
        pass


# -- moving never changes a number ---------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_optimizer_steps_after_offloading_state_and_gradients_are_bitwise_unchanged(dtype):
    # bf16: MasterWeightAdamW, whose fp32 master copies are optimizer state that moves too.
    from rlhf_engine.algos.precision import make_optimizer, parse_dtype

    seed = fresh_seed()
    runs = {}
    for moving in (False, True):
        models = {role: m.to(parse_dtype(dtype)) for role, m in tiny_models(seed).items()}
        optimizers = {role: make_optimizer(models[role], 1e-2, dtype=dtype) for role in ("policy", "critic")}
        schedule = offloading_schedule() if moving else resident_schedule()
        moves = []
        executor = PlacementExecutor(models, optimizers, schedule, device="cpu", on_move=moves.append)
        generator = torch.Generator().manual_seed(seed)
        for _ in range(3):
            ids = torch.randint(3, VOCAB, (3, 7), generator=generator)
            # Gradients made, then the policy and its state offloaded and back before the step.
            models["policy"].response_logprobs(ids, torch.ones_like(ids, dtype=torch.bool), 2).square().sum().backward()
            for phase in ("update_critic", "generate", "score", "update_policy"):
                executor.enter(phase)
            optimizers["policy"].step()
        runs[moving] = snapshot(models, optimizers)
        if moving:
            assert sum(executor.moved_bytes.values()) > 0
            if dtype == "bf16":  # the masters travel with the optimizer state
                assert any(m.part == "optimizer" and m.name.endswith(".master") and m.to == "offload" for m in moves)
    assert runs[False].keys() == runs[True].keys()
    for key, t in runs[False].items():
        assert torch.equal(runs[True][key], t), key


def rl_step(trainer: RLTrainer, executor: PlacementExecutor, step: int, *, swap: bool) -> dict[str, float]:
    """``trainer.step``'s phases with the executor's boundaries between them (the reference
    pass in the policy's storage when ``swap``)."""
    executor.enter("generate")
    rollout = trainer.generate(step)
    executor.enter("score")
    if swap:
        with torch.no_grad():
            rollout, metrics = score_rollout(rollout, temperature=trainer.config.temperature, policy=trainer.policy,
                                             critic=trainer.critic, reward_model=trainer.reward_model)  # fmt: skip
            with executor.reference_weights():
                ref = response_logprobs(trainer.policy, rollout, temperature=trainer.config.temperature)
        rollout = dataclasses.replace(rollout, ref_logprobs=ref)
    else:
        rollout, metrics = trainer.score(rollout)
    advantages, returns = trainer.advantages(rollout)
    executor.enter("update_policy")
    metrics.update(trainer.update_policy(rollout, advantages, step))
    executor.enter("update_critic")
    metrics.update(trainer.update_critic(rollout, returns, step))
    metrics.update(reward_mean=float(rollout.scores.mean()), kl=float(((rollout.old_logprobs - rollout.ref_logprobs) * rollout.response_mask).sum()))
    return metrics


def run_ppo(seed: int, schedule: dict, *, swap: bool, device: str = "cpu", prefetch: bool = True):
    models = tiny_models(seed, device)
    head = models["reward_model"].head.weight  # a zero head would score everything 0
    with torch.no_grad():
        head.copy_(torch.randn(head.shape, generator=torch.Generator().manual_seed(seed)))
    # The reference starts as the policy (as in training), so the swap really copies equal
    # weights; one update later they differ.
    models["reference"].load_state_dict(models["policy"].state_dict())
    config = ppo_config(seed=seed, steps=3, prompts_per_step=4, max_new_tokens=4, minibatch_size=2, epochs=1, lr=5e-3)
    trainer = RLTrainer(config, policy=models["policy"], reference=models["reference"], critic=models["critic"],
                        reward_model=models["reward_model"], prompts=lambda n, g: torch.randint(3, VOCAB, (n, 3), generator=g).tolist(),
                        pad_token_id=PAD, eos_token_id=EOS)  # fmt: skip
    executor = PlacementExecutor(trainer.roles, trainer.optimizers, schedule, device=device, prefetch=prefetch)
    history = [rl_step(trainer, executor, step, swap=swap) for step in range(config.steps)]
    executor.enter("score")  # every model on the device, to compare
    return history, snapshot(trainer.roles, trainer.optimizers), executor


@pytest.mark.parametrize("reference", ["offload", "swap"])
def test_ppo_training_is_bitwise_unchanged_by_an_offloading_schedule(reference):
    seed = fresh_seed()
    resident_history, resident_state, _ = run_ppo(seed, resident_schedule(), swap=False)
    history, state, executor = run_ppo(seed, offloading_schedule(reference), swap=reference == "swap")
    assert all(executor.moved_bytes[phase] > 0 for phase in FOUR_PHASES)
    assert history == resident_history
    assert state.keys() == resident_state.keys()
    for key, t in resident_state.items():
        assert torch.equal(state[key], t), key


# -- CUDA -------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_offloaded_models_leave_the_gpu():
    models = tiny_models(fresh_seed(), "cuda")
    optimizers = trained_optimizers(models, "cuda")
    executor = PlacementExecutor(models, optimizers, offloading_schedule(), device="cuda", prefetch=False)
    offloaded = [R, C, M, PO, CO]
    tensors = [t for unit in offloaded for t in unit_tensors(models, optimizers, unit).values() if t.is_cuda]
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    del tensors
    torch.cuda.synchronize()
    allocated = torch.cuda.memory_allocated()
    executor.enter("generate")
    torch.cuda.synchronize()
    freed = allocated - torch.cuda.memory_allocated()
    # The caching allocator rounds each block up to 512 bytes.
    assert nbytes <= freed <= nbytes + 512 * sum(len(unit_tensors(models, optimizers, u)) for u in offloaded)
    for unit in offloaded:
        for name, t in unit_tensors(models, optimizers, unit).items():
            assert t.device.type == "cpu" and (t.dim() == 0 or t.is_pinned()), (unit, name)


@pytest.mark.gpu
@pytest.mark.parametrize("reference", ["offload", "swap"])
def test_prefetch_on_the_side_stream_gives_the_resident_results(reference):
    # CUDA kernels need not be bitwise reproducible across runs; the moves themselves are exact.
    seed = fresh_seed()
    resident_history, resident_state, _ = run_ppo(seed, resident_schedule(), swap=False, device="cuda")
    history, state, _ = run_ppo(seed, offloading_schedule(reference), swap=reference == "swap", device="cuda")
    for got, want in zip(history, resident_history):
        assert got.keys() == want.keys()
        assert all(got[k] == pytest.approx(want[k], rel=1e-4, abs=1e-5) for k in want), (got, want)
    for key, t in resident_state.items():
        torch.testing.assert_close(state[key], t, rtol=1e-4, atol=1e-5, msg=str(key))


@pytest.mark.gpu
def test_a_model_handed_over_in_host_memory_starts_offloaded_and_pinned():
    models = tiny_models(fresh_seed(), "cuda")
    models["critic"] = models["critic"].to("cpu")
    expected = {name: t.clone() for name, t in models["critic"].state_dict().items()}
    schedule = {phase: {"weights": weights("device", "device", "offload" if phase == "generate" else "device", "device")}
                for phase in FOUR_PHASES}  # fmt: skip
    moves = []
    executor = PlacementExecutor(models, {}, schedule, device="cuda", on_move=moves.append)
    assert executor.where("critic") == "offload" and executor.where("policy") == "device"
    assert all(t.is_pinned() for t in models["critic"].parameters())
    executor.enter("generate")
    assert {(m.role, m.to, m.prefetch) for m in moves} == {("critic", "device", True)}
    executor.enter("score")
    assert executor.where("critic") == "device"
    for name, t in models["critic"].state_dict().items():
        assert t.is_cuda and torch.equal(t.cpu(), expected[name]), name
