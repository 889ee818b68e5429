# Two commands set everything up on a fresh machine (Python >= 3.10 with venv):
#   make ablate  the main job: `qvl ablate` with the default for this machine (table, results/, report, plot)
#   make test    the CPU test suite
# Also: make demo (every backend mix on the tiny model), make lint (ruff), make bench-check / bench-baseline.
# Each creates its own virtual environment in $(VENV). TORCH and TRITON pick those requirements: the
# defaults pin the releases CI uses (triton as on the lent H100); on a GPU machine pass what matches its CUDA.

PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
TRITON ?= triton==3.6.0
TORCHVISION ?= torchvision==0.28.0
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip install --disable-pip-version-check -q

.PHONY: ablate demo test lint bench-check bench-baseline clean

$(VENV)/.runtime: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) "$(TORCH)" "$(TRITON)"
	$(PIP) -e .
	touch $@

$(VENV)/.test: $(VENV)/.runtime
	$(PIP) -e ".[test]"
	# transformers' video processor (a test reference) needs torchvision; --no-deps keeps the torch above
	$(PIP) --no-deps "$(TORCHVISION)"
	touch $@

ablate: $(VENV)/.runtime
	$(VENV)/bin/qvl ablate $(CONFIG)

demo: $(VENV)/.runtime
	$(VENV)/bin/qvl demo

test: $(VENV)/.test
	$(PY) -m pytest -q tests

lint: $(VENV)/.test
	$(VENV)/bin/ruff check .

# Performance regressions: run the benchmark suites and compare with benchmarks/baselines/<machine>.json
bench-check: $(VENV)/.test
	$(PY) benchmarks/regress.py check

bench-baseline: $(VENV)/.test
	$(PY) benchmarks/regress.py update

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
