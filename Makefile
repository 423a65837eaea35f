# Every target builds the virtual environment first when it is missing (or pyproject changed).
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV   ?= .venv
PY     := $(VENV)/bin/python
# CPU build by default; on a GPU machine: make install TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126"
TORCH  ?= torch==2.13.0
DATA   ?= toys
MODEL  ?= diffurecsys
ARGS   ?=

# Offline data: a folder laid out like <mirror>/<name>/dataset.pkl. Defaults to ../shared/data
# when that folder exists; otherwise the files are downloaded from GitHub.
ifneq ($(wildcard ../shared/data/toys/dataset.pkl),)
export DIFFUREC_DATA_MIRROR ?= $(abspath ../shared/data)
endif

# glibc malloc: keep large temporary tensors mapped instead of returning them to the OS after
# every step; this avoids page-fault storms on CPU (1.5x-2x faster, see docs/performance.md).
export MALLOC_MMAP_THRESHOLD_ ?= 33554432
export MALLOC_TRIM_THRESHOLD_ ?= 17179869184
export MALLOC_TOP_PAD_ ?= 1073741824

.PHONY: help install train test test-all lint format data bench clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed  ## create .venv with torch and the project (dev extras)

train: install  ## train and test: make train DATA=toys MODEL=diffurecsys ARGS="trainer.max_epochs=5"
	$(PY) -m diffurec_lightning.train data=$(DATA) model=$(MODEL) $(ARGS)

test: install  ## run the test suite (without tests marked slow)
	$(PY) -m pytest -m "not slow" -q

test-all: install  ## run every test, slow ones included
	$(PY) -m pytest -q

lint: install  ## ruff lint and format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install  ## apply ruff fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

data: install  ## prepare a dataset cache: make data DATA=toys (or DATA=custom ARGS="data.path=...")
	$(PY) -m diffurec_lightning.data.prepare data=$(DATA) $(ARGS)

clean:  ## remove run outputs (keeps the data cache)
	rm -rf outputs/runs outputs/multirun
