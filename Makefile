# Shipyard developer commands. `make run` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.shipyard-setup
JOB ?= jobs/tiny-llama.yaml

.PHONY: setup run test test-unit test-integration lint format bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m shipyard.train.warmup
	touch $(STAMP)

run: setup
	$(VENV)/bin/shipyard train $(JOB)

test: setup
	$(PY) -m pytest tests --durations=15

test-unit: setup
	$(PY) -m pytest tests/unit

test-integration: setup
	$(PY) -m pytest tests/integration -m integration

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: setup
	$(PY) benchmarks/train_overhead.py
	$(PY) benchmarks/train_overhead.py --job jobs/tiny-llama.yaml
	$(PY) benchmarks/serve_load.py
	$(PY) benchmarks/sweep_efficiency.py
	$(PY) benchmarks/planner.py --measure
	$(PY) benchmarks/tensor_parallel.py
	$(PY) benchmarks/data_pipeline.py

clean:
	rm -rf $(VENV) runs .pytest_cache
