# ksm-guard: `make audit` sets up .venv and audits this machine; `make test` runs every tier.
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ksm-guard-installed
PYTEST := $(BIN)/pytest

.PHONY: audit test test-unit test-real test-install test-vm lint test-deps vm-image bench bench-sharing bench-deps clean

$(STAMP): pyproject.toml constraints.txt scripts/bootstrap.sh
	VENV=$(VENV) scripts/bootstrap.sh
	touch $@

## audit: create the environment, then audit this machine (exit 1 = KSM exposure found)
audit: $(STAMP)
	$(BIN)/ksm-guard audit || [ $$? -eq 1 ]

## test: lint, unit and CLI tests, the local real-KSM tests, the wheel, then the QEMU VM suite;
## the VM images and snapshots are built in the background meanwhile (scripts/test-all.sh)
test: $(STAMP) test-deps
	MAKE="$(MAKE)" BIN=$(BIN) scripts/test-all.sh

## test-unit: fixture and CLI tests; no VMs; six pytest processes at once (scripts/test-unit.sh)
test-unit: $(STAMP) test-deps
	PYTEST=$(PYTEST) scripts/test-unit.sh

## test-real: this machine's own kernel KSM (needs root and /sys/kernel/mm/ksm)
test-real: $(STAMP) test-deps
	$(PYTEST) tests --ignore=tests/integration -m realksm

## test-install: the built wheel in a fresh venv beside other "operations" and "cli" packages
test-install: $(STAMP)
	$(PYTEST) tests/test_install.py

## test-vm: build (or reuse) the Debian 12 and 13 images, boot the test VMs, run the integration
## suite
# Run apart from the other tiers: pyinfra-testing imports pyinfra_cli, which gevent-patches the
# whole process, and the VM harness wants the standard library's subprocess.
# VM_WORKERS pytest-xdist workers, each with its own VMs (2: one test's guest and host work
# alternate, leaving a core idle); 0 runs them in this process. The images of both releases are
# built first, side by side (a cold cache only; a warm one costs a second).
VM_WORKERS ?= 2
test-vm: $(STAMP) test-deps
	$(BIN)/python -m tests.vm build
	$(PYTEST) tests/integration -n $(VM_WORKERS) --dist loadgroup --durations=25

## test-deps: Debian packages the tests need (sshd for the loopback fleet, QEMU for the VMs,
## Chromium to render the report page, promtool and Prometheus for the alert rules, shellcheck)
test-deps:
	scripts/bootstrap.sh --test

## vm-image: build (or reuse) the VM images of both releases only
vm-image: $(STAMP) test-deps
	$(BIN)/python -m tests.vm build

## bench: the fleet benchmark (docs/benchmarks.md): sshd hosts on this machine, ~20 min, root
bench: $(STAMP) bench-deps
	$(BIN)/python -m pip install -q --disable-pip-version-check --group bench
	$(BIN)/python -m bench.run
	$(BIN)/python -m bench.sharing

## bench-sharing: the cost of audit --vms --sharing's scan on 4 GiB of real QEMU guests (root)
bench-sharing: $(STAMP) test-deps
	$(BIN)/python -m bench.sharing

bench-deps:
	scripts/bootstrap.sh --bench

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy .

clean:
	rm -rf $(VENV) build *.egg-info
