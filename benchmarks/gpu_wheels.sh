#!/usr/bin/env bash
# Wheels for the GPU machine, built HERE (it has no network): deepspeed, webdataset, submitit and their pure or
# cp312 dependencies, for its Python 3.12. torch, triton and numpy are already on that image.
#   bash benchmarks/gpu_wheels.sh [DIR]          (default .cache/gpu-wheels; pass it to the device run as `carry`)
#   bash benchmarks/gpu_wheels.sh --check [DIR]  is every requirement there or on the image? (no network; the
#                                                smoke run of gpu_suite.sh does this in place of installing)
set -euo pipefail
cd "$(dirname "$0")/.."
PACKAGES="deepspeed webdataset submitit"
# What the GPU image already holds of their requirements (.library/device/KINDS.md, read 2026-11-17)
IMAGE_HAS="torch triton numpy packaging tqdm pyyaml psutil msgpack ninja einops cloudpickle py-cpuinfo
  typing-extensions"
if [ "${1:-}" = --check ]; then
  exec python3 - "${2:-.cache/gpu-wheels}" "$PACKAGES" "$IMAGE_HAS" <<'PY'
import sys
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.tags import compatible_tags, cpython_tags
from packaging.utils import canonicalize_name, parse_wheel_filename

folder, wanted, image = Path(sys.argv[1]), sys.argv[2].split(), {canonicalize_name(n) for n in sys.argv[3].split()}
target = dict(python_version="3.12", python_full_version="3.12.3", implementation_name="cpython",
              platform_python_implementation="CPython", sys_platform="linux", platform_system="Linux",
              platform_machine="x86_64", os_name="posix", extra="")
platforms = ["linux_x86_64", "manylinux1_x86_64", "manylinux2010_x86_64", "manylinux2014_x86_64",
             *(f"manylinux_2_{n}_x86_64" for n in range(5, 40))]
usable = {*cpython_tags((3, 12), platforms=platforms), *compatible_tags((3, 12), "cp312", platforms)}
problems, wheels = [], {}
for path in sorted(folder.glob("*.whl")):
    name, version, _, tags = parse_wheel_filename(path.name)
    if not tags & usable:
        problems.append(f"{path.name} does not install on CPython 3.12, x86-64 Linux")
    if name in wheels:
        problems.append(f"two versions of {name}: {wheels[name][0]} and {version}")
    wheels[name] = (version, path)
queue, seen = [Requirement(n) for n in wanted], set()
while queue:
    req = queue.pop()
    name = canonicalize_name(req.name)
    if name in wheels:
        version, path = wheels[name]
        if not req.specifier.contains(version, prereleases=True):
            problems.append(f"{path.name} does not satisfy {req}")
        elif name not in seen:
            seen.add(name)
            with zipfile.ZipFile(path) as wheel:
                metadata = wheel.read(next(m for m in wheel.namelist() if m.endswith(".dist-info/METADATA")))
            requires = [Requirement(line.split(":", 1)[1]) for line in metadata.decode().splitlines()
                        if line.startswith("Requires-Dist:")]
            queue += [r for r in requires if not r.marker or r.marker.evaluate(target)]
    elif name not in image:
        problems.append(f"{req} (needed by the wheels) is neither in {folder} nor on the GPU image")
print("\n".join(problems) or f"{folder}: {len(wheels)} wheels hold every requirement of {' '.join(wanted)} "
      f"that the GPU image lacks")
sys.exit(1 if problems else 0)
PY
fi
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
