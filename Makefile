# `make demo` and `make test` build everything they need into .venv on a fresh clone.
# TORCH: the torch to install when .venv has none (a CPU build by default; use e.g.
# TORCH="torch==2.11.0" with a CUDA toolkit present to build the CUDA bodies too).

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.pyadvk-installed
SOURCES := $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cpu/*.inc csrc/cuda/*.cu csrc/cuda/*.cuh)

.PHONY: install lint format test test-fast demo bench clean

$(STAMP): requirements.txt setup.py pyproject.toml $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH)"
	$(PIP) install -r requirements.txt
	$(PIP) install --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

# ruff (pycodestyle, pyflakes, isort, bugbear, pyupgrade; 120 columns), the format check, and
# mypy on pyadvk/ and kernels/ (pyproject.toml). `make format` applies ruff's fixes.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# The whole suite (what CI runs), hypothesis profile "ci" unless HYPOTHESIS_PROFILE says otherwise.
test: install
	$(PY) -m pytest -q tests

# The edit loop: the suite without the tests marked slow (over ~10 s on a 2-core CPU) or gpu, and
# hypothesis profile "dev" (a few examples per property) unless HYPOTHESIS_PROFILE is set.
test-fast: install
	HYPOTHESIS_PROFILE=$${HYPOTHESIS_PROFILE:-dev} $(PY) -m pytest -q -m "not slow and not gpu" tests

demo: install
	$(PY) -m pyadvk demo

bench: install
	$(PY) -m pyadvk bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info pyadvk/_C*.so .pytest_cache .hypothesis .benchmarks
