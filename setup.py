"""Package layout and the native extension ``rlhf_engine._C``.

Layout: the Triton kernels live in ``rlhf_engine/kernels/``; the top-level ``benchmarks/``
folder installs as ``rlhf_engine.benchmarks`` (never as a top-level package).
Metadata lives in pyproject.toml.

``rlhf_engine._C`` (``csrc/``) holds the C++ host twins (backend ``cpp``) and, when
``nvcc`` is found, the CUDA kernels (backend ``cuda``). It links no libtorch and the CUDA
runtime statically, so one build works with any torch. The build never fails the install:

* no C++ compiler (or pybind11): the module is skipped, with a message; the Triton and
  torch backends still work;
* no ``nvcc`` (looked up as ``$CUDA_HOME/bin/nvcc``, then on ``PATH``), or
  ``RLHF_ENGINE_SKIP_CUDA_BUILD=1``: the host twins only; the CUDA entry points raise;
* ``TORCH_CUDA_ARCH_LIST`` (default ``8.0;9.0a``): the GPU architectures compiled, as
  ``X.Y``, ``X.Ya`` or with ``+PTX`` to embed PTX too. No GPU is probed at install.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ENGINE_PACKAGES = find_packages(include=["rlhf_engine", "rlhf_engine.*"])
DEFAULT_CUDA_ARCHS = "8.0;9.0a"
CXX_FLAGS = ["-std=c++17", "-O3", "-fopenmp", "-fvisibility=hidden"]
NVCC_FLAGS = ["-std=c++17", "-O3", "--use_fast_math", "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden"]


def _say(message: str) -> None:
    print(f"rlhf_engine build: {message}", file=sys.stderr)


def find_nvcc() -> str | None:
    """``$CUDA_HOME/bin/nvcc`` (or ``$CUDA_PATH``), else ``nvcc`` on ``PATH``, else None."""
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(variable)
        if root and os.path.isfile(os.path.join(root, "bin", "nvcc")):
            return os.path.join(root, "bin", "nvcc")
    return shutil.which("nvcc")


def cuda_root(nvcc: str) -> str:
    """The toolkit folder of ``nvcc``: it reports it in a dry run (``TOP=``), which also
    sees through wrapper scripts on ``PATH``."""
    dry_run = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True)
    match = re.search(r"^#\$ TOP=(.+)$", dry_run.stderr, re.MULTILINE)
    if match:
        return os.path.normpath(match.group(1).strip())
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def gencode_flags(arch_list: str) -> list[str]:
    """``TORCH_CUDA_ARCH_LIST`` ("8.0;9.0a", "8.6+PTX", spaces or semicolons) as nvcc
    ``-gencode`` flags; a malformed entry is an error naming the variable."""
    flags = []
    for entry in re.split(r"[;\s]+", arch_list.strip()):
        if not entry:
            continue
        match = re.fullmatch(r"(\d+)\.(\d)([af]?)(\+PTX)?", entry)
        if not match:
            raise ValueError(f"TORCH_CUDA_ARCH_LIST: {entry!r} is not an architecture like 8.0, 9.0a or 8.6+PTX")
        arch = f"{match.group(1)}{match.group(2)}{match.group(3)}"
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
        if match.group(4):
            flags += ["-gencode", f"arch=compute_{arch},code=compute_{arch}"]
    if not flags:
        raise ValueError("TORCH_CUDA_ARCH_LIST is empty")
    return flags


def pybind11_include() -> str | None:
    """pybind11's headers: the pybind11 package (a build requirement), else the copy torch
    ships (for ``--no-build-isolation`` builds on a machine without pybind11)."""
    try:
        import pybind11

        return pybind11.get_include()
    except ImportError:
        pass
    try:
        import torch.utils.cpp_extension as cpp_extension

        for folder in cpp_extension.include_paths():
            if os.path.isfile(os.path.join(folder, "pybind11", "pybind11.h")):
                return folder
    except ImportError:
        pass
    return None


class BuildNative(build_ext):
    """Compiles ``csrc/cuda/*.cu`` with nvcc into objects linked into the extension, then
    the C++ sources as usual; any failure skips the extension with a message."""

    skipped: set[str] = set()

    def build_extension(self, ext: Extension) -> None:
        include = pybind11_include()
        if include is None:
            self._skip(ext, "pybind11 not found")
            return
        ext.include_dirs.append(include)
        try:
            self._add_cuda(ext)
            super().build_extension(ext)
        except Exception as error:  # noqa: BLE001 - any compiler failure leaves a working pure-Python install
            self._skip(ext, f"{type(error).__name__}: {error}")

    def _skip(self, ext: Extension, why: str) -> None:
        self.skipped.add(ext.name)
        _say(f"skipped {ext.name} ({why}): backends 'cpp' and 'cuda' unavailable")

    # A skipped extension has no file: neither copy it (editable installs) nor list it.
    def copy_extensions_to_source(self) -> None:
        built = self.extensions
        self.extensions = [ext for ext in built if ext.name not in self.skipped]
        try:
            super().copy_extensions_to_source()
        finally:
            self.extensions = built

    def get_outputs(self) -> list[str]:
        return [path for path in super().get_outputs() if os.path.exists(path) or not self.skipped]

    def _add_cuda(self, ext: Extension) -> None:
        if os.environ.get("RLHF_ENGINE_SKIP_CUDA_BUILD", "0") not in ("", "0"):
            _say("RLHF_ENGINE_SKIP_CUDA_BUILD is set: host twins only, backend 'cuda' unavailable")
            return
        nvcc = find_nvcc()
        if nvcc is None:
            _say("nvcc not found: host twins only, backend 'cuda' unavailable")
            return
        root = cuda_root(nvcc)
        arch_flags = gencode_flags(os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_CUDA_ARCHS)
        objects = os.path.join(self.build_temp, "cuda")
        os.makedirs(objects, exist_ok=True)
        for source in sorted(glob.glob("csrc/cuda/*.cu")):
            target = os.path.join(objects, os.path.basename(source) + ".o")
            command = [nvcc, *NVCC_FLAGS, *arch_flags, "-Icsrc/include", "-c", source, "-o", target]
            _say(" ".join(command))
            subprocess.run(command, check=True)
            ext.extra_objects.append(target)
        ext.define_macros.append(("RLHF_WITH_CUDA", "1"))
        for lib in ("lib64", "lib"):
            if glob.glob(os.path.join(root, lib, "libcudart_static.a")):
                ext.library_dirs.append(os.path.join(root, lib))
                break
        ext.libraries += ["cudart_static", "dl", "rt", "pthread"]
        _say(f"CUDA kernels built with {nvcc} ({root}) for {' '.join(arch_flags[1::2])}")


NATIVE = Extension(
    "rlhf_engine._C",
    sources=sorted(glob.glob("csrc/python/*.cpp") + glob.glob("csrc/cpp/*.cpp")),
    include_dirs=["csrc/include"],
    extra_compile_args=CXX_FLAGS,
    extra_link_args=["-fopenmp"],
    language="c++",
)

setup(
    packages=ENGINE_PACKAGES + ["rlhf_engine.benchmarks"],
    package_dir={"rlhf_engine.benchmarks": "benchmarks"},
    ext_modules=[NATIVE],
    cmdclass={"build_ext": BuildNative},
)
