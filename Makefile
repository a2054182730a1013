# One command for a fresh machine: `make test` (system packages, virtualenv, project, lint, types, tests).
VENV ?= .venv
PYTHON ?= python3
# The same extras the Dockerfile's worker stage installs (cpu), plus the test tools.
EXTRAS ?= cpu,test
BIN := $(VENV)/bin
comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

.PHONY: test install system-deps lint typecheck pytest bench clean

test: system-deps install lint typecheck pytest

system-deps:
	bash scripts/system-deps.sh

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

pytest: install
	$(BIN)/pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
