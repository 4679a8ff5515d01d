"""Shared benchmark harness: roofline floor, timing, peak memory, table and JSON.

Every benchmark states its floor before it measures: the fewest bytes the op must move
(each input read once, each output written once) over the measured copy bandwidth, and
its FLOPs over the measured matmul rate; the larger of the two is the floor. Both rates
are measured once per run on the device at hand rather than trusted from a datasheet.

A benchmark module exposes ``run(device: torch.device, quick: bool) -> list[Result]``;
it builds inputs once and times every implementation on the same inputs with
:func:`measure`.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import importlib
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import time
from typing import Callable

import torch


@dataclasses.dataclass(frozen=True)
class Machine:
    device: str
    copy_bytes_per_s: float  # bytes read + written per second by a large device-to-device copy
    matmul_flops_per_s: float  # dense matmul rate in the benchmark's dtype


@dataclasses.dataclass
class Result:
    op: str
    impl: str
    shape: str
    ms: float | None
    floor_ms: float
    bytes_moved: int
    flops: int
    peak_mem_bytes: int | None
    error: str | None = None

    @property
    def gbps(self) -> float | None:
        return None if not self.ms else self.bytes_moved / (self.ms * 1e-3) / 1e9

    @property
    def tflops(self) -> float | None:
        return None if not self.ms or not self.flops else self.flops / (self.ms * 1e-3) / 1e12

    @property
    def floor_fraction(self) -> float | None:
        return None if not self.ms else self.floor_ms / self.ms

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(gbps=self.gbps, tflops=self.tflops, floor_fraction=self.floor_fraction)
        return d


def our_backends(device: torch.device, op: str) -> list[str]:
    """Our backends to time for ``op`` on ``device``, side by side in one run: triton and
    torch on CUDA, torch on the CPU (the Triton interpreter is for tests, not timing), and
    the native one of the device (cuda / cpp) where ``op`` has it and ``rlhf_engine._C`` was
    built with it."""
    from rlhf_engine._backend import NATIVE_OPS, native_runs_on, triton_runs_on

    found = (["triton"] if device.type == "cuda" and triton_runs_on(device) else []) + ["torch"]
    native = "cuda" if device.type == "cuda" else "cpp"
    if op in NATIVE_OPS and native_runs_on(native, device):
        found.append(native)
    return found


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# CPU timing budget per row, in seconds: warm-up, then as many timed calls as fit (at
# least CPU_MIN_CALLS). A call of a few microseconds needs thousands of samples before its
# median settles; a handful after one warm-up call mostly measures cold caches.
CPU_BUDGET_S = {False: 0.25, True: 0.02}
CPU_MIN_CALLS = {False: 10, True: 3}


def time_ms(fn: Callable[[], object], device: torch.device, quick: bool = False) -> float:
    """Median wall time of ``fn()`` in milliseconds (``triton.testing.do_bench`` on CUDA;
    on the CPU, single calls timed for ``CPU_BUDGET_S`` after a warm-up of a fifth of it)."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=10 if quick else 25, rep=30 if quick else 100, return_mode="median"))
    budget = CPU_BUDGET_S[quick]
    fn()  # compilation, for compiled callables
    warm_until = time.perf_counter() + budget / 5
    while time.perf_counter() < warm_until:
        fn()
    times = []
    deadline = time.perf_counter() + budget
    while len(times) < CPU_MIN_CALLS[quick] or time.perf_counter() < deadline:
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


@functools.lru_cache(maxsize=None)
def measure_machine(device: torch.device, dtype: torch.dtype = torch.bfloat16, quick: bool = False) -> Machine:
    """Measure copy bandwidth and matmul rate once per (device, dtype)."""
    n_bytes = (256 << 20) if device.type == "cuda" and not quick else (32 << 20)
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    copy_ms = time_ms(lambda: dst.copy_(src), device, quick)
    size = 8192 if device.type == "cuda" and not quick else 512
    mm_dtype = dtype if device.type == "cuda" else torch.float32
    a = torch.randn(size, size, device=device, dtype=mm_dtype)
    b = torch.randn(size, size, device=device, dtype=mm_dtype)
    mm_ms = time_ms(lambda: a @ b, device, quick)
    return Machine(
        device=device_name(device),
        copy_bytes_per_s=2 * n_bytes / (copy_ms * 1e-3),
        matmul_flops_per_s=2 * size**3 / (mm_ms * 1e-3),
    )


def floor_ms(machine: Machine, bytes_moved: int, flops: int = 0) -> float:
    return 1e3 * max(bytes_moved / machine.copy_bytes_per_s, flops / machine.matmul_flops_per_s)


def cpu_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak CPU bytes allocated while ``fn()`` runs, above what was allocated before: the
    running sum, in time order, of every allocation (+size) and free (-size) the profiler
    records. Read from the profiler's event tree, where each allocation is its own event;
    the per-op ``cpu_memory_usage`` of ``prof.events()`` is summed per op (net of frees
    inside it), which hides a temporary that lives only inside one op."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    deltas, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == _EventType.Allocation:
            deltas.append((event.start_time_ns, event.extra_fields.alloc_size))
    if not deltas:
        raise RuntimeError("cpu_peak_bytes: the profiler recorded no allocation")
    running = peak = 0
    for _, delta in sorted(deltas):
        running += delta
        peak = max(peak, running)
    return peak


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak memory allocated while ``fn()`` runs, above what was allocated before: CUDA's
    allocator statistics, or on the CPU the profiler's allocation events (:func:`cpu_peak_bytes`)."""
    if device.type == "cpu":
        return cpu_peak_bytes(fn)
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    _sync(device)
    return torch.cuda.max_memory_allocated(device) - before


def measure(
    op: str,
    shape: str,
    impls: dict[str, Callable[[], object]],
    *,
    device: torch.device,
    bytes_moved: int,
    flops: int = 0,
    quick: bool = False,
    dtype: torch.dtype = torch.bfloat16,
) -> list[Result]:
    """Time every implementation in ``impls`` (zero-argument callables on shared inputs).

    An implementation that raises (a compile failure, an out-of-memory) is reported with
    its error instead of a time, so one failure does not hide the other rows.
    """
    machine = measure_machine(device, dtype, quick)
    floor = floor_ms(machine, bytes_moved, flops)
    results = []
    for impl, fn in impls.items():
        try:
            ms = time_ms(fn, device, quick)
            peak = peak_memory_bytes(fn, device)
            results.append(Result(op, impl, shape, ms, floor, bytes_moved, flops, peak))
        except Exception as exc:  # reported in the table, never swallowed silently
            results.append(Result(op, impl, shape, None, floor, bytes_moved, flops, None, error=f"{type(exc).__name__}: {exc}"[:200]))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def sweep(run_at: Callable[..., list[Result]], device: torch.device, quick: bool, *, small, cuda, cpu: list) -> list[Result]:
    """``run_at(device, quick, *size)`` over one benchmark's sizes: ``small`` for
    ``--quick``, ``cuda`` on a GPU, and on the CPU each of ``cpu`` (a sweep from the small
    end up: the torch backend's fixed per-call cost shows only there). A size is a tuple
    of arguments or a single one."""
    sizes = [small] if quick else [cuda] if device.type == "cuda" else cpu
    return [r for size in sizes for r in run_at(device, quick, *(size if isinstance(size, tuple) else (size,)))]


def compiled(fn: Callable) -> Callable:
    """``torch.compile`` of the eager code, as a user of TRL/verl would get it."""
    return torch.compile(fn, dynamic=False)


def liger_installed() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def format_table(results: list[Result]) -> str:
    header = f"{'op':<22} {'impl':<26} {'shape':<28} {'ms':>9} {'GB/s':>8} {'TFLOP/s':>8} {'floor':>6} {'peak MiB':>9}"
    lines = [header, "-" * len(header)]
    for r in results:
        if r.error:
            lines.append(f"{r.op:<22} {r.impl:<26} {r.shape:<28} {'error: ' + r.error}")
            continue
        tf = f"{r.tflops:8.1f}" if r.tflops else f"{'-':>8}"
        peak = f"{r.peak_mem_bytes / 2**20:9.1f}" if r.peak_mem_bytes is not None else f"{'-':>9}"
        lines.append(
            f"{r.op:<22} {r.impl:<26} {r.shape:<28} {r.ms:9.3f} {r.gbps:8.1f} {tf} {r.floor_fraction:6.2f} {peak}"
        )
    return "\n".join(lines)


def git_commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_json(results: list[Result], path: str, device: torch.device, quick: bool) -> None:
    machine = measure_machine(device, torch.bfloat16, quick)
    payload = {
        "device": machine.device,
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "quick": quick,
        "threads": torch.get_num_threads(),  # CPU results depend on it
        "torch": torch.__version__,
        "triton": _version_of("triton"),
        "copy_gbps": machine.copy_bytes_per_s / 1e9,
        "matmul_tflops": machine.matmul_flops_per_s / 1e12,
        "results": [r.as_dict() for r in results],
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)


def _version_of(package: str) -> str | None:
    try:
        return importlib.import_module(package).__version__
    except ImportError:
        return None


def script_main(run: Callable[[torch.device, bool], list[Result]], description: str) -> None:
    """Command line of a ``bench_*.py`` module run as a script:
    ``[--quick] [--out FILE.json] [--device DEV]``."""
    import argparse

    parser = argparse.ArgumentParser(description=description.strip().splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, few repetitions")
    parser.add_argument("--out", help="write the results as JSON to this file")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    results = run(device, args.quick)
    print(format_table(results))
    if args.out:
        write_json(results, args.out, device, args.quick)
