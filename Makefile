# Two commands set everything up on a fresh machine:
#   make demo   creates .venv, installs ziplm, runs the demo (train + evaluate the default model)
#   make test   creates .venv, installs ziplm with its dev, parity (torch CPU) and harness (lm_eval) extras, runs the whole test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

$(VENV)/.installed-parity: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[dev,parity,harness]'
	touch $@

demo: $(VENV)/.installed
	$(PY) -m research demo

test: $(VENV)/.installed-parity
	$(PY) -m pytest -q -n auto --maxprocesses=4 --dist loadfile --no-loadscope-reorder

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check research tests experiments benchmarks
	$(VENV)/bin/ruff format --check research tests experiments benchmarks

clean:
	rm -rf $(VENV) runs
