# kvmscope: the two commands (see README.md). Both do their own set-up.
SHELL := /bin/bash
VENV ?= $(CURDIR)/.venv
PYTEST_ARGS ?=

.PHONY: run test setup setup-test unit bench-probes clean

run: setup
	$(VENV)/bin/kvmscope run $(ARGS)

test: setup-test
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

# Fast tests only (no lab, no eBPF): for quick edit/test loops.
unit: setup-test
	$(VENV)/bin/python -m pytest -m "not lab and not ebpf" $(PYTEST_ARGS)

# Benchmarks (not tests): results go to docs/performance.md. Root needed.
bench-probes: setup-test
	$(VENV)/bin/python -m benchmarks.probes $(ARGS)

setup:
	@KVMSCOPE_VENV=$(VENV) bash deploy/setup.sh

setup-test:
	@KVMSCOPE_VENV=$(VENV) bash deploy/setup.sh --test

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
