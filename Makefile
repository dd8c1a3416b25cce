# The two commands of the README. Both create .venv if missing, install torch first (so pip
# never pulls a CUDA build through a looser spec), then the package.
# The versions of everything else come from the lock file, $(LOCK) (see its header); for the newest
# versions pyproject.toml allows, pass LOCK=none (or LOCK=), e.g. `make test LOCK=none`.
PYTHON ?= python3
TORCH ?= torch==2.13.0
LOCK ?= requirements/lock.txt
VENV := .venv
BIN := $(VENV)/bin
USE_LOCK := $(filter-out none,$(LOCK))
LOCK_ARG := $(if $(USE_LOCK),-c $(USE_LOCK))
# One stamp per install mode, so switching between locked and newest reinstalls.
STAMP := $(VENV)/.installed-$(if $(USE_LOCK),locked,newest)

.PHONY: demo test lint install lock clean tox

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml $(USE_LOCK)
	$(BIN)/pip install --quiet $(LOCK_ARG) "$(TORCH)"
	$(BIN)/pip install --quiet $(LOCK_ARG) -e ".[test]"
	rm -f $(VENV)/.installed*
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/rlhf-lab demo $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check rlhf_lab tests experiments benchmarks

test: lint
	$(BIN)/python -m pytest -q --timeout=900 $(PYTEST_ARGS)

# The tox matrix of tox.ini (Python 3.10-3.12 x torch 2.4, 2.6, 2.13; interpreters that are missing
# are skipped), with tox installed into the venv. One env: `make tox TOXENV=py311-torch213`; the locked
# set of `make test`: `make tox TOXENV=locked`. Each env builds its own venv under .tox/ (a torch
# download per torch version). TOX_ARGS go to tox, e.g. TOX_ARGS="-- -x tests/losses".
TOXENV ?=
$(BIN)/tox: $(BIN)/python
	$(BIN)/pip install --quiet $(LOCK_ARG) "tox>=4"

tox: $(BIN)/tox
	$(BIN)/tox $(if $(TOXENV),-e $(TOXENV)) $(TOX_ARGS)

# Rewrite requirements/lock.txt with the newest versions, resolved in a throwaway venv (its header
# comment is kept). Then run `make clean test` and commit the file.
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install --quiet --upgrade pip
	.venv-lock/bin/pip install --quiet "$(TORCH)"
	.venv-lock/bin/pip install --quiet -e ".[test]"
	{ grep '^#' requirements/lock.txt; .venv-lock/bin/pip freeze --exclude-editable \
		| grep -viE '^(torch|rlhf[-_]lab)=='; } > requirements/lock.txt.new
	mv requirements/lock.txt.new requirements/lock.txt
	rm -rf .venv-lock

clean:
	rm -rf $(VENV) .venv-lock .tox .pytest_cache .ruff_cache *.egg-info
