#!/usr/bin/env bash
# The GPU check (`make gpu-check`): DPO bf16 full fine-tune, QLoRA DPO and fp16 LoRA DPO on
# SmolLM2-135M-Instruct for a few steps, sampling with the HF backend and vLLM (when importable), with
# tokens/s and peak GPU memory; under 8 minutes on one GPU. `scripts/gpu_check.sh --cpu-dry-run` runs the
# same script on a tiny model on the CPU. See scripts/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
export HF_HUB_OFFLINE=1 OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}" PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" scripts/gpu_check.py "$@"
