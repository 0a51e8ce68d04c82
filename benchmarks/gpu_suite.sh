#!/usr/bin/env bash
# Every GPU test and benchmark in one go, for a lent H100/H200 (< 8 minutes), results as CSVs that name the
# device, commit and date, and one summary line per stage.
#
#   bash benchmarks/gpu_wheels.sh                      # here, with network: wheels into .cache/gpu-wheels
#   bash benchmarks/gpu_suite.sh [OUT]                 # on the GPU machine (carry .cache/gpu-wheels there)
#
# OUT defaults to $OUT/gpu-suite when the device tool sets OUT, else benchmarks/results/gpu-suite-DATE.
# Stages have their own time limits and run even when an earlier one failed; the exit status is the
# number of failed stages. The GPU image has torch + triton but not deepspeed/webdataset/submitit.
set -uo pipefail
cd "$(dirname "$0")/.."
STAMP=$(date -u +%Y%m%dT%H%MZ)
RESULTS=${1:-${OUT:+$OUT/gpu-suite}}
RESULTS=${RESULTS:-benchmarks/results/gpu-suite-$STAMP}
mkdir -p "$RESULTS"
export PYTHONPATH=$PWD TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
WHEELS=${WHEELS:-.cache/gpu-wheels}
failed=0

stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, log to RESULTS/NAME.log, one summary line
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  timeout "$limit" "$@" >"$RESULTS/$name.log" 2>&1
  rc=$?
  [ "$rc" -eq 0 ] || failed=$((failed + 1))
  printf '%-16s rc=%-3s %4ss  %s\n' "$name" "$rc" "$(( $(date +%s) - start ))" "$(tail -n 1 "$RESULTS/$name.log")" \
    | tee -a "$RESULTS/summary.txt"
}

{
  echo "date $STAMP commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} >"$RESULTS/env.txt" 2>&1
cat "$RESULTS/env.txt"

# 1. the missing packages, from wheels built on a networked machine
stage install 60 python -m pip install -q --no-index --find-links "$WHEELS" deepspeed webdataset submitit
# 2. the tests whose GPU path differs from CPU: Triton kernels compiled (not interpreted), CUDA graphs,
#    bf16 generation, the models, FLOP counting; then one real 1-GPU training run through DeepSpeed (NCCL)
stage tests 240 python -m pytest -q -x -p no:cacheprovider tests/kernels tests/generate/test_gpu.py tests/models \
  tests/test_flops.py tests/train/test_trainer.py::test_training_learns_and_writes_every_artifact
# 3. the fused kernels against the memory floor (copy bandwidth), eager torch and torch.compile
stage kernels_bench 100 python -m kernels.bench --sizes 1,16,64 --csv "$RESULTS/kernels.csv"
# 4. the CIFAR-size UNet training step: trainer vs a plain loop, TFLOP/s and MFU (bf16, batch 128)
stage train_bench 120 python benchmarks/train_throughput.py --config configs/cifar_ddpm.yaml --steps 3 --repeats 5 \
  --csv "$RESULTS/train_throughput.csv" train.precision=bf16 train.micro_batch=128
# 5. generation images/s and MFU per speed path (eager -> fused -> bf16+channels_last -> CUDA graph)
stage generate_bench 120 python benchmarks/generate_throughput.py --config configs/cifar_ddpm.yaml \
  --batch-size 128 --num 256 --csv "$RESULTS/generate_throughput.csv"
echo "results in $RESULTS; $failed stage(s) failed"
exit "$failed"
