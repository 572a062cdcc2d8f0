# `make demo` and `make test` each bootstrap .venv idempotently (re-run when requirements change).
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow test-all test-xla lint format clean

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q -r requirements-dev.txt
	$(VENV)/bin/pip install -q --no-deps -e .
	touch $(STAMP)

.venv: $(STAMP)

# The laptop demo: synthetic shards, then the tiny recipe on a local Ray (one CPU worker).
demo: $(STAMP)
	$(VENV)/bin/tips data synth --out demo_data/synth --n 1024 --seed 0 --overwrite
	rm -rf runs/tiny_cpu_demo
	RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 $(VENV)/bin/tips train \
		recipe=tiny_cpu data.train_uri=demo_data/synth/train \
		run.storage_uri=runs run.name=tiny_cpu_demo

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/python tools/check_layout.py
	RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1 $(VENV)/bin/pytest -m "not slow" --tb=short

test-slow: $(STAMP)
	RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1 $(VENV)/bin/pytest -m "slow"

test-all: test test-slow

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/python tools/check_layout.py

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

# TPU / torch_xla path: torch-xla pins an older torch, so it gets its own environment
# (~3 GB download). Runs `tips train` with scaling.accelerator=tpu on the CPU XLA device.
XLA_VENV := .venv-xla
XLA_STAMP := $(XLA_VENV)/.installed

$(XLA_STAMP): requirements-xla.txt pyproject.toml
	test -x $(XLA_VENV)/bin/python || $(PY) -m venv $(XLA_VENV)
	$(XLA_VENV)/bin/pip install -q -r requirements-xla.txt
	$(XLA_VENV)/bin/pip install -q --no-deps -e .
	touch $(XLA_STAMP)

test-xla: $(XLA_STAMP)
	PJRT_DEVICE=CPU RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1 $(XLA_VENV)/bin/pytest -m slow tests/cluster/test_tpu.py
