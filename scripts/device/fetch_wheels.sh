#!/usr/bin/env bash
# Download, on a machine with a package index, the wheels that the lent GPU machine lacks
# (its python3 is 3.12 with torch 2.11+cu130, transformers 5.17, huggingface_hub 1.33, no
# diffusers/omegaconf/nerfacc/torchao), into .whl/ at the repository root, and stage a copy of
# threestudio (without the images and meshes of its load/ folder) in .threestudio/.  Both are git-ignored and travel
# with `run(carry=[".whl", ".threestudio"])`; the working tree that travels is limited to 64 MiB.
#   scripts/device/fetch_wheels.sh [THREESTUDIO_CHECKOUT]   (default: $THREESTUDIO_ROOT)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
TS="${1:-${THREESTUDIO_ROOT:-}}"
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
grep -qx '/.threestudio/' .git/info/exclude 2>/dev/null || echo '/.threestudio/' >> .git/info/exclude
rm -rf .whl && mkdir -p .whl

# versions: those of the CPU environment the package is tested in (diffusers 0.42.1 as the issue asks)
WHEELS=(
  diffusers==0.42.1          # not on the device
  importlib_metadata==10.2.0 # diffusers needs it
  lazy-importer==0.1.0       # importlib_metadata 10 needs it
  omegaconf==2.3.0           # threestudio's configs
  typeguard==4.6.1           # threestudio.utils.typing
  typing_extensions==4.16.0  # typeguard 4.6 needs >= 4.14; the device's version is unknown
  trimesh==5.2.0             # imported by threestudio.utils.saving
  nerfacc==0.5.3             # pure Python; its CUDA kernels JIT-build with nvcc on first use
  torchao==0.18.0            # FP8 lever (optional: the lever is skipped if it does not import)
)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]%%#*}"
# antlr4-python3-runtime 4.9.3 (omegaconf's pin) is published as an sdist only: build its pure-Python wheel
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl antlr4-python3-runtime==4.9.3

rm -rf .threestudio
if [ -n "$TS" ] && [ -f "$TS/launch.py" ]; then
  mkdir -p .threestudio
  # load/: only prompt_library.json and tets/ (the images, lights and shapes are 12 MB a NeRF run never reads)
  (cd "$TS" && tar --exclude=./load/images --exclude=./load/lights --exclude=./load/shapes --exclude=./load/zero123 \
     --exclude=./outputs --exclude=./.git --exclude=./custom --exclude='*.pyc' --exclude=__pycache__ -cf - .) \
    | tar -xf - -C .threestudio
else
  echo "no threestudio checkout given (arg 1 or THREESTUDIO_ROOT): the training phase will be skipped" >&2
fi

"$PY" - <<'PY'
import os, subprocess
def size(paths):
    total = 0
    for p in paths:
        for d, _, files in os.walk(p):
            total += sum(os.path.getsize(os.path.join(d, f)) for f in files if not os.path.islink(os.path.join(d, f)))
    return total
tracked = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], capture_output=True).stdout
tree = sum(os.path.getsize(f) for f in tracked.decode().split("\0") if f and os.path.isfile(f))
for name in sorted(os.listdir(".whl")):
    print(f"  {os.path.getsize(os.path.join('.whl', name)) / 2**20:6.2f} MiB  {name}")
whl, ts = size([".whl"]), size([".threestudio"])
total = whl + ts + tree
print(f".whl {whl / 2**20:.1f} MiB + .threestudio {ts / 2**20:.1f} MiB + working tree {tree / 2**20:.1f} MiB "
      f"= {total / 2**20:.1f} MiB of the 64 MiB carry limit" + ("" if total < 64 * 2**20 else "  ** OVER **"))
PY
