# The two commands of the README: `make run` (run locally) and `make test` (run the whole suite).
# Needs Python 3.11+ and Node 20+; installs everything else into .venv and node_modules.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: install run test lint lock bench bench-install bench-quick

install: $(VENV)/.installed node_modules/.installed

# requirements*.txt pin every package exactly (compiled from the .in files by `make lock`), so the
# venv's own pip, whatever its version, installs them without resolving anything.
$(VENV)/.installed: requirements.txt requirements-dev.txt client/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --no-deps -r requirements-dev.txt
	$(PY) -m pip check
	touch $@

# After changing requirements.in or requirements-dev.in: the pinned files again, keeping every pin
# that still fits (`--upgrade` in UV_ARGS to move to the newest versions).
LOCK := $(PY) -m uv pip compile --quiet --python-version 3.11 --python-platform x86_64-unknown-linux-gnu \
	--custom-compile-command "make lock" $(UV_ARGS)
lock: install
	$(LOCK) requirements.in -o requirements.txt
	$(LOCK) requirements-dev.in -o requirements-dev.txt

node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

run: install
	@test -f local.settings.json || cp local.settings.sample.json local.settings.json
	$(PY) -m routines.localrun

# Azurite is started on free ports by the test session itself (tests/conftest.py) and stopped after.
test: install
	$(PY) -m pytest

# Benchmarks (docs/benchmarks.md): each script also runs alone, e.g. .venv/bin/python bench/on_time.py
bench-install: install
	$(PY) -m pip install --quiet -r requirements-bench.txt

bench: bench-install
	$(PY) bench/run_all.py

bench-quick: bench-install
	$(PY) bench/run_all.py --quick

lint: install
	$(PY) -m ruff check . && $(PY) -m ruff format --check . && $(PY) -m mypy routines client/routines_client tests
