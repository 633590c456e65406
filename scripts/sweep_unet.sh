#!/usr/bin/env bash
# Train U-Net recipe variants of the shapes model side by side (one process each, e.g. on
# one GPU), stop each after TRAIN_LIMIT seconds, export each like the shipped model and
# evaluate it on held-out prompts; print the table. The eight-variant table of
# docs/shapes-experiments.md came from this on one H200 (TRAIN_LIMIT=400):
#
#   WORK=/tmp/sweep DEVICE=cuda TRAIN_LIMIT=400 bash scripts/sweep_unet.sh
#   ONLY="A_margin F_groups16" ...     # some variants only
#   EXTRA="train.checkpoint_every=100"  # --set values for every run (space-separated)
#   SMOKE=1 ONLY=B_contrast DEVICE=cpu ...  # a check that it runs, in about a minute: 16
#                                       # images, one step on a batch of 2, 2 eval images
#
# SET=diagonal runs the second set instead (the diagonal sweep of that page), each variant
# but N8 with the diagonal pairs ("left of" <-> "above") besides the mirrors:
#
#   WORK=/tmp/sweep SET=diagonal EVAL_DEVICE=cuda TRAIN_LIMIT=440 EXTRA="train.steps=2400" bash scripts/sweep_unet.sh
#
# A run cut by the limit is evaluated at its newest checkpoint (EMA weights). Every run has
# the recipe's U-Net on the plain CLIP (scripts/rebuild_plain_clip.py), its text layers
# training along, mirror_contrast = 0.2 with the mirror word pairs; the variants add:
set -u
cd "$(dirname "$0")/.."
WORK=${WORK:-sweep}; DEVICE=${DEVICE:-cuda}; TRAIN_LIMIT=${TRAIN_LIMIT:-400}
EVAL_DEVICE=${EVAL_DEVICE:-$DEVICE}; PY=${PY:-python3}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} PYTHONUNBUFFERED=1
case ${SMOKE:-0} in  # SMOKE=1 shrinks every count; its table measures nothing
  0) IMAGES=10000; SMOKE_SETS=""; EVAL_SIZE=(--prompts 50 --per-prompt 4) ;;
  # Two prompts: the first two held-out ones are a one-object and a two-object prompt,
  # so that the table has every column.
  1) IMAGES=16; SMOKE_SETS="train.steps=1 recipe.data.global_batch=2"
     EVAL_SIZE=(--prompts 2 --per-prompt 1 --steps 2) ;;
  *) echo "sweep_unet.sh: SMOKE is '$SMOKE'; give 1 (a quick check that it runs) or 0." >&2; exit 2 ;;
esac
M='recipe.mirror_margin=40.0'
COLOURS='["red", "green", "blue", "yellow", "orange", "purple", "white"]'
SHAPES='["circle|disc", "square", "triangle", "star", "hexagon"]'
G="recipe.contrast_groups=[$COLOURS, $SHAPES]"
D='recipe.mirror_diagonal=[["left of|to the left of|on the left of", "above"], ["right of|to the right of|on the right of", "below|under|beneath"]]'
R16='recipe.mirror_margin_rows=16'; C16='recipe.mirror_contrast_rows=16'
declare -A DIAGONAL=(  # SET=diagonal
  [N1_margin_diag]="$M;$D"
  [N2_margin16_diag]="$M;$D;$R16;$C16"
  [N3_margin16_diag_groups]="$M;$D;$R16;$C16;$G"
  [N4_diag16]="$D;$C16"
  [N5_diag_groups24]="$D;$G;recipe.mirror_contrast_rows=24"
  [N6_margin20_16_diag_groups]="recipe.mirror_margin=20.0;$D;$R16;$C16;$G"
  [N7_caption16_diag_groups]="recipe.mirror_margin=16.0;recipe.mirror_margin_tokens=caption;$D;$R16;$C16;$G"
  [N8_margin]="$M"
)
declare -A FIRST=(  # SET=first (the default); ";"-separated --set values
  [A_margin]="$M"
  [B_contrast]=""
  [C_margin_groups]="$M;$G"
  [D_groups]="$G"
  [E_margin_groups16]="$M;$G;recipe.mirror_contrast_rows=16"
  [F_groups16]="$G;recipe.mirror_contrast_rows=16"
  [G_margin_groups_t300]="$M;$G;recipe.mirror_contrast_from=300"
  [H_margin_groups_size]="$M;recipe.contrast_groups=[$COLOURS, $SHAPES, [\"small\", \"large\"]]"
)
case ${SET:-first} in
  first) declare -n VARIANTS=FIRST ;;
  diagonal) declare -n VARIANTS=DIAGONAL ;;
  *) echo "sweep_unet.sh: SET is '$SET'; choose first or diagonal." >&2; exit 2 ;;
esac
NAMES=${ONLY:-${!VARIANTS[@]}}
for name in $NAMES; do
  [ -n "${VARIANTS[$name]+set}" ] || { echo "sweep_unet.sh: ONLY names $name, which is no variant; choose from: ${!VARIANTS[*]}." >&2; exit 2; }
done
[[ "$TRAIN_LIMIT" =~ ^[1-9][0-9]*$ ]] || { echo "sweep_unet.sh: TRAIN_LIMIT is '$TRAIN_LIMIT'; give whole seconds, e.g. 400." >&2; exit 2; }
mkdir -p "$WORK/runs" "$WORK/exports" "$WORK/evals" "$WORK/logs"
[ -d "$WORK/data" ] || $PY -m latentkit data shapes --n "$IMAGES" --out "$WORK/data" || exit 1
[ -d "$WORK/clip" ] || $PY scripts/rebuild_plain_clip.py "$WORK/clip" || exit 1
VAE=src/latentkit/assets/models/shapes

train() {  # name
  local sets=() extra
  IFS=';' read -ra extra <<< "${VARIANTS[$1]}"
  for s in "${extra[@]}" ${EXTRA:-} $SMOKE_SETS; do [ -n "$s" ] && sets+=(--set "$s"); done
  timeout "$TRAIN_LIMIT" $PY -m latentkit train unet --config configs/shapes/unet.toml \
    --out "$WORK/runs/$1" --device "$DEVICE" --quiet \
    --set recipe.data_path="$WORK/data" --set recipe.vae="$VAE" \
    --set recipe.text_encoder="$WORK/clip" --set recipe.cache_dir="$WORK/cache-$1" \
    --set 'recipe.mirror_horizontal=[["left", "right"]]' \
    --set 'recipe.mirror_vertical=[["top|upper", "bottom|lower"], ["above", "below|under|beneath"]]' \
    --set recipe.mirror_contrast=0.2 --set recipe.mirror_contrast_weight=1.0 "${sets[@]}"
}

ema_weights() {  # name: the finished run's EMA folder, else its newest checkpoint's
  local run=$WORK/runs/$1
  if [ -d "$run/weights-ema" ]; then echo "$run/weights-ema"; return; fi
  local newest; newest=$(ls -d "$run"/checkpoints/step-* 2>/dev/null | tail -1)
  [ -n "$newest" ] || return 1
  local step=$((10#${newest##*step-})) snap=$run-snapshot
  mkdir -p "$snap/checkpoints" && cp "$run/config.toml" "$snap/" && cp -r "$newest" "$snap/checkpoints/"
  # Resuming at the last step writes the weights (and EMA) without training further.
  $PY -m latentkit train unet --config "$snap/config.toml" --out "$snap" --resume \
    --device "$DEVICE" --quiet --set train.steps="$step" >&2 || return 1
  echo "$snap/weights-ema"
}

one() {  # name
  train "$1" > "$WORK/logs/$1.log" 2>&1
  local weights; weights=$(ema_weights "$1" 2>>"$WORK/logs/$1.log") || { echo "$1: no weights"; return; }
  $PY scripts/export_shapes.py --unet "$weights" --vae "$VAE/vae" --clip "$WORK/clip/clip" \
    --out "$WORK/exports/$1" >> "$WORK/logs/$1.log" 2>&1
  $PY -m latentkit eval --model "$WORK/exports/$1" --split held-out "${EVAL_SIZE[@]}" \
    --cfg 7.5 --device "$EVAL_DEVICE" --out "$WORK/evals/$1" >> "$WORK/logs/$1.log" 2>&1
  echo "$1: done ($weights)"
}

for name in $NAMES; do one "$name" & done
wait
$PY - "$WORK/evals" <<'TABLE'
import json, sys
from pathlib import Path
keys = ["count", "shape", "colour", "size", "position_or_relation", "background", "all"]
print("variant " + " ".join(keys) + " pairs-in-order/swapped/neither one-object-shape/position "
      "two-object-shape/relation")
for report in sorted(Path(sys.argv[1]).glob("*/report.json")):
    r = json.loads(report.read_text())
    a, o, k = r["accuracy"], r["two_object_order"], r["by_kind"]
    order = "/".join(f"{100 * o[key]:.0f}" for key in ("in_order", "swapped", "undecided"))
    one, two = k["one_object"], k["two_objects"]
    kinds = (f"{100 * one['shape']:.0f}/{100 * one['position_or_relation']:.0f} "
             f"{100 * two['shape']:.0f}/{100 * two['position_or_relation']:.0f}")
    print(report.parent.name, " ".join(f"{100 * a[key]:.1f}" for key in keys), order, kinds)
TABLE
