"""Export a trained shapes model into the package, in fp16: the U-Net run's EMA folder (it
holds the VAE, the text encoder whose layers trained with the U-Net, and the tokenizer),
the fine-tuned decoder's VAE in place of the frozen one, and, beside the judge, the CLIP
that ``latentkit eval`` scores with: the tensors of the CLIP run that the text encoder
does not hold identically (its image tower and its own text layers).

    python scripts/export_shapes.py --unet runs/shapes-unet/weights-ema \
        --vae runs/shapes-vae-decoder/weights/vae \
        --clip runs/shapes-clip/weights/clip --out src/latentkit/assets/models/shapes \
        --clip-out src/latentkit/assets/judge/clip-shapes --overwrite
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from latentkit.errors import OutputExistsError
from latentkit.outputs import refuse_existing, replace_atomically
from latentkit.weights import load, load_vae
from latentkit.weights.clip_folder import load_clip, save_clip
from latentkit.weights.diffusers_folder import save_diffusers

LIMIT_MB = 30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--unet", type=Path, required=True, help="the U-Net run's model folder")
    parser.add_argument("--clip", type=Path, required=True, help="the CLIP run's clip/ folder")
    parser.add_argument(
        "--vae", type=Path, help="a vae/ folder with the same encoder (a decoder fine-tune)"
    )
    parser.add_argument("--out", type=Path, required=True, help="the model folder to write")
    parser.add_argument(
        "--clip-out", type=Path, help="where the scoring CLIP goes (default: OUT/clip)"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace OUT and CLIP_OUT if they exist"
    )
    args = parser.parse_args()
    try:  # before any loading: the rule every latentkit writer follows
        for path in (args.out, args.clip_out):
            if path is not None:
                refuse_existing(path, overwrite=args.overwrite)
    except OutputExistsError as err:
        parser.error(str(err))

    args.out.parent.mkdir(parents=True, exist_ok=True)
    # Casting on load and saving at the loaded dtype keeps one rounding, fp32 -> fp16.
    components = load(args.unet, dtype="fp16")
    if args.vae is not None:
        components = with_decoder_of(components, load_vae(args.vae, dtype=torch.float16))
    save_diffusers(components, args.out, dtype="fp16", overwrite=args.overwrite)
    clip_out = args.clip_out or args.out / "clip"
    # Written aside and swapped in whole: no file of an earlier CLIP stays beside the new one.
    clip_out.parent.mkdir(parents=True, exist_ok=True)
    with replace_atomically(clip_out, overwrite=args.overwrite, folder=True) as partial:
        save_clip(load_clip(args.clip).half(), partial, shared_with=components.text_encoder)
    total = report_sizes(args.out)
    if clip_out.parent != args.out:
        report_sizes(clip_out)
    if total > LIMIT_MB:
        raise SystemExit(f"the shipped model's weights must stay within {LIMIT_MB} MB")


def report_sizes(folder: Path) -> float:
    """Print each weight file's size under ``folder``; return the total in MB."""
    weights = sorted(folder.rglob("*.safetensors"))
    for path in weights:
        print(f"{path.relative_to(folder)}  {path.stat().st_size / 1e6:.2f} MB")
    total = sum(p.stat().st_size for p in weights) / 1e6
    print(f"total {total:.2f} MB of weights in {folder}")
    return total


def with_decoder_of(components, vae):
    """``components`` with ``vae`` in place of its VAE, which must encode alike: the same
    config and scaling factor and the same encoder weights (only the decoder may differ)."""
    if vae.config != components.vae.config:
        raise SystemExit(f"--vae has config {vae.config}, the U-Net's VAE {components.vae.config}")
    theirs, mine = vae.state_dict(), components.vae.state_dict()
    encoder = [k for k in mine if k.startswith(("encoder.", "quant_conv."))]
    if not all(torch.equal(theirs[k], mine[k]) for k in encoder):
        raise SystemExit("--vae has another encoder than the U-Net was trained on")
    return dataclasses.replace(components, vae=vae)


if __name__ == "__main__":
    main()
