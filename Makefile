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
	rm -rf $(VENV) runs
