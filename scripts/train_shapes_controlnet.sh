#!/usr/bin/env bash
# The shipped shapes-mask ControlNet, from nothing: its data, the ControlNet phase against
# the shipped shapes model, the export into src/latentkit/assets/controlnets/shapes-mask
# (fp16), and the measurement of its control (docs/shipped-model.md). From the repository
# root:
#   scripts/train_shapes_controlnet.sh    # about 75 min on a 2-core CPU
# WORK=dir puts the data, the run and the report elsewhere (default: data/, runs/, .).
# EXPORT=dir writes the ControlNet to dir/shapes-mask instead of replacing the shipped one;
# it must not hold one yet.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
WORK=${WORK:-.}
DATA=$WORK/data
RUNS=$WORK/runs
if [ -n "${EXPORT:-}" ]; then
    out=$EXPORT/shapes-mask
    overwrite=""
    if [ -e "$out" ]; then
        echo "EXPORT folder $EXPORT already holds shapes-mask/; give a new folder." >&2
        exit 2
    fi
else
    out=src/latentkit/assets/controlnets/shapes-mask
    overwrite="--overwrite"
fi
mkdir -p "$WORK"
stamp() { echo "== $(date +%H:%M:%S) $*"; }

stamp "data"
# The training scenes with half the captions saying only what the objects are, not where
# (latentkit data shapes --where sometimes): the mask says where.
$PY -m latentkit data shapes --n 10000 --out "$DATA/shapes-64-where-sometimes" --where sometimes --overwrite
$PY -m latentkit data shapes --n 256 --seed 1 --split held-out --out "$DATA/shapes-64-eval" --overwrite

# One thread: on a busy 2-core machine a second one mostly waits (docs/shipped-model.md).
stamp "controlnet"
OMP_NUM_THREADS=1 $PY -m latentkit train controlnet --config configs/shapes/controlnet.toml \
    --out "$RUNS/shapes-controlnet" --set "recipe.data_path=$DATA/shapes-64-where-sometimes" \
    --set "recipe.sample_data=$DATA/shapes-64-eval" \
    --set "recipe.cache_dir=$RUNS/shapes-controlnet-cache" --quiet

stamp "export"
$PY -m latentkit convert "$RUNS/shapes-controlnet/weights-ema/controlnet" "$out" --dtype fp16 $overwrite

stamp "measure"
$PY benchmarks/controlnet_control.py --controlnet "$out" --masks 120 \
    --json "$WORK/controlnet-control.json"
stamp "done"
