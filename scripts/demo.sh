#!/usr/bin/env bash
# The main job end to end on the embedded default: real digits -> shards -> tiny DDPM -> sample grid PNG.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
# Threads for the load, not for nproc: OpenMP threads that share busy cores with other work are far slower
# than one thread (measured: 2 threads on 2 busy cores, 6.5x slower; on 2 idle cores 1.4x faster). So use the
# cores idle now (nproc minus the 1-minute load average), at least one. Set OMP_NUM_THREADS to override.
if [ -z "${OMP_NUM_THREADS:-}" ]; then
  load=$(cut -d' ' -f1 /proc/loadavg)
  OMP_NUM_THREADS=$(awk -v n="$(nproc)" -v l="$load" 'BEGIN { t = int(n - l); print (t < 1 ? 1 : t) }')
  export OMP_NUM_THREADS
  echo "demo: $(nproc) cores, load average $load -> OMP_NUM_THREADS=$OMP_NUM_THREADS"
fi
# One DeepSpeed op cache for the demo and the tests (scripts/test.sh): its CPU comm op compiles only once.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
python -m pipeline prepare --source digits --out data/digits
python -m pipeline train --config configs/tiny.yaml --out runs/tiny "$@"
python -m pipeline sample --checkpoint runs/tiny --sampler dpmpp --steps 20 --num 64 --out runs/tiny/samples/dpmpp-20.png
echo "sample grids: runs/tiny/samples/latest.png (DDIM 50 steps) and runs/tiny/samples/dpmpp-20.png"
