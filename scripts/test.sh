#!/usr/bin/env bash
# The whole test suite (CPU; Triton kernels in interpreter mode). Extra arguments go to pytest.
# SLURM end-to-end tests need the local cluster: `bash tests/slurm/start.sh` (root) first, as .ci/run does.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
. .venv/bin/activate
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# DeepSpeed JIT-compiles a CPU comm op on first use (~1-4 min): cache it inside the checkout, in the same
# folder as scripts/demo.sh (and tests/conftest.py for a bare pytest), so it compiles once for all three.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
python -m pytest tests -ra --durations=15 "$@"
rc=$?
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi
exit "$rc"
