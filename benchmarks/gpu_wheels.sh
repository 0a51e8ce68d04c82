#!/usr/bin/env bash
# Wheels for the GPU machine, built HERE (it has no network): deepspeed, webdataset, submitit and their pure or
# cp312 dependencies, for its Python 3.12. torch, triton and numpy are already on that image.
#   bash benchmarks/gpu_wheels.sh [DIR]     (default .cache/gpu-wheels; pass it to the device run as `carry`)
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.cache/gpu-wheels}
PIP=${PIP:-python -m pip}
mkdir -p "$DIR"
$PIP wheel -q --no-deps -w "$DIR" deepspeed==0.19.8  # an sdist: builds a py3-none-any wheel (~16 s)
$PIP download -q --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d "$DIR" \
  webdataset==1.0.2 submitit==1.5.4 braceexpand cloudpickle einops hjson msgpack ninja psutil py-cpuinfo pydantic \
  typing_extensions
ls "$DIR" | sed 's/^/  /'
du -sh "$DIR"
