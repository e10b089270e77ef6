# `make test` and `make bench` do all the set-up from a fresh clone: a local virtual environment,
# torch (an existing one is reused; otherwise the pinned CPU build), the native extension, test extras.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.moe_kernels-installed
TORCH_PIN ?= torch==2.13.0
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: test bench build clean aot-triton36 sanitize

$(STAMP): setup.py pyproject.toml moe_kernels/_native.py $(wildcard csrc/*.cpp csrc/*.h)
	@if [ ! -x $(PY) ]; then \
	  if $(PYTHON) -c "import torch" 2>/dev/null; then \
	    echo "reusing the torch of $(PYTHON)"; $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else $(PYTHON) -m venv $(VENV); fi; \
	fi
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q setuptools wheel ninja
	$(PY) -m pip install -q --no-build-isolation -e ".[test,bench]"
	$(PY) -c "import moe_kernels; print(moe_kernels.backends())"
	@touch $(STAMP)

build: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest tests -q $(PYTEST_ARGS)

# The native ops built with AddressSanitizer and UndefinedBehaviorSanitizer (-fsanitize=address,undefined -fno-wrapv
# -fno-omit-frame-pointer) into build/sanitize, and the op tests (tests/ops: routing, permutation, grouped GEMM, expert
# MLP, LoRA, quantized, dense, Soft MoE, which together reach every native kernel) and the property tests run on
# that build's native backend at each ISA level this CPU has, every output and scratch buffer poisoned
# (MOE_KERNELS_POISON=1) and the kept buffers allocated per call. tests/sanitize.py; SANITIZE_ARGS="--isa avx2".
sanitize: $(STAMP)
	$(PY) -m tests.sanitize $(SANITIZE_ARGS)

bench: $(STAMP)
	$(PY) -m benchmarks $(BENCH_ARGS)

# the compile proofs of the expert MLP's GPU kernels under the GPU image's Triton (3.6) as well as the installed one
aot-triton36: $(STAMP)
	$(PY) -m pip install -q --target build/triton36 --no-deps triton==3.6.0
	PYTHONPATH=build/triton36 $(PY) -m moe_kernels.tools.aot_check --filter grouped_gemm_tma glu_ row_metadata grouped_gemm_tn \
	  zero_empty grouped_gemm- quant_ moe_decode

clean:
	rm -rf build $(VENV) moe_kernels/_C*.so *.egg-info
