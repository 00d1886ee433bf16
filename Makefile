# c2s-d2: one-command set-up, run and test.
#   make run    create the environment if missing, train + evaluate on the mini-world
#   make test   create the environment if missing, run the test suite
#   make setup  only create the environment
# Use your own Python environment (detectron2 built from source, GPU torch, ...): VENV=none
# runs everything with the `python` on your PATH and installs nothing.

VENV ?= .venv
PYTHON310 ?= $(shell PYENV_VERSION=3.10.13 command -v python3.10 2>/dev/null || echo python3.10)
PYTEST_ARGS ?=
RUN_OUTPUT ?= output/miniworld_zs_baseline_R18

ifeq ($(VENV),none)
  PY := python
  STAMP :=
else
  PY := $(VENV)/bin/python
  STAMP := $(VENV)/.c2s-installed
endif

export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH))
export PYENV_VERSION ?= 3.10.13

.PHONY: setup run test test-slow lint format

setup: $(STAMP)

$(VENV)/.c2s-installed: requirements.txt
	@test -x $(VENV)/bin/python || $(PYTHON310) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -r requirements.txt
	touch $@

run: $(STAMP)
	$(PY) train_net.py --config-file configs/miniworld/zs_baseline_R18.yaml --resume \
		OUTPUT_DIR $(RUN_OUTPUT)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow --run-slow $(PYTEST_ARGS) tests

lint: $(STAMP)
	$(PY) -m black --check -l 100 c2s_d2 tests train_net.py demo tools datasets

format: $(STAMP)
	$(PY) -m black -l 100 c2s_d2 tests train_net.py demo tools datasets
