# Two commands for a fresh machine: `make demo` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
DEMO_FLAGS := --dataset synthetic --subset 2048 --synthetic-size 50000,2000 --model densenet-bc \
              --depth 16 --growth-rate 12 --epochs 5 --batch-size 64 --t0 0.5 --device cpu

.PHONY: install demo test check lint typecheck format bench bench-quick bench-gpu gpu-wheels clean

install: $(STAMP)

# Exact versions from constraints.txt; ranges live in setup.cfg.
$(STAMP): setup.cfg pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --quiet -c constraints.txt -e '.[dev,timm,s3]'
	touch $@

demo: install
	$(VENV)/bin/prefast compare --modes baseline,freezeout,prefast $(DEMO_FLAGS) \
	    --cache-dir .prefast-cache/demo --json-out runs/demo.json
	@$(PY) benchmarks/tradeoff.py benchmarks/results/train_subset.md

lint: install
	$(VENV)/bin/ruff check prefast store cli tests benchmarks examples
	$(VENV)/bin/ruff format --check prefast store cli tests benchmarks examples
	$(MAKE) --no-print-directory typecheck

# mypy cannot follow setup.cfg's package_dir (store/ -> prefast.store, cli/ -> prefast.cli),
# so it checks a view of the installed layout: prefast/ with store/ and cli/ linked in.
# Without it, every call into prefast.store would be typed Any.
TYPECHECK := build/typecheck
typecheck: install
	rm -rf $(TYPECHECK) && mkdir -p $(TYPECHECK)/prefast
	ln -s $(CURDIR)/prefast/* $(TYPECHECK)/prefast/
	ln -s $(CURDIR)/store $(TYPECHECK)/prefast/store
	ln -s $(CURDIR)/cli $(TYPECHECK)/prefast/cli
	$(VENV)/bin/mypy

format: install
	$(VENV)/bin/ruff format prefast store cli tests benchmarks examples
	$(VENV)/bin/ruff check --fix prefast store cli tests benchmarks examples

# pytest exits 5 when it collects nothing; make treats that as a failure.
# `make test` is the fast loop (tests not marked slow); `make check` runs every
# test (torchrun jobs, real full disks, long runs) and the whole benchmark
# pipeline at CI size (bench-quick fails if any results file is missing).
# PYTEST_ARGS passes options on, e.g. `make test PYTEST_ARGS=--durations=15`.
# Both run the tests on two pytest-xdist workers (one thread each: tests/conftest.py): on a
# 2-core machine make check's took 12 minutes where one worker took 21 (many tests wait on
# subprocesses), make test's 98 s where one took 172.
test: lint
	$(PY) -m pytest -q -n 2 -m "not slow" $(PYTEST_ARGS)

check: lint
	$(PY) -m pytest -q -n 2 $(PYTEST_ARGS)
	$(MAKE) --no-print-directory bench-quick

bench: install
	$(PY) -u benchmarks/run_all.py

bench-quick: install
	$(PY) -u benchmarks/run_all.py --quick --out runs/bench-quick

# The one-shot GPU check (on a CUDA machine with PyTorch and the wheels in .whl/);
# `make gpu-wheels` downloads those wheels here first.
bench-gpu:
	benchmarks/gpu_check.sh

gpu-wheels: install
	$(PY) benchmarks/gpu_wheels.py fetch .whl

clean:
	rm -rf $(VENV) .prefast-cache runs *.egg-info
