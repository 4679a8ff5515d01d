"""The GPU build check (benchmarks/build_check.py): every Triton kernel specialization the
launchers produce at real sizes compiles for sm_80 and sm_90 without a GPU, with no spill
and within each arch's shared memory; and the check can fail.

The check runs in a subprocess without TRITON_INTERPRET: under the interpreter (as make test
runs the other tests) ``@triton.jit`` makes interpreted functions, which cannot be compiled.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_engine._backend import triton_importable

pytestmark = pytest.mark.skipif(not triton_importable(), reason="the build check compiles Triton kernels: needs triton")

HERE = Path(__file__).parent


def _run(code: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton 3.9 warns unless the (default) choice is explicit
    return subprocess.run([sys.executable, "-c", code], cwd=HERE, env=env, capture_output=True, text=True, timeout=timeout)


# The kernels of every launcher module: their @triton.jit functions named *_kernel (the
# others, such as online_lse_rescale, are device functions they call).
KERNELS = """
import json, sys, triton
from rlhf_engine.kernels import advantages, fused_linear, gae, kl, logprobs, policy_loss, value_loss
modules = (advantages, fused_linear, gae, kl, logprobs, policy_loss, value_loss)
names = sorted({v.__name__ for m in modules for v in vars(m).values()
                if isinstance(v, triton.runtime.jit.JITFunction) and v.__name__.endswith("_kernel")})
json.dump(names, open(sys.argv[1], "w"))
"""


def test_every_kernel_compiles_for_sm80_and_sm90_without_spills(tmp_path):
    out, kernels = tmp_path / "build_check.json", tmp_path / "kernels.json"
    listed = _run(f"import sys; sys.argv = ['list', {str(kernels)!r}]\n" + KERNELS)
    assert listed.returncode == 0, listed.stderr[-3000:]
    done = _run(f"import sys; sys.argv = ['build_check', '--out', {str(out)!r}]\n"
                "from rlhf_engine.benchmarks.build_check import main; main()")  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    triton_rows = [r for r in rows if not r["module"].startswith("csrc/")]
    assert {r["arch"] for r in triton_rows} == {"sm_80", "sm_90"}
    assert all(r["error"] is None and r["spill_stores"] == 0 and r["spill_loads"] == 0 for r in rows)
    assert all(0 < r["registers"] <= 255 for r in rows)
    expected = set(json.loads(kernels.read_text()))
    assert len(expected) >= 10 and expected <= {r["kernel"] for r in rows}, expected - {r["kernel"] for r in rows}
    # Every __global__ function of csrc/cuda compiled for both arches.
    cuda_rows = [r for r in rows if r["module"].startswith("csrc/cuda/")]
    assert {r["arch"] for r in cuda_rows} == {"sm_80", "sm_90a"}
    for source in sorted((HERE.parent / "csrc" / "cuda").glob("*.cu")):
        declared = set(re.findall(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)", source.read_text()))
        compiled = {r["kernel"] for r in cuda_rows if r["module"] == f"csrc/cuda/{source.name}"}
        assert declared <= compiled, (source.name, declared - compiled)


def test_the_check_fails_on_a_kernel_the_interpreter_runs_and_no_gpu_can_launch():
    # Its pipelined fp32 operand tiles need 768 KiB of shared memory on sm_80 (a block may use
    # 163 KiB) and spill. (Triton 3.9 compiles tl.dot on 8 x 8 tiles, so that is no such kernel.)
    code = """
import torch, build_check_negative_kernel as k
from rlhf_engine.benchmarks.build_check import META, compile_one, failures, recording
launches = []
with recording(launches):
    k.launch(torch.empty(256, 256, device=META), torch.empty(256, 256, device=META))
rows = [compile_one(launches[0], arch) for arch in (80, 90)]
print("\\n".join(failures(rows)))
"""
    done = _run(code)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert any("sm_80" in l and "shared memory" in l for l in lines), lines
    assert any("sm_90" in l and "shared memory" in l for l in lines), lines
    assert any("spills" in l for l in lines), lines
    # And the interpreter runs it (what the CPU tests alone would have let through).
    interp = subprocess.run(
        [sys.executable, "-c", "import torch, build_check_negative_kernel as k; a = torch.randn(256, 256); "
         "print(torch.allclose(k.launch(a, a), a @ a, atol=1e-2))"],
        cwd=HERE, env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert interp.stdout.strip().endswith("True"), interp.stderr[-2000:]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="the CUDA half of the check needs nvcc")
def test_the_cuda_check_reports_a_compile_error_and_a_spill(tmp_path):
    from rlhf_engine.benchmarks.build_check import failures
    from rlhf_engine.benchmarks.build_check_cuda import check_cuda

    broken = tmp_path / "broken.cu"
    broken.write_text("__global__ void k(float* x) { x[threadIdx.x] = undefined_name; }\n")
    # 96 values live at once in a kernel held to 32 registers (1024 threads, 2 blocks an SM).
    spilling = tmp_path / "spilling.cu"
    spilling.write_text(
        "__global__ void __launch_bounds__(1024, 2) k(float* x, int n) {\n"
        "  float v[96];\n"
        "#pragma unroll\n"
        "  for (int i = 0; i < 96; ++i) v[i] = x[i * n + threadIdx.x];\n"
        "  float s = 0;\n"
        "#pragma unroll\n"
        "  for (int i = 0; i < 96; ++i) s += v[i] * v[95 - i] * x[(i + 96) * n];\n"
        "  x[threadIdx.x] = s;\n}\n"
    )
    rows = check_cuda((80,), [broken, spilling])
    bad = failures(rows)
    assert any("nvcc failed" in line and "undefined_name" in line for line in bad), bad
    assert any("sm_80" in line and "spills" in line for line in bad), (bad, rows)


def test_failures_names_compile_errors_shared_memory_and_spills():
    from rlhf_engine.benchmarks.build_check import failures

    ok = dict(kernel="k", specialization="k[fp32]()", arch="sm_80", registers=40, spill_stores=0, spill_loads=0,
              shared_bytes=1024, error=None)  # fmt: skip
    assert failures([ok]) == []
    assert "boom" in failures([{**ok, "error": "CompilationError: boom"}])[0]
    assert "spills 8 B stored" in failures([{**ok, "spill_stores": 8}])[0]
    assert "over the 166912 B" in failures([{**ok, "shared_bytes": 200 * 1024}])[0]
    assert failures([{**ok, "arch": "sm_90", "shared_bytes": 200 * 1024}]) == []  # H100 gives a block 227 KiB


@pytest.mark.skipif(shutil.which("c++filt") is None, reason="no c++filt: ptxas names stay mangled")
def test_ptxas_rows_name_template_kernels_by_their_function():
    # A kernel template with several arguments demangles to "f<A, 256, false>(...)": the
    # row's kernel is "f", not the tail of its argument list.
    from rlhf_engine.benchmarks.build_check_cuda import parse_ptxas

    mangled = ("_ZN4rlhf4cuda44_GLOBAL__N__0fa44d2a_11_logprobs_cu_08cb8d6a25token_logprobs_fwd_kernelINS_8logprobs"
               "3F16ELi256ELb0EEEvPKNT_7StorageENS3_9RowLayoutEllNS_2InEPfSB_SB_ffl")  # fmt: skip
    text = (f"ptxas info    : Compiling entry function '{mangled}' for 'sm_80'\n"
            "    0 bytes stack frame, 4 bytes spill stores, 8 bytes spill loads\n"
            "ptxas info    : Used 32 registers, used 1 barriers, 128 bytes smem, 456 bytes cmem[0]\n")  # fmt: skip
    (row,) = parse_ptxas(text, "csrc/cuda/logprobs.cu")
    assert row["kernel"] == "token_logprobs_fwd_kernel"
    assert "256" in row["specialization"]
    assert (row["registers"], row["spill_stores"], row["spill_loads"], row["shared_bytes"]) == (32, 4, 8, 128)
