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

.PHONY: help install train test test-all lint format data bench bench-tta eval predict curves report reproduce sweep agent slurm seeds clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps sweeps==0.3.0  # W&B's sweep schema/samplers; see .ci/run
	$(PY) -m pip install -q "jsonref>=1" "jsonschema>=3.2"
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

data: install  ## prepare a dataset cache: make data DATA=toys (or DATA=custom ARGS="data.source.path=...")
	$(PY) -m diffurec_lightning.data.prepare data=$(DATA) $(ARGS)

# -- analysis of finished runs (docs/analysis.md) -------------------------------------------------
CKPT     ?=
OUT      ?= outputs/predictions.parquet
RUNS     ?= outputs
BASELINE ?=
MODELS   ?= pop markov diffurec diffurecsys
REPORT   ?= docs/report.md
need-ckpt = $(if $(CKPT),,$(error set CKPT=outputs/runs/<date>/<time>_<data>_<model>/checkpoints/<file>.ckpt))

eval: install  ## test a checkpoint (with case studies), no training: make eval CKPT=path/to.ckpt
	$(need-ckpt)
	$(PY) -m diffurec_lightning.eval ckpt_path=$(CKPT) $(ARGS)

predict: install  ## top-K recommendations (original ids) to parquet: make predict CKPT=... OUT=recs.parquet
	$(need-ckpt)
	$(PY) -m diffurec_lightning.eval mode=predict ckpt_path=$(CKPT) predict.out=$(OUT) $(ARGS)

curves: install  ## test metrics vs reverse steps and ensemble size: make curves CKPT=path/to.ckpt
	$(need-ckpt)
	$(PY) -m diffurec_lightning.eval mode=curves ckpt_path=$(CKPT) $(ARGS)

report: install  ## mean +- std over seeds and paired t-tests: make report RUNS=outputs BASELINE=diffurec
	$(PY) -m diffurec_lightning.analysis.report --runs $(RUNS) --baseline $(or $(BASELINE),diffurec) --out $(REPORT) --figures $(dir $(REPORT))figures $(ARGS)

# One command per table: each model's recipe (conf/experiment/<model>_<data>.yaml if any) over
# seeds 0..SEEDS-1, one run at a time, into outputs/reproduce/<data>/<time>/, then its report.md.
# TRAIN_DEFAULTS=diffurec,diffurecsys: those models run with the make train defaults, not their preset.
reproduce: install  ## every model x seed, then the report: make reproduce DATA=toys MODELS="pop markov diffurec diffurecsys" SEEDS=3 [BASELINE=markov] [TRAIN_DEFAULTS=diffurec]
	$(PY) -m diffurec_lightning.analysis.reproduce --data $(DATA) --models $(MODELS) --seeds $(SEEDS) --baseline $(or $(BASELINE),markov) $(if $(TRAIN_DEFAULTS),--train-defaults $(TRAIN_DEFAULTS)) $(ARGS)

# -- sweeps, SLURM, seeds (docs/experiments.md) ---------------------------------------------------
SWEEP      ?= sweeps/diffurecsys_toys.yaml
SWEEP_ID   ?=
COUNT      ?=
GPUS       ?= 1
NODES      ?= 1
SLURM_OPTS ?=
SEEDS      ?= 5

sweep: install  ## check a W&B sweep file against conf/, then create it (wandb login): make sweep SWEEP=sweeps/diffurecsys_toys.yaml
	$(PY) -m diffurec_lightning.launch.sweep --create $(SWEEP)

# The agent starts trials as `python -m ...` (a bare `python`): the venv's bin/ goes first on PATH.
agent: install  ## run sweep trials here: make agent SWEEP_ID=<entity>/<project>/<id> [COUNT=10]
	$(if $(SWEEP_ID),,$(error set SWEEP_ID=<entity>/<project>/<sweep id>, as make sweep printed it))
	PATH="$(abspath $(VENV))/bin:$$PATH" $(VENV)/bin/wandb agent $(if $(COUNT),--count $(COUNT)) $(SWEEP_ID)

slurm: install  ## submit DDP training with auto-requeue: make slurm DATA=toys GPUS=4 NODES=1 [SLURM_OPTS="--time=12:00:00 --partition=gpu"]
	$(PY) -m diffurec_lightning.launch.slurm --data $(DATA) --model $(MODEL) --gpus $(GPUS) --nodes $(NODES) $(SLURM_OPTS) $(ARGS)

seeds: install  ## one run per seed 0..SEEDS-1 (Hydra multirun): make seeds DATA=toys MODEL=diffurecsys SEEDS=5
	$(PY) -m diffurec_lightning.train -m data=$(DATA) model=$(MODEL) seed=$(shell seq -s, 0 $$(($(SEEDS) - 1))) $(ARGS)

# -- speed (docs/performance.md) ------------------------------------------------------------------
bench: install  ## throughput, % of matmul peak, memory (fp32, bf16-mixed): make bench DATA=toys MODEL=diffurecsys [ARGS="bench.allocator=both"]
	$(PY) -m diffurec_lightning.bench data=$(DATA) model=$(MODEL) $(ARGS)

bench-tta: install  ## time to accuracy with the make train recipe: make bench-tta DATA=toys MODEL=diffurecsys [ARGS="tta.target=0.093"]
	$(PY) -m diffurec_lightning.bench_tta data=$(DATA) model=$(MODEL) $(ARGS)

clean:  ## remove run outputs (keeps the data cache)
	rm -rf outputs/runs outputs/multirun
