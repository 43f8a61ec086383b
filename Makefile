# Developer entry points. `make test` is what CI runs (through .ci/run).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Reinstall only when the dependency list changed, not on every run.
STAMP := $(VENV)/.install-stamp
INSTALL_DEPS ?= scripts/install-deps.sh
# Test files run in parallel workers (one file stays on one worker: module-scoped servers are
# shared within a file); every server a test starts binds its own free loopback port.
PYTEST_ARGS ?= --numprocesses auto --maxprocesses 4 --dist loadfile
# .ci/run sets this: a run that collects no tests (pytest exit 5) then still counts as passed.
ALLOW_NO_TESTS ?= 0

.PHONY: venv native deps test lint demo

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

# The hot path compiled by mypyc, in place (docs/native.md); rebuilt only when its sources
# changed. STANZAGUARD_PURE_PYTHON=1 removes the compiled modules instead.
native: venv
	$(BIN)/python scripts/build_native.py

deps:
	$(INSTALL_DEPS)

test: venv deps native
	$(BIN)/pytest $(PYTEST_ARGS) || { status=$$?; \
	  if [ $$status -eq 5 ] && [ "$(ALLOW_NO_TESTS)" = 1 ]; then \
	    echo "pytest collected no tests (exit 5); accepted because ALLOW_NO_TESTS=1"; exit 0; \
	  fi; exit $$status; }

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/mypy --strict tests/support tests/conftest.py

demo:
	scripts/demo.sh
