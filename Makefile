# kvmscope: the two commands (see README.md). Both do their own set-up.
SHELL := /bin/bash
VENV ?= $(CURDIR)/.venv
PYTEST_ARGS ?=

.PHONY: run test setup setup-test unit fuzz disk-faults bench bench-probes bench-uprobes bench-cycle footprint startup soak dist install uninstall clean

run: setup
	$(VENV)/bin/kvmscope run $(ARGS)

# The whole suite, real components included. A skipped test FAILS here unless
# this machine truly lacks what it needs (tests/conftest.py MACHINE_LACKS).
test: setup-test
	KVMSCOPE_REQUIRE_REAL=1 $(VENV)/bin/python -m pytest $(PYTEST_ARGS)

# Fast tests only (no lab, no eBPF): for quick edit/test loops.
unit: setup-test
	$(VENV)/bin/python -m pytest -m "not lab and not ebpf" $(PYTEST_ARGS)

# Fuzz the parsers of outside input (tests/fuzz) with the long budget
# (FUZZ_EXAMPLES per target, default 20000); make test runs the same targets with
# the short 'ci' profile. FUZZ_ARGS e.g. FUZZ_ARGS='-k netlink'
fuzz: setup-test
	HYPOTHESIS_PROFILE=long $(VENV)/bin/python -m pytest -m fuzz tests/fuzz --durations=0 $(FUZZ_ARGS)

# The disk-fault proof on its own (also part of make test): a real agent with its spool
# on a 4 MiB tmpfs filled (ENOSPC), remounted read-only, then freed; see docs/reliability.md.
disk-faults: setup-test
	KVMSCOPE_REQUIRE_REAL=1 $(VENV)/bin/python -m pytest -p no:cacheprovider -v tests/es/test_disk_faults.py $(PYTEST_ARGS)

# Benchmarks (not tests): results go to docs/performance.md. Root needed.
# make bench: kvmscope beside node_exporter and the libvirt exporter on the lab (4 VMs, 5 s, 2 minutes,
# one Prometheus scraping all three; the peers are installed by setup-test and stopped at the end),
# the time to answer each lab fault, then the cycle cost at 200 VMs and the probes' cost.
bench: setup-test
	$(VENV)/bin/python -m benchmarks.peers $(ARGS)
	$(VENV)/bin/python -m benchmarks.cycle --profile $${TMPDIR:-/tmp}/kvmscope-cycle.prof
	$(MAKE) bench-probes

bench-probes: setup-test
	$(VENV)/bin/python -m benchmarks.probes $(ARGS)

# The libiscsi uprobes' cost per I/O, off and on side by side (tgtd on loopback, qemu-img / qemu-io).
bench-uprobes: setup-test
	$(VENV)/bin/python -m benchmarks.uprobes $(ARGS)

# One collection cycle at 200 VMs x 4 disks, 400 storage connections (libvirt's test driver, real
# QEMU processes and sockets in a network namespace of its own); results in docs/performance.md. Root needed.
bench-cycle: setup-test
	$(VENV)/bin/python -m benchmarks.cycle $(ARGS)

# kvmscope run's RSS over time and start-up to the first full snapshot, on the lab (issue 17 goal 1);
# 30 minutes by default, results in docs/performance.md. Root needed.
footprint: setup-test
	$(VENV)/bin/python -m benchmarks.footprint $(ARGS)

# Start-up of `kvmscope run`, the eBPF object cache cold (compiling) and warm, alternating (~2 min; root).
startup: setup-test
	$(VENV)/bin/python -m benchmarks.startup $(ARGS)

# Soak (not a test): the agent on the lab under churn for 30 minutes (ARGS='--minutes 5' for less);
# results in docs/reliability.md. A 3-minute variant is tests/lab/test_soak.py. Root needed.
soak: setup-test
	$(VENV)/bin/python -m benchmarks.soak $(ARGS)

# The diagnosis scoreboard (not a test): every fault of the lab's matrix judged by a running agent,
# the table written into docs/diagnose.md (ARGS='--only flap-portal2 --no-doc'). Root needed; ~10 min.
scoreboard: setup-test
	$(VENV)/bin/python -m benchmarks.scoreboard $(ARGS)

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
