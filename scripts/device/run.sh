#!/usr/bin/env bash
# Issue 14's device measurements in ONE call (≤ 9 min): checks the environment, installs the wheels
# carried in .whl/ (scripts/device/fetch_wheels.sh), builds full-size random-weight SD3-medium- and
# InstaFlow-shaped models with save_pretrained, runs rfds-benchmark-step with each lever, then one
# short threestudio launch.py --train per shipped NeRF config (threestudio carried in .threestudio/).
# JSON lines land in $OUT as they come; a summary is printed last.
#   on the device:  bash scripts/device/run.sh [orchestrate.py options, e.g. --phases models,step-eager]
#   on this CPU:    bash scripts/device/run.sh --cpu-smoke    (tiny models and sizes, same path; OUT optional)
set -uo pipefail
export RFDS_DEVICE_T0="${RFDS_DEVICE_T0:-$(date +%s)}"  # the 540 s budget counts from here
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
SMOKE=0
for a in "$@"; do [ "$a" = "--cpu-smoke" ] && SMOKE=1; done
OUT="${OUT:-/tmp/rfds-device-out}"
WORK="${RFDS_DEVICE_WORK:-/tmp/rfds-device}"
mkdir -p "$OUT" "$WORK/site"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false

if [ "$SMOKE" = 0 ]; then
  nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,clocks.sm --format=csv 2>&1 | tee -a "$OUT/run.log"
  if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" .whl/*.whl \
      >>"$OUT/run.log" 2>&1 || { echo "wheel install failed (see run.log)"; tail -20 "$OUT/run.log"; exit 1; }
  else
    echo "no .whl/ carried: run scripts/device/fetch_wheels.sh first and carry .whl" | tee -a "$OUT/run.log"
  fi
fi
# the package without installing it: threestudio_rfds → custom/threestudio-rfds
ln -sfn "$ROOT/custom/threestudio-rfds" "$WORK/site/threestudio_rfds"
export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import torch, diffusers, threestudio_rfds; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'diffusers', diffusers.__version__)" \
  || { echo "environment check failed"; exit 1; }
exec "$PY" scripts/device/orchestrate.py --out "$OUT" --work "$WORK" "$@"
