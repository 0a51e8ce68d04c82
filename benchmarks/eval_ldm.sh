#!/usr/bin/env bash
# Pixel UNet vs latent DDPM (VAE + UNet on latents) vs pixel DiT on the real digits, trained and measured in ONE run:
# each model trains STEPS steps from its config, then benchmarks/eval_samplers.py generates NUM images
# (DPM-Solver++(2M), 20 steps) and compares them with NUM real ones in digitsnet features.
#   OMP_NUM_THREADS=1 bash benchmarks/eval_ldm.sh [OUT=runs/eval_ldm] [STEPS=1500] [NUM=1000]
set -euo pipefail
OUT=${1:-runs/eval_ldm}; STEPS=${2:-1500}; NUM=${3:-1000}
PY=${PYTHON:-python}
mkdir -p "$OUT"
[ -f "$OUT/digits/manifest.json" ] || $PY -m pipeline prepare --source digits --out "$OUT/digits" --no-progress
common=(train.steps=$STEPS train.sample_every=0 train.ckpt_every=$STEPS "data.shards=$OUT/digits")
train() { local name=$1; shift; /usr/bin/time -f "$name: trained in %e s" $PY -m pipeline train --out "$OUT/$name" "$@" 2>&1 | grep -v "step/s" || true; }
train unet --config configs/tiny.yaml "${common[@]}"
train dit --config configs/tiny.yaml "${common[@]}" model.network=dit model.patch_size=2 model.dit_hidden=64 \
    model.dit_depth=4 model.dit_heads=4 train.lr=1e-3
train vae --config configs/tiny_vae.yaml "${common[@]}"
$PY -m pipeline encode --vae "$OUT/vae" --data "$OUT/digits" --out "$OUT/latents" --no-progress
train ldm --config configs/tiny_ldm.yaml "${common[@]}" "data.shards=$OUT/latents" "model.vae=$OUT/vae"
for name in unet dit ldm; do
  echo "== $name"
  $PY -c "import sys; sys.argv[1:] = ['$OUT/$name']; from pipeline.checkpoint import load_for_inference as l; \
m = l(sys.argv[1]).model; print('parameters:', sum(p.numel() for p in m.parameters()))"
  $PY benchmarks/eval_samplers.py --checkpoint "$OUT/$name" --real "$OUT/digits" --num "$NUM" --grid dpmpp:20
done
