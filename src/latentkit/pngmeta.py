"""Generation parameters stored inside PNG files, and read back.

Two text chunks: ``parameters`` in AUTOMATIC1111's layout (so its "PNG Info" tab, ComfyUI
and image sites read our pictures), and ``latentkit`` with the complete record as JSON, which
``latentkit generate --from`` replays exactly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from .errors import LatentkitError

# Our sampler names as AUTOMATIC1111 spells them in its "Sampler:" field.
A1111_SAMPLER_NAMES = {
    "ddpm": "DDPM",
    "ddim": "DDIM",
    "euler": "Euler",
    "euler_a": "Euler a",
    "heun": "Heun",
    "lms": "LMS",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_sde": "DPM++ 2M SDE",
    "unipc": "UniPC",
}
A1111_SCHEDULE_NAMES = {"default": "Automatic", "karras": "Karras", "exponential": "Exponential"}


def a1111_parameters(record: dict[str, Any]) -> str:
    """The ``parameters`` text: prompt, ``Negative prompt:`` line, then ``Key: value`` pairs."""
    lines = [record.get("prompt", "")]
    if record.get("negative_prompt"):
        lines.append(f"Negative prompt: {record['negative_prompt']}")
    pairs = {
        "Steps": record.get("steps"),
        "Sampler": A1111_SAMPLER_NAMES.get(record.get("sampler"), record.get("sampler")),
        "Schedule type": A1111_SCHEDULE_NAMES.get(record.get("schedule"), record.get("schedule")),
        "CFG scale": record.get("cfg"),
        "Seed": record.get("seed"),
        "Size": f"{record.get('width')}x{record.get('height')}",
        "Model": record.get("model"),
        "Denoising strength": record.get("strength") if record.get("init_image") else None,
        "Clip skip": record.get("clip_skip") if record.get("clip_skip", 1) != 1 else None,
        "Version": f"latentkit {record.get('version')}",
    }
    lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in pairs.items() if v is not None))
    return "\n".join(lines)


def _quote(value: Any) -> str:
    text = str(value)
    return json.dumps(text) if ("," in text or ":" in text or "\n" in text) else text


def save_png(
    image: Image.Image, path: str | Path, record: dict[str, Any], *, overwrite: bool = False
) -> None:
    """Write ``image`` with both metadata chunks; the file appears whole or not at all, and
    an existing one is kept unless ``overwrite`` (``latentkit.outputs``)."""
    from .module_io import replace_atomically  # here: it imports torch, which info needs not

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", a1111_parameters(record))
    info.add_text("latentkit", json.dumps(record, sort_keys=True))
    with replace_atomically(path, overwrite=overwrite, folder=False) as partial:
        image.save(partial, format="PNG", pnginfo=info)


def read_png_record(path: str | Path) -> dict[str, Any]:
    """The JSON record latentkit stored in a PNG; a clear error for other files."""
    text = read_png_text(path)
    if "latentkit" not in text:
        hint = " (it has AUTOMATIC1111 parameters only)" if "parameters" in text else ""
        raise LatentkitError(
            f"{str(path)!r} holds no latentkit generation record{hint}; only PNGs written by "
            "latentkit generate can be replayed."
        )
    try:
        return json.loads(text["latentkit"])
    except json.JSONDecodeError:
        raise LatentkitError(f"the latentkit record in {str(path)!r} is not valid JSON.") from None


def read_png_text(path: str | Path) -> dict[str, str]:
    """All text chunks of a PNG (``parameters`` and ``latentkit`` among them)."""
    try:
        with Image.open(path) as image:
            return dict(getattr(image, "text", {}) or {})
    except FileNotFoundError:
        raise LatentkitError(f"image {str(path)!r} does not exist.") from None
    except Exception as err:
        raise LatentkitError(f"{str(path)!r} is not a readable image ({err}).") from None
