# jedi_jax: `make demo` (install + personalize with the embedded JeDi-mini), `make test` (install + tests).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PYTEST_ARGS ?= -n 2 -q

.PHONY: install install-test demo test clean

$(VENV)/.base: setup.py
	python3 -m venv $(VENV)
	$(PIP) install -q -U pip
	$(PIP) install -q -e .
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(PIP) install -q -e '.[test]'
	touch $@

install: $(VENV)/.base
install-test: $(VENV)/.test

demo: $(VENV)/.base
	$(PY) -m jedi_jax.demo

test: $(VENV)/.test
	JAX_PLATFORMS=cpu $(PY) -m pytest $(PYTEST_ARGS) tests

# out/ holds the demo's and the tools' default outputs; runs/ (training runs, checkpoints, exports) is
# left alone: delete it yourself if you mean to
clean:
	rm -rf $(VENV) out
