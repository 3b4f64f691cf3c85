#!/usr/bin/env bash
# The GPU check (scripts/gpu_check.py): encode fp32/fp16/bf16 on the GPU against the CPU, what auto picks, the
# ONNX Runtime / OpenVINO backends installed, FAISS over GPU-encoded
# vectors, a few training steps, and the encode job on a GPU worker. Under 5 minutes on one GPU.
# Uses $PYTHON (default: .venv/bin/python when present, else python3); pass --device cpu for a smoke test.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
exec "$PYTHON" scripts/gpu_check.py "$@"
