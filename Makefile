# `make setup` is idempotent: it (re)installs only when pyproject.toml changed since the last install.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build here, the CUDA build on a GPU machine: PyPI's Linux wheel of the same version.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup train test test-slow lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

train: setup
	$(BIN)/python train.py $(ARGS)

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-slow: setup
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check src tests benchmarks train.py sample.py augment.py evaluate.py

clean:
	rm -rf $(VENV) .pytest_cache src/*.egg-info
