"""Loading ``rlhf_engine._C`` and passing tensors to it.

``_C`` is optional: ``pip install`` skips it without a C++ compiler (and its CUDA part
without ``nvcc``). Nothing here imports it until an op runs on a native backend.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util

import torch
from torch._subclasses.fake_tensor import FakeTensor

MODULE = "rlhf_engine._C"

# Element type codes of csrc/include/rlhf/elements.h (enum DType).
DTYPE_CODES = {
    torch.float32: 0,
    torch.float16: 1,
    torch.bfloat16: 2,
    torch.float64: 3,
    torch.bool: 4,
    torch.uint8: 4,
    torch.int32: 5,
    torch.int64: 6,
}

# An absent optional tensor: address 0 (the kernels read it only behind a flag).
ABSENT = (0, 0)


def native_built() -> bool:
    """True when ``rlhf_engine._C`` was built (looked up without importing it)."""
    return importlib.util.find_spec(MODULE) is not None


@functools.lru_cache(maxsize=1)
def module():
    """The imported ``rlhf_engine._C``; ``RuntimeError`` saying how to build it if missing."""
    try:
        return importlib.import_module(MODULE)
    except ImportError as error:
        raise RuntimeError(
            f"{MODULE} is not built, so backends 'cpp' and 'cuda' are unavailable: reinstall rlhf_engine "
            "from source with a C++ compiler (and nvcc for 'cuda'), e.g. `pip install -e .` "
            f"({error})"
        ) from error


def built_with_cuda() -> bool:
    """True when ``_C`` exists and holds the CUDA kernels (built with nvcc)."""
    return native_built() and bool(module().built_with_cuda)


def ref(t: torch.Tensor | None) -> tuple[int, int]:
    """``(address, dtype code)`` of a tensor for ``_C`` (``ABSENT`` for None). The kernels
    address elements from it, so ``t`` must be contiguous where flat indexing is meant."""
    if t is None:
        return ABSENT
    if isinstance(t, FakeTensor) or t.device.type == "meta":
        # Their data_ptr() is no memory a kernel may touch: refuse here rather than crash.
        raise RuntimeError(
            f"rlhf_engine._C: a native kernel was called on a {'fake' if isinstance(t, FakeTensor) else 'meta'} "
            "tensor, which has no data; the ops' fake kernels (their torch.library registrations) handle those"
        )
    return t.data_ptr(), DTYPE_CODES[t.dtype]


def launch(name: str, device: torch.device, *args) -> None:
    """Run ``_C.<name>_cpu(*args, threads)`` for a CPU ``device`` or
    ``_C.<name>_cuda(*args, device index, stream)`` for a CUDA one (torch's current
    stream, so the work is ordered with torch's own)."""
    lib = module()
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        getattr(lib, f"{name}_cuda")(*args, index, torch.cuda.current_stream(index).cuda_stream)
    else:
        getattr(lib, f"{name}_cpu")(*args, torch.get_num_threads())


def workspace(name: str, device: torch.device) -> torch.Tensor | None:
    """The fp32 device workspace a CUDA entry point needs (``_C.<NAME>_CUDA_WORKSPACE``
    floats), or None on the CPU, whose host twins allocate their own."""
    if device.type != "cuda":
        return None
    return torch.empty(getattr(module(), f"{name.upper()}_CUDA_WORKSPACE"), dtype=torch.float32, device=device)
