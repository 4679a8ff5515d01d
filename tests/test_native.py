"""rlhf_engine._C: built by the install, importable without a GPU, and clear errors where
a native backend cannot run or does not exist."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from rlhf_engine import _backend, ops
from rlhf_engine.native import library

ROOT = Path(__file__).resolve().parent.parent
COMPILER = shutil.which("c++") or shutil.which("g++")


@pytest.mark.skipif(COMPILER is None, reason="no C++ compiler here, so the install skips rlhf_engine._C")
def test_module_is_built_and_imports_without_a_gpu():
    assert library.native_built(), "rlhf_engine._C was not built: see the install's 'rlhf_engine build:' lines"
    assert isinstance(library.module().built_with_cuda, bool)


@pytest.mark.skipif(not library.native_built(), reason="rlhf_engine._C is not built")
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a CUDA device")
def test_cuda_entry_point_without_a_device_raises_clearly():
    x = torch.zeros(4)
    with pytest.raises(RuntimeError, match="'cuda' backend"):
        library.module().masked_whiten_cuda(library.ref(x), library.ref(x), x.data_ptr(), 0, 4, True, 1e-8, 0, 0)


def test_backend_cuda_on_cpu_tensors_is_refused_by_name():
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available: it runs on cuda tensors"):
        ops.masked_whiten(torch.zeros(3), torch.ones(3, dtype=torch.bool), backend="cuda")


def test_native_backend_of_an_op_without_one_is_a_value_error():
    with pytest.raises(ValueError, match="kl_penalty has no cpp kernel"):
        ops.kl_penalty(torch.zeros(3), torch.zeros(3), backend="cpp")


def test_environment_native_choice_leaves_other_ops_on_auto(monkeypatch):
    monkeypatch.setenv(_backend.ENV_VAR, "cpp")
    assert _backend.resolve_backend("kl_penalty", None, torch.device("cpu")) == "torch"
    if library.native_built():
        assert _backend.resolve_backend("masked_whiten", None, torch.device("cpu")) == "cpp"


def test_auto_prefers_only_measured_native_backends():
    # Each entry names the committed benchmark that shows the native backend faster.
    for device_type, table in _backend.AUTO_PREFERS.items():
        assert device_type in ("cpu", "cuda")
        for op, source in table.items():
            assert op in _backend.NATIVE_OPS, op
            assert source.startswith("benchmarks/results/"), source
            _assert_native_faster(op, device_type, ROOT / source)


def _assert_native_faster(op, device_type, path):
    """Every shape of ``op`` in the benchmark file ``path`` has the native backend faster
    than the default one (triton on CUDA, torch on the CPU), measured in the same run."""
    native, default = ("cuda", "triton") if device_type == "cuda" else ("cpp", "torch")
    assert path.is_file(), f"{path} (named in AUTO_PREFERS) is not committed"
    times = {}
    for row in json.loads(path.read_text())["results"]:
        if row["error"] is None and (row["op"] == op or row["op"].startswith(op + " ")):
            for name in (native, default):
                if row["impl"] in (f"ours ({name})", f"ours-{name}"):
                    times.setdefault((row["op"], row["shape"]), {})[name] = row["ms"]
    paired = {key: t for key, t in times.items() if len(t) == 2}
    assert paired, f"{path} has no {op} rows timing both {native} and {default}"
    for key, t in paired.items():
        assert t[native] < t[default], f"{op} {key}: {native} {t[native]:.3f} ms, {default} {t[default]:.3f} ms"


@pytest.mark.skipif(not library.native_built(), reason="rlhf_engine._C is not built")
@pytest.mark.parametrize("kind", ["meta", "fake"])
def test_native_launchers_refuse_tensors_without_data(kind):
    # A fake or meta tensor's data_ptr() is no memory: the launcher raises instead of
    # handing it to a kernel (which would crash the process).
    from torch._subclasses.fake_tensor import FakeTensorMode

    from rlhf_engine.native.gae import discounted_returns_fwd

    def call():
        x = torch.empty(2, 3, device="meta" if kind == "meta" else "cpu")
        return discounted_returns_fwd(x, torch.ones(2, 3, dtype=torch.bool, device=x.device), 1.0)

    with pytest.raises(RuntimeError, match=f"{kind} tensor"):
        if kind == "fake":
            with FakeTensorMode():
                call()
        else:
            call()


def _bad_native_calls(device):
    """(op, call, error, argument name) for each native op: a bad argument the op must name
    before any kernel runs."""
    f = dict(device=device)
    ones = torch.ones(2, 4, dtype=torch.bool, **f)
    lp = torch.randn(2, 4, **f)
    return [
        ("token_logprobs", lambda b: ops.token_logprobs(torch.randn(2, 3, 5, **f), torch.zeros(2, 4, dtype=torch.long, **f), backend=b), ValueError, "labels"),
        ("token_logprobs", lambda b: ops.token_logprobs(torch.randn(2, 3, 5, **f), torch.zeros(2, 3, **f), backend=b), TypeError, "labels"),
        ("policy_loss", lambda b: ops.policy_loss(lp, lp, torch.randn(3, **f), ones, backend=b), ValueError, "advantages"),
        ("policy_loss", lambda b: ops.policy_loss(lp, lp, torch.randn(2, **f), ones, clip_low=-0.1, backend=b), ValueError, "clip_low"),
        ("group_advantages", lambda b: ops.group_advantages(torch.randn(12, **f), group_size=5, backend=b), ValueError, "group_size"),
        ("masked_whiten", lambda b: ops.masked_whiten(torch.randn(4, **f), torch.ones(5, dtype=torch.bool, **f), backend=b), ValueError, "mask"),
        ("gae", lambda b: ops.gae(lp, torch.randn(2, 5, **f), ones, backend=b), ValueError, "values"),
        ("discounted_returns", lambda b: ops.discounted_returns(lp, ones, gamma="0.9", backend=b), TypeError, "gamma"),
    ]  # fmt: skip


@pytest.mark.skipif(not library.native_built(), reason="rlhf_engine._C is not built")
def test_bad_inputs_on_the_native_backend_name_the_argument(device):
    # The ops validate before dispatching, so backend='cpp' (CPU) / 'cuda' (GPU) gives the
    # same named error as the other backends, never a crash inside a kernel.
    native = "cuda" if device.type == "cuda" else "cpp"
    if not _backend.native_runs_on(native, device):
        pytest.skip(f"backend {native!r} cannot run here")
    calls = _bad_native_calls(device)
    assert {op for op, *_ in calls} == set(_backend.NATIVE_OPS)
    for op, call, error, name in calls:
        with pytest.raises(error, match=name):
            call(native)
