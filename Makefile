PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: test lab bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev,lab]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 -m "not slow"

lab: $(STAMP)
	$(PY) -m batchnorm lab

bench: $(STAMP)
	$(PY) benchmarks/kernels.py
	$(PY) benchmarks/models.py
	$(PY) benchmarks/compile.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .hypothesis
