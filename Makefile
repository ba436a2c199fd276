# Two commands set everything up on a fresh machine:
#   make run   -> .venv, dependencies, release build of the Rust extension, then the main job
#   make test  -> the same set-up, then cargo test and pytest
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.deps-stamp

.PHONY: run test build venv clean bench

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "maturin>=1.7,<2.0"
	touch $(STAMP)

venv: $(STAMP)

# maturin develop installs the project's dependencies (and the test extras) into .venv,
# then builds the extension in release mode and installs it in editable form.
build: $(STAMP)
	VIRTUAL_ENV=$(abspath $(VENV)) $(VENV)/bin/maturin develop --release --extras test --quiet

run: build
	$(PY) -m sftfast.train --demo

test: build
	cargo test --profile fast --quiet
	$(PY) -m pytest -q tests

bench: build
	$(PY) -m sftfast.bench all --json

clean:
	rm -rf $(VENV) target python/sftfast/_core*.so
