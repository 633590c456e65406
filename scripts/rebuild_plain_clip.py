"""Rebuild the shapes recipe's plain CLIP (its weights/ folder) from the shipped pieces.

    python scripts/rebuild_plain_clip.py runs/shapes-clip/weights

The judge's CLIP (latentkit/assets/judge/clip-shapes) ships without the token embedding it
shares with the shipped model's text encoder; put together again, it is the CLIP phase's
model. This writes clip/, text_encoder/ (CLIP's own text layers, as the U-Net phase starts
from them) and tokenizer/, so U-Net experiments can start without running the CLIP phase.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import latentkit
from latentkit.models.tokenizer import CLIPTokenizer
from latentkit.shapes.text_following import load_score_clip
from latentkit.weights.clip_folder import save_clip, text_encoder_config, text_encoder_of
from latentkit.weights.diffusers_folder import save_text_encoder, save_tokenizer
from latentkit.weights.shipped import shipped_folder, shipped_scoring_clip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the weights/ folder to write (must not exist)")
    args = parser.parse_args()
    if args.out.exists():
        parser.error(f"{args.out} exists; give a new folder, so that nothing is overwritten.")
    model = latentkit.load("shapes", dtype=torch.float32, device="cpu")
    clip = load_score_clip(shipped_scoring_clip(shipped_folder("shapes")), model.text_encoder)
    args.out.mkdir(parents=True)
    save_clip(clip, args.out / "clip")
    save_text_encoder(
        text_encoder_of(clip), text_encoder_config(clip.config), args.out / "text_encoder"
    )
    save_tokenizer(CLIPTokenizer.default(max_length=77), args.out / "tokenizer")
    print(f"plain CLIP in {args.out}")


if __name__ == "__main__":
    main()
