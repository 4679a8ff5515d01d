"""Test setup: without CUDA, Triton kernels run on CPU tensors through the interpreter.

TRITON_INTERPRET must be set before any @triton.jit function is defined, so it is set
here, before the tests import rlhf_engine.kernels.
"""

import importlib.util
import os
import random
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from rlhf_engine._backend import (  # noqa: E402
    INTERPRETER_PROBLEM,
    native_runs_on,
    triton_importable,
    triton_interpreter_on,
    triton_runs_on,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# A regular package named `tests` elsewhere on the path (verl 0.9.1's wheel installs one
# into site-packages) shadows this directory, and every `from tests.tolerance import ...`
# would fail with a puzzling ModuleNotFoundError: say what it is instead.
_TESTS_SPEC = importlib.util.find_spec("tests")
if _TESTS_SPEC is not None and _TESTS_SPEC.origin and not _TESTS_SPEC.origin.startswith(os.path.dirname(__file__)):
    raise ImportError(
        f"the module 'tests' is {_TESTS_SPEC.origin}, not this directory: run pytest from the repository root "
        "(`make test`), where this regular package comes first (verl 0.9.1's wheel installs another top-level "
        "`tests` into site-packages)"
    )

# Fresh random inputs on every run; the run's seed is printed in the header, and
# RLHF_ENGINE_TEST_SEED=<seed> replays a failing run exactly.
RUN_SEED = int(os.environ.get("RLHF_ENGINE_TEST_SEED", random.randrange(2**31)))


def pytest_report_header(config):
    return f"rlhf_engine test seed: RLHF_ENGINE_TEST_SEED={RUN_SEED}"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    # Also at the end: `make test` runs pytest -q, which hides the header, and a failure
    # on fresh random inputs is replayed only with its seed.
    terminalreporter.write_line(f"rlhf_engine test seed: RLHF_ENGINE_TEST_SEED={RUN_SEED}")


def backends_here(native: bool = False):
    """The backends to test on this machine's test device: torch, and triton where it runs
    or where only the interpreter's package versions stop it (those tests are skipped with
    the reason, not dropped unseen); with ``native``, also the one of ``cpp`` (CPU) /
    ``cuda`` (GPU) that runs here (``tests/test_native.py`` fails if ``_C`` was not built)."""
    interpreter_wanted = DEVICE.type == "cpu" and triton_importable() and triton_interpreter_on()
    found = ["torch"] + (["triton"] if triton_runs_on(DEVICE) or interpreter_wanted else [])
    if native:
        found += [name for name in ("cpp", "cuda") if native_runs_on(name, DEVICE)]
    return found


def _parametrizes_itself(metafunc, name: str) -> bool:
    for marker in metafunc.definition.iter_markers("parametrize"):
        names = marker.args[0]
        if isinstance(names, str):
            names = [part.strip() for part in names.split(",")]
        if name in names:
            return True
    return False


def pytest_generate_tests(metafunc):
    # A test module whose ops all have the native backends sets NATIVE_BACKENDS = True: its
    # `backend` tests then also run on cpp (CPU) or cuda (GPU).
    # A test that parametrizes `backend` itself (e.g. "auto") keeps its own values.
    if "backend" in metafunc.fixturenames and not _parametrizes_itself(metafunc, "backend"):
        native = getattr(metafunc.module, "NATIVE_BACKENDS", False)
        metafunc.parametrize("backend", backends_here(native), indirect=True)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; run `pytest -m gpu` on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def backend(request):
    """Each backend that runs here (torch always; triton on CUDA or under the interpreter;
    cpp / cuda for modules with ``NATIVE_BACKENDS``), parametrized by pytest_generate_tests."""
    if request.param == "triton" and DEVICE.type == "cpu" and INTERPRETER_PROBLEM:
        pytest.skip(INTERPRETER_PROBLEM)
    return request.param


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed(request):
    # Each test its own stream, from the run seed and the test's name.
    torch.manual_seed((RUN_SEED + zlib.crc32(request.node.nodeid.encode())) % (2**31))


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of tiny-model tests (restored after it): tiny matmuls
    gain nothing from threads, and on a busy machine OpenMP spin-waiting made each one
    ~100x slower. Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
