#!/usr/bin/env bash
# The shipped shapes-one-object LoRA, from nothing: its data (one-object scenes with
# captions without a place, beside ordinary scenes), the LoRA phase against the shipped shapes model, the export into
# src/latentkit/assets/loras/shapes-one-object.safetensors, and the two measurements of
# docs/shipped-model.md (place-less prompts; the held-out eval with the LoRA on). From the
# repository root:
#   scripts/train_shapes_lora.sh    # about an hour on a 2-core CPU (training about 40 min)
# WORK=dir puts the data, the run and the reports elsewhere (default: data/, runs/, .).
# EXPORT=dir writes the LoRA to dir/shapes-one-object.safetensors instead of replacing the
# shipped one; it must not hold one yet.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
WORK=${WORK:-.}
DATA=$WORK/data
RUNS=$WORK/runs
if [ -n "${EXPORT:-}" ]; then
    out=$EXPORT/shapes-one-object.safetensors
    if [ -e "$out" ]; then
        echo "EXPORT folder $EXPORT already holds shapes-one-object.safetensors; give a new folder." >&2
        exit 2
    fi
else
    out=src/latentkit/assets/loras/shapes-one-object.safetensors
fi
mkdir -p "$WORK" "$(dirname "$out")"
stamp() { echo "== $(date +%H:%M:%S) $*"; }

stamp "data"
# Two parts in one folder: one-object scenes whose captions say what the object is and never
# where ("a red circle", "a red circle on a white background"), and ordinary scenes whose
# captions say where, as the model learned them, so that places and relations stay read.
$PY -m latentkit data shapes --n 4000 --out "$DATA/shapes-64-lora/one-object-placeless" \
    --objects 1 --where never --overwrite
$PY -m latentkit data shapes --n 2000 --seed 1 --out "$DATA/shapes-64-lora/scenes" --overwrite

stamp "lora"
$PY -m latentkit train lora --config configs/shapes/lora.toml \
    --out "$RUNS/shapes-lora" --set "recipe.data_path=$DATA/shapes-64-lora" \
    --set "recipe.cache_dir=$RUNS/shapes-lora-cache" --quiet

stamp "export"
# The EMA weights, as the run wrote them (kohya format, float32), byte for byte.
$PY -c 'import shutil, sys; shutil.copyfile(sys.argv[1], sys.argv[2])' \
    "$RUNS/shapes-lora/weights-ema/lora.safetensors" "$out"

stamp "measure"
$PY benchmarks/lora_one_object.py --per-prompt 2 --lora "$out" \
    --json "$WORK/lora-one-object.json"
$PY -m latentkit eval --split held-out --prompts 50 --per-prompt 4 --cfg 7.5 \
    --lora "$out" --out "$WORK/eval/held-out-lora" --overwrite
stamp "done"
