"""Export a trained shapes model into the package, in fp16: the U-Net run's EMA folder (it
already holds the frozen VAE, text encoder and tokenizer) plus the CLIP run's image half.

    python scripts/export_shapes.py --unet runs/shapes-unet/weights-ema \
        --clip runs/shapes-clip/weights/clip --out src/latentkit/assets/models/shapes
"""

from __future__ import annotations

import argparse
from pathlib import Path

from latentkit.diffusers_folder import save_diffusers
from latentkit.judge.text_following import save_image_half
from latentkit.train.clip import load_clip
from latentkit.weights import load

LIMIT_MB = 30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--unet", type=Path, required=True, help="the U-Net run's model folder")
    parser.add_argument("--clip", type=Path, required=True, help="the CLIP run's clip/ folder")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    args.out.parent.mkdir(parents=True, exist_ok=True)
    # Casting on load and saving at the loaded dtype keeps one rounding, fp32 -> fp16.
    components = load(args.unet, dtype="fp16")
    save_diffusers(components, args.out, dtype="fp16", overwrite=True)
    save_image_half(load_clip(args.clip).half(), args.out / "clip")

    weights = sorted(args.out.rglob("*.safetensors"))
    total = sum(p.stat().st_size for p in weights) / 1e6
    for path in weights:
        print(f"{path.relative_to(args.out)}  {path.stat().st_size / 1e6:.2f} MB")
    print(f"total {total:.2f} MB of weights in {args.out}")
    if total > LIMIT_MB:
        raise SystemExit(f"the shipped weights must stay within {LIMIT_MB} MB")


if __name__ == "__main__":
    main()
