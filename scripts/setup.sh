#!/usr/bin/env bash
# Create (or reuse) .venv and install the project into it. Idempotent; safe to re-run.
# torch is installed FIRST and pinned to the CPU build that lies on this machine kind's disk, so that no
# dependency can pull a multi-GB CUDA build. On a GPU machine, install your CUDA torch before running this.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
python -m pip install -q -e ".[test]"
python -c "import torch, triton, deepspeed, webdataset, submitit; print('environment ready: torch', torch.__version__, '| triton', triton.__version__, '| deepspeed', deepspeed.__version__)"
