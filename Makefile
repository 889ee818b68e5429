# Two commands set everything up on a fresh machine (Python >= 3.10 with venv):
#   make demo   the main job: the tiny model through every available backend mix, as a table
#   make test   the CPU test suite
# Each creates its own virtual environment in $(VENV). TORCH and TRITON pick those requirements: the
# defaults pin the releases CI uses (triton as on the lent H100); on a GPU machine pass what matches its CUDA.

PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
TRITON ?= triton==3.6.0
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip install --disable-pip-version-check -q

.PHONY: demo test bench-check bench-baseline clean

$(VENV)/.runtime: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) "$(TORCH)" "$(TRITON)"
	$(PIP) -e .
	touch $@

$(VENV)/.test: $(VENV)/.runtime
	$(PIP) -e ".[test]"
	touch $@

demo: $(VENV)/.runtime
	$(VENV)/bin/qvl demo

test: $(VENV)/.test
	$(PY) -m pytest -q tests

# Performance regressions: run the benchmark suites and compare with benchmarks/baselines/<machine>.json
bench-check: $(VENV)/.test
	$(PY) benchmarks/regress.py check

bench-baseline: $(VENV)/.test
	$(PY) benchmarks/regress.py update

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
