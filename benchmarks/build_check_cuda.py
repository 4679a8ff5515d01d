"""The CUDA half of the GPU build check: every ``csrc/cuda/*.cu`` compiled for ``sm_80`` and
``sm_90a`` with ``nvcc -cubin -Xptxas -v`` (no GPU needed), with each kernel's registers,
spills and static shared memory as ``ptxas`` reports them.

Rows have the fields of the Triton rows of :mod:`build_check` (``kernel``, ``module``,
``specialization``, ``arch``, ``registers``, ``spill_stores``, ``spill_loads``,
``shared_bytes``, ``seconds``, ``error``), one per kernel instantiation (a template kernel
gives one row per element type); a file that fails to compile gives one row with the error.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

# The repository's csrc/ (this file is benchmarks/build_check_cuda.py, or installed from it
# in editable mode); a wheel install has no csrc/, and the check says so.
CSRC = Path(__file__).resolve().parent.parent / "csrc"
NVCC_FLAGS = ["-std=c++17", "-O3", "--use_fast_math"]

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_USAGE = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def cuda_target(arch: int) -> str:
    """``sm_90a`` for Hopper (its wgmma/TMA instructions need the arch-specific target, as
    ``setup.py``'s default ``9.0a``), ``sm_<arch>`` otherwise."""
    return f"sm_{arch}a" if arch == 90 else f"sm_{arch}"


def _demangle(names: list[str]) -> list[str]:
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None:
        return names
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True)
    demangled = out.stdout.splitlines()
    return demangled if out.returncode == 0 and len(demangled) == len(names) else names


def parse_ptxas(text: str, module: str) -> list[dict]:
    """The per-kernel rows of ``nvcc -Xptxas -v`` output for one file and arch."""
    rows = []
    for line in text.splitlines():
        if entry := _ENTRY.search(line):
            rows.append({"mangled": entry.group(1), "arch": entry.group(2), "module": module,
                         "registers": 0, "spill_stores": 0, "spill_loads": 0, "shared_bytes": 0, "error": None})
        elif rows and (spills := _SPILLS.search(line)):
            rows[-1]["spill_stores"], rows[-1]["spill_loads"] = int(spills.group(1)), int(spills.group(2))
        elif rows and (usage := _USAGE.search(line)):
            rows[-1]["registers"] = int(usage.group(1))
            rows[-1]["shared_bytes"] = int(usage.group(2) or 0)
    for row, name in zip(rows, _demangle([r.pop("mangled") for r in rows])):
        # "void rlhf::cuda::(anonymous namespace)::row_max<float>(...)" -> kernel "row_max"
        row["specialization"] = name = name.replace("(anonymous namespace)::", "")
        # (template arguments go first: "f<E, 256, false>" holds spaces)
        row["kernel"] = re.sub(r"<.*", "", name.split("(")[0]).split(" ")[-1].split("::")[-1]
    return rows


def compile_file(source: Path, arch: int, nvcc: str) -> list[dict]:
    """Compile one ``.cu`` for ``arch`` -> its kernels' rows (or one error row)."""
    module = str(source.relative_to(CSRC.parent)) if source.is_relative_to(CSRC.parent) else str(source)
    start = time.perf_counter()
    command = [nvcc, *NVCC_FLAGS, f"-I{CSRC / 'include'}", f"-arch={cuda_target(arch)}", "-cubin", "-Xptxas", "-v",
               "-o", "/dev/null", str(source)]  # fmt: skip
    out = subprocess.run(command, capture_output=True, text=True)
    seconds = round(time.perf_counter() - start, 2)
    if out.returncode != 0:
        return [{"kernel": source.stem, "module": module, "specialization": source.name, "arch": cuda_target(arch),
                 "registers": None, "spill_stores": None, "spill_loads": None, "shared_bytes": None,
                 "seconds": seconds, "error": f"nvcc failed: {out.stderr.strip()[-600:]}"}]  # fmt: skip
    rows = parse_ptxas(out.stderr + out.stdout, module)
    for row in rows:
        row["seconds"] = seconds
    return rows


def check_cuda(archs, sources: list[Path] | None = None) -> list[dict]:
    """Rows for every kernel of ``sources`` (default: every ``csrc/cuda/*.cu``) on every arch.
    ``RuntimeError`` without nvcc or without csrc/ (nothing could be checked)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise RuntimeError("build_check: nvcc not found on PATH, so the CUDA kernels cannot be compiled")
    if sources is None:
        if not CSRC.is_dir():
            raise RuntimeError(f"build_check: {CSRC} not found (the CUDA check runs in a source checkout)")
        sources = sorted((CSRC / "cuda").glob("*.cu"))
    return [row for arch in archs for source in sources for row in compile_file(source, arch, nvcc)]
