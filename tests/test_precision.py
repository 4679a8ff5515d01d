"""algos/precision: dtype names, the fp32 / bf16 optimizers (fp32 masters), and gradient
checkpointing of PolicyModel / ScalarHeadModel."""

import math

import pytest
import torch

from rlhf_engine.algos.common import make_optimizer as common_make_optimizer
from rlhf_engine.algos.precision import MasterWeightAdamW, make_optimizer, parse_dtype, trained_param_bytes
from rlhf_engine.models import PolicyModel, ScalarHeadModel, llama_config, load_checkpoint, save_checkpoint

VOCAB = 32
SHAPES = [(7, 5), (13,), (3, 4, 2)]  # a matrix, a vector (norm / bias style), a 3-d tensor

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_policy(dtype=torch.float32, seed=0) -> PolicyModel:
    return PolicyModel.from_config(llama_config("tiny", VOCAB), seed=seed).to(dtype)


def token_batch(seed):
    """Left-padded ``[3, 9]`` tokens (one row of 2 pads) and its mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (3, 9), generator=g)
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[1, :2] = False
    return ids.masked_fill(~mask, 0), mask


def policy_loss(policy, seed):
    ids, mask = token_batch(seed)
    return -policy.response_logprobs(ids, mask, 4).sum()


def bf16_params_and_fp32_copies(seed):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g).bfloat16().requires_grad_() for s in SHAPES]
    return params, [p.detach().float().requires_grad_() for p in params]


def random_grads(step, scale=1.0):
    """bf16 gradients of ``SHAPES``, large enough that clipping at 1.0 bites."""
    g = torch.Generator().manual_seed(1000 + step)
    return [(scale * torch.randn(s, generator=g)).bfloat16() for s in SHAPES]


# -- dtype names --------------------------------------------------------------------------------
def test_parse_dtype():
    assert parse_dtype("fp32") is torch.float32 and parse_dtype("bf16") is torch.bfloat16


@pytest.mark.parametrize("name", ["fp16", "BF16", "bfloat16", "", None, torch.bfloat16])
def test_parse_dtype_rejects_other_names(name):
    with pytest.raises(ValueError, match=r"policy_dtype must be one of \['bf16', 'fp32'\]"):
        parse_dtype(name, field="policy_dtype")


# -- the optimizers' tensors: the memory accounting ---------------------------------------------
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_optimizer_tensors_match_trained_param_bytes(dtype):
    policy = tiny_policy(parse_dtype(dtype))
    optimizer = make_optimizer(policy, lr=1e-3, dtype=dtype)
    params = [p for p in policy.parameters() if p.requires_grad]
    n = sum(p.numel() for p in params)
    policy_loss(policy, 0).backward()

    def nbytes(tensors):
        return sum(t.numel() * t.element_size() for t in tensors)

    expected = trained_param_bytes(dtype)
    assert sum(v for k, v in expected.items() if k != "step_grad") == 16
    assert all(p.dtype == parse_dtype(dtype) and p.grad.dtype == p.dtype for p in params)
    assert nbytes(params) == expected["weight"] * n and nbytes(p.grad for p in params) == expected["grad"] * n
    if dtype == "bf16":
        optimizer.grads_to_masters()
        assert all(p.grad is None for p in params)
    step_grads = [p.grad for group in optimizer.param_groups for p in group["params"]]
    assert all(g.dtype == torch.float32 for g in step_grads) and nbytes(step_grads) == expected["step_grad"] * n
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    masters = getattr(optimizer, "master_params", [])
    assert all(m.dtype == torch.float32 and m.shape == p.shape for m, p in zip(masters, params))
    assert nbytes(masters) == expected["master"] * n
    states = list(optimizer.state.values())
    assert len(states) == len(params)
    for key in ("exp_avg", "exp_avg_sq"):
        assert all(s[key].dtype == torch.float32 for s in states) and nbytes(s[key] for s in states) == expected[key] * n
    assert all(p.grad is None for p in params) and all(m.grad is None for m in masters)


def test_fp32_optimizer_is_common_make_optimizer():
    policy = tiny_policy()
    ours, today = make_optimizer(policy, lr=3e-4, weight_decay=0.1), common_make_optimizer(policy, lr=3e-4, weight_decay=0.1)
    assert type(ours) is type(today) is torch.optim.AdamW
    assert ours.defaults == today.defaults
    assert [p for p in ours.param_groups[0]["params"]] == [p for p in today.param_groups[0]["params"]]
    bf16 = make_optimizer(tiny_policy(torch.bfloat16), lr=3e-4, weight_decay=0.1, dtype="bf16")
    assert {k: bf16.defaults[k] for k in ("lr", "betas", "eps", "weight_decay")} == {
        k: today.defaults[k] for k in ("lr", "betas", "eps", "weight_decay")
    }


@pytest.mark.parametrize(
    "model_dtype, dtype, match",
    [
        (torch.float32, "bf16", "needs the trainable parameters in torch.bfloat16, got torch.float32"),
        (torch.bfloat16, "fp32", "needs the trainable parameters in torch.float32, got torch.bfloat16"),
        (torch.float32, "fp16", "dtype must be one of"),
    ],
)
def test_make_optimizer_bad_input(model_dtype, dtype, match):
    with pytest.raises(ValueError, match=match):
        make_optimizer(tiny_policy(model_dtype), lr=1e-3, dtype=dtype)


def test_make_optimizer_frozen_model():
    with pytest.raises(ValueError, match="no trainable parameters"):
        make_optimizer(tiny_policy(torch.bfloat16).requires_grad_(False), lr=1e-3, dtype="bf16")


@pytest.mark.parametrize(
    "params, kwargs, error, match",
    [
        ([torch.zeros(3, requires_grad=True)], {}, TypeError, r"params\[0\] must be a bfloat16 leaf tensor"),
        ([torch.zeros(3, dtype=torch.bfloat16)], {}, TypeError, "requires_grad=False"),
        ("weights", {}, TypeError, r"params\[0\] must be a bfloat16"),
        ([], {}, ValueError, "params is empty"),
        ([torch.zeros(3, dtype=torch.bfloat16, requires_grad=True)] * 2, {}, ValueError, "more than once"),
        ([torch.zeros(3, dtype=torch.bfloat16, requires_grad=True)], {"lr": -1.0}, ValueError, "lr must be a number >= 0"),
        ([torch.zeros(3, dtype=torch.bfloat16, requires_grad=True)], {"betas": (0.9, 1.0)}, ValueError, "betas must be"),
    ],
)
def test_master_weight_adamw_bad_input(params, kwargs, error, match):
    with pytest.raises(error, match=match):
        MasterWeightAdamW(params, **{"lr": 1e-3, **kwargs})


# -- MasterWeightAdamW against torch.optim.AdamW on fp32 copies ---------------------------------
def test_masters_follow_fp32_adamw_exactly():
    params, ref_params = bf16_params_and_fp32_copies(0)
    ours = MasterWeightAdamW(params, lr=1e-2, weight_decay=0.1)
    ref = torch.optim.AdamW(ref_params, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), fused=True)
    for step in range(5):
        grads = random_grads(step)
        for i, (p, r, g) in enumerate(zip(params, ref_params, grads)):
            if step == 2 and i == 1:  # a parameter without a gradient is not stepped (as AdamW)
                continue
            p.grad, r.grad = g, g.float()
        ours.step()
        ref.step()
        ours.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
        for p, m, r in zip(params, ours.master_params, ref_params):
            assert torch.equal(m, r)
            assert torch.equal(p, r.detach().bfloat16())  # the weight is its master rounded to nearest
    assert int(ours.state[ours.master_params[1]]["step"]) == int(ref.state[ref_params[1]]["step"]) == 4
    # The masters hold what bf16 cannot: a run without them would have rounded these updates away.
    assert any(not torch.equal(m, p.float()) for p, m in zip(params, ours.master_params))


def test_clipping_sees_the_global_norm_of_the_fp32_grads():
    params, ref_params = bf16_params_and_fp32_copies(1)
    ours = MasterWeightAdamW(params, lr=1e-2)
    ref = torch.optim.AdamW(ref_params, lr=1e-2, weight_decay=0.0, betas=(0.9, 0.95), fused=True)
    for step in range(3):
        grads = random_grads(step, scale=3.0)
        for p, r, g in zip(params, ref_params, grads):
            p.grad, r.grad = g, g.float()
        ours.grads_to_masters()
        # What common.optimizer_step clips: the gradients of the optimizer's param_groups.
        clipped = [p for group in ours.param_groups for p in group["params"] if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(clipped, 1.0)
        expected = math.sqrt(sum(float(g.double().square().sum()) for g in grads))
        assert norm.dtype == torch.float32 and len(clipped) == len(SHAPES)
        assert math.isclose(float(norm), expected, rel_tol=1e-6)
        assert expected > 1.0  # the clip did bite
        ref_norm = torch.nn.utils.clip_grad_norm_(ref_params, 1.0)
        assert torch.equal(norm, ref_norm)
        ours.step()
        ref.step()
        ours.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
        for m, r in zip(ours.master_params, ref_params):
            assert torch.equal(m, r)


def test_grads_accumulate_in_fp32_on_the_masters():
    params, _ = bf16_params_and_fp32_copies(2)
    ours = MasterWeightAdamW(params, lr=1e-2)
    first, second = random_grads(0), random_grads(1)
    for p, g in zip(params, first):
        p.grad = g
    ours.grads_to_masters()
    for p, g in zip(params, second):
        p.grad = g
    ours.grads_to_masters()
    for m, a, b in zip(ours.master_params, first, second):
        assert torch.equal(m.grad, a.float() + b.float())


def test_step_closure_returns_its_loss():
    params, _ = bf16_params_and_fp32_copies(3)
    ours = MasterWeightAdamW(params, lr=1e-2)
    before = [p.detach().clone() for p in params]

    def closure():
        loss = sum((p.float() ** 2).sum() for p in params)
        loss.backward()
        return loss

    loss = ours.step(closure)
    assert loss.requires_grad and all(not torch.equal(p, b) for p, b in zip(params, before))


# -- checkpoints: resume continues bitwise ------------------------------------------------------
def train_steps(policy, optimizer, steps):
    for step in steps:
        policy_loss(policy, step).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def test_resume_from_checkpoint_is_bitwise(tmp_path):
    policy = tiny_policy(torch.bfloat16)
    optimizer = make_optimizer(policy, lr=1e-2, weight_decay=0.01, dtype="bf16")
    policy.train()
    train_steps(policy, optimizer, range(3))
    path = save_checkpoint(tmp_path, 3, models={"policy": policy}, optimizers={"policy": optimizer})
    # The masters are not their rounded weights: re-deriving them at resume would change the run.
    assert any(not torch.equal(m, p.float()) for p, m in zip(optimizer.model_params, optimizer.master_params))
    train_steps(policy, optimizer, range(3, 6))

    resumed = tiny_policy(torch.bfloat16, seed=1)
    resumed_optimizer = make_optimizer(resumed, lr=1e-2, weight_decay=0.01, dtype="bf16")
    load_checkpoint(path, models={"policy": resumed}, optimizers={"policy": resumed_optimizer})
    resumed.train()
    train_steps(resumed, resumed_optimizer, range(3, 6))
    for (name, a), b in zip(policy.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    for a, b in zip(optimizer.master_params, resumed_optimizer.master_params):
        assert torch.equal(a, b)
    for a, b in zip(optimizer.state.values(), resumed_optimizer.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in ("step", "exp_avg", "exp_avg_sq"))


def test_load_state_dict_needs_masters():
    params, ref_params = bf16_params_and_fp32_copies(4)
    ours = MasterWeightAdamW(params, lr=1e-2)
    with pytest.raises(ValueError, match="no 'master_params'"):
        ours.load_state_dict(torch.optim.AdamW(ref_params).state_dict())
    state = ours.state_dict()
    state["master_params"] = [m.bfloat16() for m in state["master_params"]]
    with pytest.raises(ValueError, match="must be 3 fp32 tensors"):
        ours.load_state_dict(state)


# -- gradient checkpointing ---------------------------------------------------------------------
def build_policy(checkpointing):
    policy = tiny_policy()
    if checkpointing:
        policy.gradient_checkpointing_enable()
    return policy, lambda: policy_loss(policy, 0)


def build_critic(checkpointing):
    critic = ScalarHeadModel.from_config(llama_config("tiny", VOCAB), seed=0)
    with torch.no_grad():  # a zero head would leave the backbone without gradients
        critic.head.weight.copy_(torch.randn(critic.head.weight.shape, generator=torch.Generator().manual_seed(0)))
    if checkpointing:
        critic.gradient_checkpointing_enable()
    ids, mask = token_batch(0)
    return critic, lambda: critic.values(ids, mask).square().sum()


@pytest.mark.parametrize("build", [build_policy, build_critic], ids=["PolicyModel", "ScalarHeadModel"])
def test_gradient_checkpointing_same_grads_fewer_saved_tensors(build):
    grads, saved = [], []
    for checkpointing in (False, True):
        model, loss_fn = build(checkpointing)
        model.train()
        count = [0]

        def pack(t):
            count[0] += 1
            return t

        # Tensors saved inside a checkpointed layer are packed by the checkpoint's own
        # hooks (they are recomputed in backward), so only the rest reach this one.
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = loss_fn()
        loss.backward()
        saved.append(count[0])
        grads.append({name: p.grad for name, p in model.named_parameters()})
    assert saved[1] < saved[0] / 2
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        assert g is not None and g.abs().sum() > 0, name
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-6, msg=name)
