# kvmscope: the two commands (see README.md). Both do their own set-up.
SHELL := /bin/bash
VENV ?= $(CURDIR)/.venv
PYTEST_ARGS ?=

.PHONY: run test setup setup-test unit bench-probes dist install uninstall clean

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

# Release bundle for hosts and Ansible: dist/kvmscope-<version>/ (wheel with the
# probes' C sources, every dependency wheel, install.py, unit) and its .tar.gz.
dist: setup
	$(VENV)/bin/python deploy/dist.py $(ARGS)

# Install this checkout on this host: /opt/kvmscope, /etc/kvmscope, /var/lib/kvmscope,
# the systemd unit (see README "Install on a host"). Upgrade = run it again.
# ARGS are passed on, e.g. make install ARGS=--start; make uninstall ARGS=--purge
install:
	/usr/bin/python3 deploy/install.py install $(ARGS)

uninstall:
	/usr/bin/python3 deploy/install.py uninstall $(ARGS)

setup:
	@KVMSCOPE_VENV=$(VENV) bash deploy/setup.sh

setup-test:
	@KVMSCOPE_VENV=$(VENV) bash deploy/setup.sh --test

clean:
	rm -rf $(VENV) .pytest_cache build dist *.egg-info
