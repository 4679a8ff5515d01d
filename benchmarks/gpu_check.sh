#!/usr/bin/env bash
# One GPU session's checks in one command (for the device machine: torch, triton and
# pytest preinstalled, no internet): install, run the GPU tests and the whole suite on
# CUDA, then the full-size benchmarks. JSON lands in ${OUT:-bench-out}; the table prints last.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench-out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"
# The install builds rlhf_engine._C (pybind11 headers from torch if pybind11 is absent); the
# cuda backend's tests and benchmark rows need its CUDA part.
python3 -c "import rlhf_engine._C as C; print('rlhf_engine._C built_with_cuda =', C.built_with_cuda)" 2>&1 | tee "$out/native.log"
python3 -m pytest -q -m gpu tests 2>&1 | tee "$out/pytest-gpu.log" | tail -n 30
python3 -m pytest -q -x -m "not gpu" tests 2>&1 | tee "$out/pytest-all.log" | tail -n 15
rlhf-engine bench --out "$out" --only advantages fused_linear logprobs policy_loss train_step trl_grpo 2>&1 | tee "$out/bench.log"
# Issue 15's GPU check: FSDP2 at one rank (train --nproc 1) against the plain process, step times.
python3 -m rlhf_engine.benchmarks.fsdp_one_rank --device cuda 2>&1 | tee "$out/fsdp_one_rank.json"
