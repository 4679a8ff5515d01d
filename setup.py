"""Package layout: the top-level ``kernels/`` and ``benchmarks/`` folders install as
``rlhf_engine.kernels`` and ``rlhf_engine.benchmarks`` (never as top-level packages).

Metadata lives in pyproject.toml; this file only maps folders to package names, which
setuptools needs in code so that ``pip install .`` and ``pip install -e .`` agree.
"""

from setuptools import find_packages, setup

ENGINE_PACKAGES = find_packages(include=["rlhf_engine", "rlhf_engine.*"])

setup(
    packages=ENGINE_PACKAGES + ["rlhf_engine.kernels", "rlhf_engine.benchmarks"],
    package_dir={
        "rlhf_engine.kernels": "kernels",
        "rlhf_engine.benchmarks": "benchmarks",
    },
)
