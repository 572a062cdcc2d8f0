# `make demo` and `make test` each bootstrap .venv idempotently (re-run when requirements change).
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: test test-slow test-all lint format clean

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q -r requirements-dev.txt
	$(VENV)/bin/pip install -q --no-deps -e .
	touch $(STAMP)

.venv: $(STAMP)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1 $(VENV)/bin/pytest -m "not slow"

test-slow: $(STAMP)
	RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1 $(VENV)/bin/pytest -m "slow"

test-all: test test-slow

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
