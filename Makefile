# Every target sets itself up: a fresh machine needs nothing but python3.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.broadface-installed

.PHONY: setup demo test test-slow test-all bench mutants clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# The CPU wheel of torch lies on disk here; a bare `torch` would pull a multi-GB CUDA build.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[all,dev]"
	touch $(STAMP)

demo: setup
	$(VENV)/bin/broadface demo

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

test-all: setup
	$(PY) -m pytest -q -m ""

bench: setup
	$(PY) bench/head.py --quick

# Mutation testing of the heads (margins, queue, BroadFace, partition, union loss) and the metrics
# ([tool.mutmut] in pyproject.toml); long on 2 cores. Survivors: $(VENV)/bin/mutmut results
mutants: setup
	$(VENV)/bin/mutmut run; $(VENV)/bin/mutmut results

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info mutants
