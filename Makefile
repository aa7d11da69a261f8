# conkd_scale — set-up and everyday commands. Everything runs inside .venv in the project root.
#   make demo    install, then run the main job on the built-in synthetic default
#   make test    install, then run the test suite
#   make lint    ruff check + format check
#   make bench   run the benchmarks (writes BENCHMARKS.md rows)
# Override the torch build with e.g. `make test TORCH_SPEC="torch==2.5.1"`.

PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
PY          := $(VENV)/bin/python
PIP         := $(PY) -m pip
STAMP       := $(VENV)/.installed
NPROC       ?= 2
# The venv's tools first on PATH for every recipe and the processes it starts (the DeepSpeed
# launcher, its ninja): a different ninja on PATH makes DeepSpeed recompile its CPU op.
export PATH := $(abspath $(VENV))/bin:$(PATH)
PYTEST_ARGS ?=

.PHONY: install demo test lint format bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet -e ".[dev]"
	touch $(STAMP)

# The whole pipeline on the built-in synthetic corpus: teachers, students (2 CPU ranks under
# ZeRO-3), evaluation of every system; ends by printing the results table.
demo: install
	$(PY) launch/results_table.py --config configs/results_synthetic.yaml nproc=$(NPROC)

test: install
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: install
	$(PY) bench/bench_loss.py
	$(PY) bench/bench_distill_step.py --out BENCHMARKS.md

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
