# ksm-guard: `make audit` sets up .venv and audits this machine; `make test` runs every tier.
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ksm-guard-installed
PYTEST := $(BIN)/pytest

.PHONY: audit test test-unit test-real test-vm lint vm-deps vm-image clean

$(STAMP): pyproject.toml scripts/bootstrap.sh
	VENV=$(VENV) scripts/bootstrap.sh
	touch $@

## audit: create the environment, then audit this machine (exit 1 = KSM exposure found)
audit: $(STAMP)
	$(BIN)/ksm-guard audit || [ $$? -eq 1 ]

## test: lint, unit and CLI tests, the local real-KSM tests, then the QEMU VM suite
test: lint test-unit test-real test-vm

## test-unit: fixture and CLI tests; no VMs, seconds
test-unit: $(STAMP)
	$(PYTEST) -m "not realksm and not vm"

## test-real: this machine's own kernel KSM (needs root and /sys/kernel/mm/ksm)
test-real: $(STAMP)
	$(PYTEST) -m realksm

## test-vm: build (or reuse) the Debian 12 image, boot the test VMs, run the integration suite
test-vm: $(STAMP) vm-deps
	$(PYTEST) -m vm

vm-deps:
	scripts/bootstrap.sh --vm

vm-image: $(STAMP) vm-deps
	$(BIN)/python -m tests.vm.harness build

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy .

clean:
	rm -rf $(VENV) build *.egg-info
