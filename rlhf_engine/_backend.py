"""Backend registry and selection.

Every op has implementations with identical semantics, named by backend:

* ``"triton"``: the fused kernels in ``rlhf_engine.kernels``. Runs on CUDA tensors, and
  on CPU tensors only under the Triton interpreter (``TRITON_INTERPRET=1``, for tests).
* ``"torch"``: plain PyTorch (``rlhf_engine.torch_backend``); any device.
* ``"cuda"``: hand-written CUDA kernels in ``rlhf_engine._C`` (``csrc/cuda``), for the
  bandwidth-bound ops of ``NATIVE_OPS``; CUDA tensors, when ``_C`` was built with nvcc.
* ``"cpp"``: the C++ host twins of those kernels (``csrc/cpp``, OpenMP); CPU tensors,
  when ``_C`` was built (any C++ compiler).

Selection: an explicit ``backend=`` argument, else the ``RLHF_ENGINE_BACKEND`` environment
variable (``cuda`` / ``cpp`` there apply to ``NATIVE_OPS``; the other ops take auto), else
``"auto"``. Auto picks, on CUDA tensors, ``cuda`` for the ops a committed
GPU measurement shows faster (``AUTO_PREFERS["cuda"]``), else ``triton`` when it imports,
else ``torch``; on the CPU, ``cpp`` for the ops the committed CPU benchmark shows faster
(``AUTO_PREFERS["cpu"]``), else ``torch``. A backend asked for by name that cannot run
raises; it never silently falls back.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import os
import re
from typing import Callable

import torch

BACKENDS = ("triton", "torch", "cuda", "cpp")
BACKEND_CHOICES = ("auto",) + BACKENDS
ENV_VAR = "RLHF_ENGINE_BACKEND"

# The ops with a "cuda" kernel and a "cpp" host twin in rlhf_engine._C; every other op has
# only "triton" and "torch".
NATIVE_OPS = frozenset(
    {"token_logprobs", "policy_loss", "group_advantages", "masked_whiten", "gae", "discounted_returns"}
)

# Ops for which auto picks the native backend of a device type ("cuda" on CUDA tensors,
# "cpp" on CPU ones) over the default, each mapped to the committed benchmark result file
# that shows it faster. Empty for "cuda" until a GPU run measures it:
# auto stays on triton there.
# On the CPU the host twins beat the torch backend at every measured shape for these ops
# (policy_loss 1.4-2.7x, gae / discounted_returns 5-7x); they lose for token_logprobs and
# masked_whiten and are mixed for group_advantages, which stay on torch.
_CPU_BENCH = "benchmarks/results/2026-12-03-native-cpu"
AUTO_PREFERS: dict[str, dict[str, str]] = {
    "cuda": {},
    "cpu": {
        "policy_loss": f"{_CPU_BENCH}/bench_policy_loss.json",
        "gae": f"{_CPU_BENCH}/bench_advantages.json",
        "discounted_returns": f"{_CPU_BENCH}/bench_advantages.json",
    },
}


# Looked up once, without importing triton (so importing rlhf_engine never pulls it in),
# and kept as a plain value so torch.compile traces the dispatch without a cache wrapper.
_TRITON_FOUND = importlib.util.find_spec("triton") is not None


def triton_importable() -> bool:
    """True when the ``triton`` package can be imported."""
    return _TRITON_FOUND


def triton_interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _major_minor(version: str) -> tuple[int, int]:
    parts = re.findall(r"\d+", version)[:2]
    return int(parts[0]), int(parts[1]) if len(parts) > 1 else 0


def interpreter_problem(triton_version: str, numpy_version: str) -> str | None:
    """Why the Triton interpreter of ``triton_version`` cannot run kernels beside
    ``numpy_version``, or None.

    Triton before 3.7 reads a loop bound in the interpreter as ``int()`` of a one-element
    array, which numpy 2.4 rejects ("only 0-dimensional arrays can be converted to Python
    scalars"): every kernel with a loop fails. Compiled kernels on a GPU are unaffected.
    """
    if _major_minor(triton_version) < (3, 7) and _major_minor(numpy_version) >= (2, 4):
        return (
            f"the Triton interpreter of triton {triton_version} does not work with numpy "
            f"{numpy_version} (it needs numpy < 2.4, or triton >= 3.7)"
        )
    return None


def _installed_interpreter_problem() -> str | None:
    if not _TRITON_FOUND:
        return None
    import numpy

    # The module `triton` ships as the distribution "triton", or "pytorch-triton" with
    # torch nightlies; without either's metadata (a source checkout) nothing is known.
    for distribution in ("triton", "pytorch-triton"):
        try:
            return interpreter_problem(importlib.metadata.version(distribution), numpy.__version__)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


# Looked up once at import, a plain value like _TRITON_FOUND (torch.compile traces it).
INTERPRETER_PROBLEM = _installed_interpreter_problem()


def triton_runs_on(device: torch.device) -> bool:
    """Whether the triton backend can run on tensors of ``device``."""
    if not triton_importable():
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and triton_interpreter_on() and INTERPRETER_PROBLEM is None


# Looked up once, without importing it, a plain value like _TRITON_FOUND.
_NATIVE_FOUND = importlib.util.find_spec("rlhf_engine._C") is not None


def native_runs_on(backend: str, device: torch.device) -> bool:
    """Whether ``backend`` (``"cuda"`` or ``"cpp"``) can run on tensors of ``device``:
    ``rlhf_engine._C`` is built (with CUDA, for ``"cuda"``) and the device type matches."""
    if backend == "cpp":
        return device.type == "cpu" and _NATIVE_FOUND
    from rlhf_engine.native.library import built_with_cuda

    return device.type == "cuda" and built_with_cuda()


def _native_problem(backend: str, device: torch.device) -> str:
    wanted = "cpu" if backend == "cpp" else "cuda"
    if device.type != wanted:
        return f"it runs on {wanted} tensors (got {device.type})"
    if not _NATIVE_FOUND:
        return "rlhf_engine._C is not built (install from source with a C++ compiler: `pip install -e .`)"
    return "rlhf_engine._C was built without CUDA (no nvcc at install, or RLHF_ENGINE_SKIP_CUDA_BUILD=1)"


def _auto(op: str, device: torch.device) -> str:
    if device.type == "cuda":
        if op in AUTO_PREFERS["cuda"] and native_runs_on("cuda", device):
            return "cuda"
        return "triton" if triton_runs_on(device) else "torch"
    if device.type == "cpu" and op in AUTO_PREFERS["cpu"] and native_runs_on("cpp", device):
        return "cpp"
    return "torch"


def resolve_backend(op: str, backend: str | None, device: torch.device) -> str:
    """Return the concrete backend (one of ``BACKENDS``) that runs ``op`` on ``device``.

    Raises ``ValueError`` for an unknown name or a native backend ``op`` does not have
    (not in ``NATIVE_OPS``), and ``RuntimeError`` when the backend asked for by name
    cannot run here.
    """
    # "auto" (the ops' default) and None both mean "no preference": the env var decides.
    from_env = backend in (None, "auto")
    requested = os.environ.get(ENV_VAR, "auto") if from_env else backend
    if requested not in BACKEND_CHOICES:
        source = ENV_VAR if from_env else "backend"
        raise ValueError(f"{op}: {source} must be one of {BACKEND_CHOICES}, got {requested!r}")
    if requested in ("cuda", "cpp") and from_env and op not in NATIVE_OPS:
        requested = "auto"  # the environment's choice covers the ops that have it
    if requested == "auto":
        return _auto(op, device)
    if requested in ("cuda", "cpp"):
        if op not in NATIVE_OPS:
            source = ENV_VAR if from_env else "backend"
            raise ValueError(
                f"{op}: {source}={requested!r}: {op} has no {requested} kernel (the ops that do: "
                f"{', '.join(sorted(NATIVE_OPS))}); use 'triton', 'torch' or 'auto'"
            )
        if not native_runs_on(requested, device):
            raise RuntimeError(f"{op}: backend {requested!r} is not available: {_native_problem(requested, device)}")
        return requested
    if requested == "triton" and not triton_runs_on(device):
        if not triton_importable():
            why = "the triton package is not installed"
        elif device.type == "cpu" and triton_interpreter_on():
            why = INTERPRETER_PROBLEM
        else:
            why = (
                f"triton kernels need CUDA tensors (got {device.type}); on the CPU they run "
                "only under the Triton interpreter (TRITON_INTERPRET=1), which is for tests"
            )
        raise RuntimeError(f"{op}: backend 'triton' is not available: {why}")
    return requested


def lazy(module: str, name: str) -> Callable:
    """A callable that imports ``module.name`` on first call.

    Backend tables use it so that importing an op never imports triton.
    """

    @functools.lru_cache(maxsize=1)
    def load() -> Callable:
        return getattr(importlib.import_module(module), name)

    def call(*args, **kwargs):
        return load()(*args, **kwargs)

    call.__name__ = name
    return call


def eager_torch(backend: str) -> bool:
    """True for the torch backend outside ``torch.compile``: the ops then run their bodies
    directly (plain torch code or a classic ``autograd.Function``) instead of their
    ``torch.library`` custom ops, whose dispatch costs 10-50 us a call, as much as the
    whole eager computation at a few thousand tokens on the CPU. ``torch.compile`` still
    traces the custom ops."""
    return backend == "torch" and not torch.compiler.is_compiling()
