# Two commands set everything up on a fresh machine, from the lock files in requirements/ (hashed pins of every
# package; `make lock` refreshes them, deliberately):
#   make demo   creates .venv (the main install + dev tools, no torch) and runs the demo
#   make test   also creates .venv-test (with the parity extra's CPU torch and the harness extra's lm_eval); pulls
#               SmolLM2-135M into the cache, runs the real-model job in .venv (no torch), then the whole suite
PYTHON ?= python3
VENV ?= .venv
TEST_VENV ?= .venv-test
PY := $(VENV)/bin/python
TEST_PY := $(TEST_VENV)/bin/python

.PHONY: demo test lint clean lock

# A venv made from scratch whenever its lock file changes, so that it holds exactly the locked versions.
define make_venv
	rm -rf $(1)
	$(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q --require-hashes -r requirements/pip.txt
	$(1)/bin/python -m pip install -q --require-hashes --no-deps -r $(2)
	$(1)/bin/python -m pip install -q --no-deps -e .
	$(1)/bin/python -m pip check -q
	touch $(1)/.installed
endef

$(VENV)/.installed: requirements/dev.txt requirements/pip.txt pyproject.toml
	$(call make_venv,$(VENV),requirements/dev.txt)

$(TEST_VENV)/.installed: requirements/test.txt requirements/pip.txt pyproject.toml
	$(call make_venv,$(TEST_VENV),requirements/test.txt)

demo: $(VENV)/.installed
	$(PY) -m research demo

test: $(VENV)/.installed $(TEST_VENV)/.installed
	$(PY) -m research pull smollm2-135m
	$(PY) -m pytest -q tests/test_main_install.py
	$(TEST_PY) -m pytest -q -n auto --maxprocesses=4 --dist loadfile --no-loadscope-reorder

# make lock: re-resolve every install set (requirements/lock.py says which) and rewrite requirements/*.txt
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q --require-hashes -r requirements/pip.txt
	.venv-lock/bin/python -m pip install -q --require-hashes -r requirements/lock-tools.txt
	.venv-lock/bin/python requirements/lock.py

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check research tests experiments benchmarks
	$(VENV)/bin/ruff format --check research tests experiments benchmarks

# make paper: every table, figure and number of paper/ from the committed result files (paper/generated/), then
# the PDF (paper/build/paper.pdf) where a TeX engine is installed
.PHONY: paper
paper: $(VENV)/.installed
	$(PY) paper/generate.py --out paper/generated
	@mkdir -p paper/build
	@if command -v latexmk >/dev/null 2>&1; then \
		cd paper && latexmk -pdf -interaction=nonstopmode -halt-on-error -outdir=build paper.tex >build/make.log 2>&1 \
			&& echo "built paper/build/paper.pdf" || { tail -n 30 build/make.log; exit 1; }; \
	elif command -v pdflatex >/dev/null 2>&1 && command -v bibtex >/dev/null 2>&1; then \
		cd paper && { pdflatex -interaction=nonstopmode -halt-on-error -output-directory=build paper.tex \
			&& (cd build && BIBINPUTS=..: bibtex paper) \
			&& pdflatex -interaction=nonstopmode -halt-on-error -output-directory=build paper.tex \
			&& pdflatex -interaction=nonstopmode -halt-on-error -output-directory=build paper.tex; } >build/make.log 2>&1 \
			&& echo "built paper/build/paper.pdf" || { tail -n 30 build/make.log; exit 1; }; \
	else \
		echo "no TeX engine: tables are in paper/generated/; for the PDF: sudo apt-get update && sudo apt-get install --no-install-recommends texlive-latex-recommended texlive-latex-extra texlive-fonts-recommended latexmk"; \
	fi

clean:
	rm -rf $(VENV) $(TEST_VENV) .venv-lock runs
