#!/usr/bin/env bash
# The shipped shapes model, from nothing: data, the three training phases, and the export
# into src/latentkit/assets/models/shapes (fp16). Run from the repository root:
#   scripts/train_shapes.sh    # everything: 75 min to 2 h on a 2-core AMD EPYC (README)
# WORK=dir puts the data and runs elsewhere (default: the repository's data/ and runs/).
# EXPORT=dir writes the exported model to dir/shapes and its CLIP to dir/clip-shapes instead
# of replacing the shipped ones (default: the package's assets), e.g. to compare a rerun;
# it must not hold either yet.
# UNET_SEED=n seeds the U-Net phase with n instead of 0 (its initial weights, those of the
# fresh text layers, and its batches, noise and timesteps); CANONICAL_STEPS=n ends the
# caption curriculum's first part after step n instead of 2,400 (of 3,600). Both are for
# measuring how the recipe varies (docs/shapes-experiments.md); the shipped model is the
# defaults'.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
WORK=${WORK:-.}
DATA=$WORK/data
RUNS=$WORK/runs
mkdir -p "$WORK"
if [ -n "${EXPORT:-}" ]; then
    export_to=(--out "$EXPORT/shapes" --clip-out "$EXPORT/clip-shapes")
    if [ -e "$EXPORT/shapes" ] || [ -e "$EXPORT/clip-shapes" ]; then
        echo "EXPORT folder $EXPORT already holds shapes/ or clip-shapes/; give a new folder." >&2
        exit 2
    fi
else
    export_to=(--out src/latentkit/assets/models/shapes
               --clip-out src/latentkit/assets/judge/clip-shapes --overwrite)
fi
UNET_SEED=${UNET_SEED:-0}
CANONICAL_STEPS=${CANONICAL_STEPS:-2400}
for setting in UNET_SEED CANONICAL_STEPS; do
    if ! [[ ${!setting} =~ ^0*([0-9]+)$ ]]; then
        echo "$setting is ${!setting}; give a whole number (0 or more)." >&2
        exit 2
    fi
    # 08 -> 8: TOML refuses leading zeros. Text, not bash arithmetic, which would wrap a
    # seed past 2**63 round to another one; the dry run below refuses it instead.
    printf -v "$setting" %s "${BASH_REMATCH[1]}"
done
unet=(train unet --config configs/shapes/unet.toml --out "$RUNS/shapes-unet"
      --set "recipe.vae=$RUNS/shapes-vae/weights" --set "recipe.text_encoder=$RUNS/shapes-clip/weights"
      --set "train.seed=$UNET_SEED" --set "recipe.init_seed=$UNET_SEED")
# The U-Net phase's settings, CANONICAL_STEPS past its schedule among them, are checked
# here by a dry run rather than after the first phases have trained.
if ! refused=$($PY -m latentkit "${unet[@]}" --until "$CANONICAL_STEPS" --dry-run 2>&1 >/dev/null); then
    echo "The U-Net phase refuses UNET_SEED=$UNET_SEED CANONICAL_STEPS=$CANONICAL_STEPS: ${refused#latentkit: error: }" >&2
    exit 2
fi
stamp() { echo "== $(date +%H:%M:%S) $*"; }
paths=(--set "recipe.data_path=$DATA/shapes-64")

stamp "data"
$PY -m latentkit data shapes --n 10000 --out "$DATA/shapes-64" --overwrite
# The same scenes with every pair said one way round ("A above B", "A left of B"): the
# U-Net's first 2,400 steps (CANONICAL_STEPS) learn on these (a curriculum:
# docs/shapes-experiments.md).
$PY -m latentkit data shapes --n 10000 --out "$DATA/shapes-64-ordered" --pair-order canonical --overwrite
$PY -m latentkit data shapes --n 256 --seed 1 --split held-out --out "$DATA/shapes-64-eval" --overwrite

# The VAE and CLIP phases are independent: side by side, one thread each. One thread per
# process also keeps a busy machine from stalling torch's spinning thread pool. The later
# phases run alone, on every core.
stamp "vae + clip"
OMP_NUM_THREADS=1 $PY -m latentkit train vae --config configs/shapes/vae.toml --out "$RUNS/shapes-vae" --quiet \
    "${paths[@]}" --set "recipe.eval_path=$DATA/shapes-64-eval" > "$WORK/vae.log" 2>&1 &
vae=$!
OMP_NUM_THREADS=1 $PY -m latentkit train clip --config configs/shapes/clip.toml --out "$RUNS/shapes-clip" \
    "${paths[@]}" --set "recipe.eval_path=$DATA/shapes-64-eval" --quiet
wait $vae || { cat "$WORK/vae.log"; exit 1; }
tail -1 "$WORK/vae.log"
stamp "unet, pairs said one way round"
$PY -m latentkit "${unet[@]}" --set "recipe.data_path=$DATA/shapes-64-ordered" \
    --set "recipe.cache_dir=$RUNS/shapes-cache-ordered" --until "$CANONICAL_STEPS"
stamp "unet, pairs said either way round"
$PY -m latentkit "${unet[@]}" "${paths[@]}" --set "recipe.cache_dir=$RUNS/shapes-cache" --resume

stamp "vae decoder"
$PY -m latentkit train vae --config configs/shapes/vae-decoder.toml --out "$RUNS/shapes-vae-decoder" \
    "${paths[@]}" --set "recipe.eval_path=$DATA/shapes-64-eval" \
    --set "recipe.init_vae=$RUNS/shapes-vae/weights" --quiet

stamp "export"
$PY scripts/export_shapes.py --unet "$RUNS/shapes-unet/weights-ema" \
    --vae "$RUNS/shapes-vae-decoder/weights/vae" \
    --clip "$RUNS/shapes-clip/weights/clip" "${export_to[@]}"
stamp "done"
