# c2s-d2: one-command set-up, run and test.
#   make run    create the environment if missing, train + evaluate full C2S and the zero-shot
#               baseline on the mini-world, print both
#   make test   create the environment if missing, run the test suite
#   make setup  only create the environment
# Use your own Python environment (detectron2 built from source, GPU torch, ...): VENV=none
# runs everything with the `python` on your PATH and installs nothing.

VENV ?= .venv
PYTHON310 ?= $(shell PYENV_VERSION=3.10.13 command -v python3.10 2>/dev/null || echo python3.10)
PYTEST_ARGS ?=
RUN_OUTPUT ?= output/make_run
RUN_JOBS ?= 2

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

# full C2S and the zero-shot baseline side by side (two runs at once, one thread each; runs that
# finished before are read back, an interrupted one resumes)
run: $(STAMP)
	$(PY) tools/benchmark_miniworld.py --variants zs_baseline c2s_full --seeds 0 \
		--jobs $(RUN_JOBS) --output $(RUN_OUTPUT) --markdown $(RUN_OUTPUT)/RESULTS.md \
		--chart $(RUN_OUTPUT)/results.png

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow --run-slow $(PYTEST_ARGS) tests

lint: $(STAMP)
	$(PY) -m black --check -l 100 c2s_d2 tests train_net.py demo tools datasets

format: $(STAMP)
	$(PY) -m black -l 100 c2s_d2 tests train_net.py demo tools datasets
