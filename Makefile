# Entry points, each doing all the set-up on a fresh machine:
#   make demo    the main job: `esta demo`, ESTA on shipped anchors and data (about a minute on 2 CPU cores)
#   make test    the test suite (interpreter tests of the Triton kernels and their sm_80/sm_90 compile included)
#   make bench   the fused stitched-linear benchmark comparison on this machine
PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
# torch 2.14.1 is the CUDA 13.0 wheel, so the CUDA sources compile and link even without a GPU
TORCH_SPEC ?= torch==2.14.1
# torchvision 0.29.1 is the build that matches torch 2.14.1 (timm needs it; tests build small timm ViTs)
# transformers: decoder anchors (esta.HFCausalLMAnchor); tests build tiny Llama/Mistral/Qwen2 models offline
DEPS := "$(TORCH_SPEC)" "torchvision==0.29.1" timm "triton>=3.6,<3.10" numpy "pytest>=8" "pytest-benchmark>=4" "pytest-xdist>=3" \
	ninja "setuptools>=64" wheel safetensors tqdm matplotlib scikit-learn "transformers>=4.50,<6" tokenizers scipy pillow
# The CUDA kernels are built on CUTLASS 3 / CuTe, whose headers ship in this package (setup.py finds them there;
# pinned: the kernels are written against this release). --no-deps: only the headers are used, not its Python
# API, whose dependencies (cuda-python, ...) the build does not need.
CUTLASS_SPEC ?= nvidia-cutlass==4.2.0.0
SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.cuh' -o -name '*.h') setup.py

.PHONY: all venv build test bench demo clean
all: test

$(VENV)/.deps-installed: Makefile pyproject.toml
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q $(DEPS)
	$(VPY) -m pip install -q --no-deps "$(CUTLASS_SPEC)"
	touch $@

venv: $(VENV)/.deps-installed

# the benchmark's PEFT baseline (pyproject's `bench` extra)
$(VENV)/.bench-deps-installed: $(VENV)/.deps-installed
	$(VPY) -m pip install -q "peft>=0.11"
	touch $@

# Incremental in-place build of esta_kernels._C (ninja reuses objects under build/).
esta_kernels/.built: $(VENV)/.deps-installed $(SOURCES)
	$(VPY) setup.py -q build_ext --inplace
	touch $@

build: esta_kernels/.built

# two workers (the machines have two cores), test files kept whole per worker (module fixtures run once)
PYTEST_WORKERS ?= 2
test: build
	$(VPY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile tests

demo: build
	$(VPY) -m esta demo --out esta-demo

bench: build $(VENV)/.bench-deps-installed
	$(VPY) bench/compare.py

clean:
	rm -rf build esta_kernels/_C*.so esta_kernels/.built
