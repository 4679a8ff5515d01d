# `make test` and `make demo` work from a fresh clone: they build .venv, install torch
# first (only when it is missing, so a CPU wheel is not replaced by a CUDA one), then the
# package with its dev, verl and trl extras, then verl itself (--no-deps).
# tests/test_integration_trl_dpo.py runs TRL itself (the `trl` extra pins trl==1.16.0).
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
# verl is installed without its deps (its pins would replace transformers); the `verl` extra
# brings what its core_algos needs to import. tests/test_integration_verl.py needs it.
VERL_SPEC ?= verl==0.9.1
# verl 0.9.1's wheel also installs a top-level `tests` package into site-packages; ours is
# a regular package too (tests/__init__.py) and comes first on the path from the repository
# root, so `from tests.tolerance import ...` resolves here (tests/conftest.py checks it).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.rlhf-engine-installed

.PHONY: test demo install clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# The native module rlhf_engine._C is built by the install; editing csrc/ rebuilds it.
NATIVE_SOURCES := $(wildcard csrc/*/*.cpp csrc/*/*.cu csrc/*/*.h csrc/include/rlhf/*)

$(STAMP): $(PY) pyproject.toml setup.py $(NATIVE_SOURCES)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,verl,trl]"
	$(PY) -m pip install -q --no-deps "$(VERL_SPEC)"
	touch $(STAMP)

install: $(STAMP)

# Triton kernels run on CPU tensors through the Triton interpreter when no GPU is present.
test: $(STAMP)
	TRITON_INTERPRET=$${TRITON_INTERPRET-1} $(PY) -m pytest -q -m "not gpu" tests

demo: $(STAMP)
	$(VENV)/bin/rlhf-engine demo --out demo-out

clean:
	rm -rf $(VENV) build *.egg-info bench-out demo-out train-out rlhf_engine/_C*.so
