#!/usr/bin/env bash
# Every GPU test and benchmark in one go, for a lent H100/H200 (one device call, < 10 minutes), results as CSVs
# that name the device, commit and date, and one summary line per stage (printed, and at the end of stages.log).
#
#   bash benchmarks/gpu_wheels.sh                      # here, with network: wheels into .cache/gpu-wheels
#   BENCH_COMMIT=<commit> bash benchmarks/gpu_suite.sh [OUT]  # on the GPU machine (carry .cache/gpu-wheels
#                                                      # there); it gets the files without .git: name the commit
#   GPU_SUITE_SMOKE=1 bash benchmarks/gpu_suite.sh [OUT]   # here, on CPU, ~1-2 min (tests/test_gpu_suite.py)
#
# OUT defaults to $OUT/gpu-suite when the device tool sets OUT, else benchmarks/results/gpu-suite-DATE.
# Stages have their own time limits (together 595 s at worst) and run even when an earlier one failed; the
# exit status is the number of failed stages. The GPU image has torch + triton but not
# deepspeed/webdataset/submitit; its `python3` is the one with torch.
# The smoke run (GPU_SUITE_SMOKE=1) runs every stage with the same command lines at toy sizes, so that a typo,
# a missing file or test id, or a benchmark that breaks on its arguments shows here, not in the scarce GPU
# minutes: the tests are only collected, the kernels run in Triton's interpreter, the models are the tiny config.
set -uo pipefail
cd "$(dirname "$0")/.."
STAMP=$(date -u +%Y%m%dT%H%MZ)
RESULTS=${1:-${OUT:+$OUT/gpu-suite}}
RESULTS=${RESULTS:-benchmarks/results/gpu-suite-$STAMP}
mkdir -p "$RESULTS"
# unbuffered: a stage stopped at its time limit still shows in its log how far it got
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
WHEELS=${WHEELS:-.cache/gpu-wheels}
failed=0

# The sizes of the GPU run. The smoke run changes these (and installs nothing), so both run the same command lines.
TESTS=(tests/kernels tests/generate/test_gpu.py tests/models tests/test_flops.py
       tests/train/test_trainer.py::test_training_learns_and_writes_every_artifact)
PYTEST_MODE=  # every test runs; no -x: one failure must not hide the others in a run that cannot be repeated
KERNEL_SIZES=1,16,64 ADALN_SIZES=16,64
GROUP_NORM=(--sizes 64 --channels 128 --resolution 32 --groups 32)  # a CIFAR UNet's first level, batch 512
KERNEL_DTYPES=bfloat16,float32  # bf16 first (the issue's target): kept if a time limit stops the fp32 rows
CONFIG=configs/cifar_ddpm.yaml BATCH=128 STEPS=3 REPEATS=5 NUM=256
LIMIT_SCALE=1
INSTALL=(python3 -m pip install -q --no-index --find-links "$WHEELS" deepspeed webdataset submitit)
if [ "${GPU_SUITE_SMOKE:-0}" = 1 ]; then
  PYTEST_MODE=--collect-only  # the same test ids must exist and import
  KERNEL_SIZES=0.0625 ADALN_SIZES=0.25 KERNEL_DTYPES=bfloat16  # one sample; bf16 is the dtype GPU runs add
  GROUP_NORM=(--sizes 0.001 --channels 16 --resolution 8 --groups 4)  # one sample, 4 interpreted programs
  CONFIG=configs/tiny.yaml BATCH=2 STEPS=1 REPEATS=1 NUM=2
  LIMIT_SCALE=3  # a busy 2-core CPU, kernels interpreted: toy sizes are not always faster than the GPU's
  # torch.compile calls stay but compile nothing: on CPU the references draw their noise in C (ctypes), so
  # compiling them here would cost a minute and test another path than the GPU's
  export TRITON_INTERPRET=1 TORCH_COMPILE_DISABLE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  if [ -d "$WHEELS" ]; then  # pip here would find the packages already installed: check the folder instead
    INSTALL=(bash benchmarks/gpu_wheels.sh --check "$WHEELS")
  else
    INSTALL=(echo "skipped in the smoke run: no $WHEELS here (bash benchmarks/gpu_wheels.sh builds it, with network)")
  fi
fi

SUMMARY=$(mktemp)
stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, its output into RESULTS/stages.log, one summary line
  local name=$1 limit=$(($2 * LIMIT_SCALE)) log=$RESULTS/$1.log start rc
  shift 2
  start=$(date +%s)
  timeout -k 5 "$limit" "$@" >"$log" 2>&1
  rc=$?
  [ "$rc" -eq 0 ] || failed=$((failed + 1))
  printf '%-16s rc=%-3s %4ss  %s\n' "$name" "$rc" "$(( $(date +%s) - start ))" "$(tail -n 1 "$log")" \
    | tee -a "$SUMMARY"
  # one log file for all stages: the device tool brings back at most 8 files (7 CSVs and this)
  { echo "=== $name (rc=$rc): $*"; cat "$log"; } >>"$RESULTS/stages.log" && rm "$log"
}

{
  echo "date $STAMP commit $(git rev-parse --short=12 HEAD 2>/dev/null || echo "${BENCH_COMMIT:-unknown}")"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$RESULTS/stages.log"  # the environment heads the stages' log

# Time limits (seconds, GPU): 30 + 200 + 120 + 55 + 145 + 25 + 20 = 595, about 10 minutes at worst (+ ~15 s for the environment;
# give the device call timeout_s 600; the train stage's CIFAR compile is the least known). The issue's goals come first (training MFU, generation MFU and DDIM-50 speed,
# bf16 kernels vs copy), the tests after them; the kernel benchmarks append each size's rows as they finish.
# 1. the missing packages, from wheels built on a networked machine
stage install 30 "${INSTALL[@]}"
# 2. the CIFAR-size UNet training step (bf16, batch 128), a ladder that adds one switch a row: every switch off,
#    + channels_last, + the fused GroupNorm kernel, + torch.compile (one compile), and a plain loop, interleaved; TFLOP/s and MFU; then a profile of each trainer
#    by category (convolutions, norms, attention, optimizer, EMA, device idle) into train_profile.csv
stage train_bench 200 python3 benchmarks/train_throughput.py --config "$CONFIG" --steps "$STEPS" \
  --repeats "$REPEATS" --csv "$RESULTS/train_throughput.csv" --profile --switch train.channels_last=true \
  --switch "train.channels_last=true train.fused_norm=true" \
  --switch "train.channels_last=true train.fused_norm=true train.compile=true" train.precision=bf16 \
  train.micro_batch="$BATCH"
# 3. generation images/s and MFU per speed path (eager -> fused -> bf16+channels_last -> CUDA graph -> compile);
#    then a profile of one forward per path without a graph into generate_profile.csv
stage generate_bench 120 python3 benchmarks/generate_throughput.py --config "$CONFIG" --batch-size "$BATCH" \
  --num "$NUM" --compile --profile --csv "$RESULTS/generate_throughput.csv"
# 4. the fused kernels against the memory floor (copy bandwidth), eager torch and torch.compile
stage kernels_bench 55 python3 -m kernels.bench --sizes "$KERNEL_SIZES" --dtypes "$KERNEL_DTYPES" \
  --csv "$RESULTS/kernels.csv"
# 5. the tests whose GPU path differs from CPU: Triton kernels compiled (not interpreted), CUDA graphs,
#    bf16 generation, the models, FLOP counting; then one real 1-GPU training run through DeepSpeed (NCCL). Each
#    distinct kernel specialisation the tests reach is a Triton compile (~90 for the GroupNorm tests alone)
stage tests 145 python3 -m pytest -q -p no:cacheprovider $PYTEST_MODE "${TESTS[@]}"
# 6. the adaLN kernels (modulated LayerNorm, gated residual), the same comparison as stage 4
stage adaln_bench 25 python3 -m kernels.bench_adaln --sizes "$ADALN_SIZES" --dtypes "$KERNEL_DTYPES" \
  --csv "$RESULTS/adaln.csv"
# 7. the fused GroupNorm + scale-shift + SiLU (train.fused_norm) against copy and eager, both layouts, without
#    torch.compile (a compile per op, dtype and layout would not fit; stage 2 has the compiled model); last: the
#    least needed, and the one a device call's time limit would cut
stage group_norm_bench 20 python3 -m kernels.bench_group_norm "${GROUP_NORM[@]}" --dtypes "$KERNEL_DTYPES" \
  --no-compile --csv "$RESULTS/group_norm.csv"
{ echo "=== summary"; cat "$SUMMARY"; } >>"$RESULTS/stages.log" && rm "$SUMMARY"
echo "results in $RESULTS; $failed stage(s) failed"
exit "$failed"
