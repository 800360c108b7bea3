# make run   - set up .venv, then score the default model (SmolLM2-135M-Instruct) on full MMLU
# make smoke - the same on 20 abstract_algebra questions (a quick end-to-end check)
# make test  - set up .venv, then run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.harness-installed
# torch is pinned first and again beside the project, so the resolver never swaps in another build
# (with or without a pip constraints file on the machine).
TORCH  ?= torch==2.13.0
export PIP_ROOT_USER_ACTION := ignore

.PHONY: run smoke test setup
run: $(STAMP)
	$(PY) -m harness task=mmlu

smoke: $(STAMP)
	$(PY) -m harness task=mmlu 'task.subjects=[abstract_algebra]' task.limit=20

# One pytest-xdist worker per core (at most 4: each starts its own SmolLM2 server fixture).
test: $(STAMP)
	$(PY) -m pytest -q -n auto --maxprocesses 4

setup: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml Makefile | $(PY)
	$(PY) -m pip install --quiet '$(TORCH)'
	$(PY) -m pip install --quiet -e '.[test]' '$(TORCH)'
	touch $@
