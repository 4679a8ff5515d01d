"""Packaging and import rules: no GPU at import, kernels installed only as
``rlhf_engine.kernels``, explicit backend selection with clear errors."""

import importlib.metadata
import os
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch

from rlhf_engine import _backend, _checks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(code: str, cwd, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120, env={**os.environ, **env}
    )


def test_import_touches_no_gpu(tmp_path):
    # Run outside the repo so only the installed package is importable.
    code = (
        "import torch, rlhf_engine, rlhf_engine.ops\n"
        "assert not torch.cuda.is_initialized(), 'CUDA initialised at import'\n"
        "print(rlhf_engine.__version__)"
    )
    out = _python(code, tmp_path, CUDA_VISIBLE_DEVICES="")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0.1.0"


def test_kernels_are_a_subpackage_not_a_top_level_module(tmp_path):
    code = (
        "import importlib.util, rlhf_engine.kernels, rlhf_engine.benchmarks\n"
        "assert importlib.util.find_spec('benchmarks') is None, 'a top-level benchmarks module is importable'\n"
        "print(rlhf_engine.kernels.__file__)"
    )
    out = _python(code, tmp_path)
    assert out.returncode == 0, out.stderr
    assert os.path.dirname(out.stdout.strip()) == os.path.join(REPO, "rlhf_engine", "kernels")


def test_the_repository_root_shadows_no_installed_package():
    # From the root of a checkout (as pytest and a user's `python -c` see it), no folder of
    # ours may stand in for a package a dependency imports: transformers imports the hub's
    # `kernels` package when it is installed (transformers 5.25 requires it), which a
    # top-level kernels/ folder used to shadow, breaking every model import.
    # (verl's wheel installs a top-level `tests` too: tests/conftest.py handles that one.)
    ours = {
        name for name in os.listdir(REPO)
        if os.path.exists(os.path.join(REPO, name, "__init__.py")) and name not in ("rlhf_engine", "tests")
    }
    installed = set(importlib.metadata.packages_distributions())
    assert not ours & installed, f"top-level folders named like installed packages: {sorted(ours & installed)}"
    out = _python("import transformers.activations; print('ok')", REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_wheel_holds_only_the_rlhf_engine_package(tmp_path):
    # A real (non-editable) build: `pip install .` must install benchmarks/ as rlhf_engine/benchmarks/.
    # Built from a copy so the in-tree build folder never lands in the checkout.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(os.path.join(REPO, name), src / name)
    for name in ("rlhf_engine", "benchmarks"):
        shutil.copytree(os.path.join(REPO, name), src / name, ignore=shutil.ignore_patterns("__pycache__", "results"))
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(src)],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    (wheel,) = [f for f in os.listdir(tmp_path) if f.endswith(".whl")]
    names = zipfile.ZipFile(tmp_path / wheel).namelist()
    top_level = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top_level == {"rlhf_engine"}, top_level
    assert "rlhf_engine/kernels/__init__.py" in names
    assert "rlhf_engine/benchmarks/common.py" in names


def test_auto_backend_is_torch_on_cpu(monkeypatch):
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    assert _backend.resolve_backend("op", None, torch.device("cpu")) == "torch"
    assert _backend.resolve_backend("op", "auto", torch.device("cpu")) == "torch"


def test_env_var_picks_the_backend_and_argument_wins(monkeypatch):
    monkeypatch.setenv(_backend.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match="RLHF_ENGINE_BACKEND"):
        _backend.resolve_backend("op", None, torch.device("cpu"))
    assert _backend.resolve_backend("op", "torch", torch.device("cpu")) == "torch"
    monkeypatch.setenv(_backend.ENV_VAR, "torch")
    assert _backend.resolve_backend("op", "auto", torch.device("cpu")) == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv(_backend.ENV_VAR, "triton")
    with pytest.raises(RuntimeError, match="backend 'triton' is not available"):
        _backend.resolve_backend("op", "auto", torch.device("cpu"))


def test_unknown_backend_name_raises():
    with pytest.raises(ValueError, match="backend must be one of"):
        _backend.resolve_backend("token_logprobs", "cuda-magic", torch.device("cpu"))


def test_triton_on_cpu_without_interpreter_raises_instead_of_falling_back(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="backend 'triton' is not available"):
        _backend.resolve_backend("token_logprobs", "triton", torch.device("cpu"))


@pytest.mark.parametrize(
    "triton_version, numpy_version, usable",
    [("3.6.0", "2.4.6", False), ("3.6.0", "2.3.5", True), ("3.7.0", "2.4.6", True), ("3.10.1", "3.0.0", True)],
)
def test_interpreter_rejects_triton_before_3_7_with_numpy_2_4(monkeypatch, triton_version, numpy_version, usable):
    # Triton < 3.7's interpreter does int() on one-element arrays, an error from numpy 2.4:
    # asking for it then names the versions instead of failing inside every kernel.
    problem = _backend.interpreter_problem(triton_version, numpy_version)
    assert (problem is None) == usable
    monkeypatch.setattr(_backend, "INTERPRETER_PROBLEM", problem)
    monkeypatch.setattr(_backend, "triton_importable", lambda: True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if usable:
        assert _backend.resolve_backend("gae", "triton", torch.device("cpu")) == "triton"
    else:
        with pytest.raises(RuntimeError, match=f"triton {triton_version} does not work with numpy {numpy_version}"):
            _backend.resolve_backend("gae", "triton", torch.device("cpu"))


def test_triton_without_distribution_metadata_is_no_problem(monkeypatch):
    # `triton` may come as "pytorch-triton" or from a source checkout: looking its version
    # up must never make `import rlhf_engine` fail.
    import importlib.metadata

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    monkeypatch.setattr(_backend, "_TRITON_FOUND", True)
    assert _backend._installed_interpreter_problem() is None


def test_checks_name_the_argument():
    with pytest.raises(TypeError, match="op: x must be a torch.Tensor"):
        _checks.check_tensor("op", "x", [1.0])
    with pytest.raises(TypeError, match="op: x must have dtype"):
        _checks.check_tensor("op", "x", torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="op: y must have the shape of x"):
        _checks.check_same_shape("op", "x", torch.zeros(2), y=torch.zeros(3))
    with pytest.raises(ValueError, match="op: mode must be one of"):
        _checks.check_choice("op", "mode", "c", ("a", "b"))
    with pytest.raises(ValueError, match="op: gamma must be > 0"):
        _checks.check_number("op", "gamma", 0.0, positive=True)
    with pytest.raises(TypeError, match="op: gamma must be a number"):
        _checks.check_number("op", "gamma", "0.9")
    with pytest.raises(ValueError, match="cu_seqlens must rise from 0"):
        _checks.check_cu_seqlens("op", torch.tensor([0, 3, 2], dtype=torch.int32), 2, torch.device("cpu"))
