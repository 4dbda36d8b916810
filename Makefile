# The two commands of the README: `make demo` and `make test`.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
WORKDIR ?= workdirs/demo

$(VENV)/.installed: setup.py
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PYTHON) -m pip install -q -e ".[test]"
	touch $@

.PHONY: demo test test-all
demo: $(VENV)/.installed
	$(PYTHON) train.py --config=configs/lm.py:tiny --workdir=$(WORKDIR)
	$(PYTHON) evaluate.py --config=configs/lm.py:tiny --workdir=$(WORKDIR)

test: $(VENV)/.installed-test
	$(PYTHON) -m pytest -q -m "not slow" tests

test-all: $(VENV)/.installed-test
	$(PYTHON) -m pytest -q tests
