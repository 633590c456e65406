"""Generation parameters stored inside PNG files, and read back.

Two text chunks: ``parameters`` in AUTOMATIC1111's layout (so its "PNG Info" tab, ComfyUI
and image sites read our pictures), and ``latentkit`` with the complete record as JSON, which
``latentkit generate --from`` replays exactly.

Records come back from strangers' files, so reading one never decodes the picture (a small
PNG can claim billions of pixels) and any content ends in one sentence. What a record's
settings must be is checked by ``latentkit.generation.options``, not here.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from latentkit.errors import LatentkitError
from latentkit.outputs import replace_atomically

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
        "Denoising strength": record.get("strength"),  # null unless an init image was used
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
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", a1111_parameters(record))
    info.add_text("latentkit", json.dumps(record, sort_keys=True))
    with replace_atomically(path, overwrite=overwrite, folder=False) as partial:
        image.save(partial, format="PNG", pnginfo=info)


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_JSON_RECORD_BYTES = 1 << 20  # a record is a few hundred bytes; a prompt fits many times


def read_record(path: str | Path) -> Any:
    """The record in a PNG written by latentkit, or in a JSON file (as ``latentkit info
    --json`` prints it), told apart by content; any JSON value (the caller checks it)."""
    try:
        with open(path, "rb") as file:
            head = file.read(MAX_JSON_RECORD_BYTES + 1)
    except FileNotFoundError:
        raise LatentkitError(f"{str(path)!r} does not exist.") from None
    except OSError as err:
        raise LatentkitError(f"{str(path)!r} cannot be read ({err.strerror}).") from None
    if head.startswith(PNG_SIGNATURE):
        return read_png_record(path)
    if len(head) > MAX_JSON_RECORD_BYTES:
        raise LatentkitError(
            f"{str(path)!r} is neither a PNG nor a JSON record of at most "
            f"{MAX_JSON_RECORD_BYTES:,} bytes."
        )
    try:
        text = head.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise LatentkitError(
            f"{str(path)!r} is neither a PNG nor a JSON record (it is not UTF-8 text)."
        ) from None
    return _parse_json(text, f"{str(path)!r}")


def read_png_record(path: str | Path) -> Any:
    """The JSON record latentkit stored in a PNG (any JSON value); a clear error for other
    files."""
    text = read_png_text(path)
    if "latentkit" not in text:
        hint = " (it has AUTOMATIC1111 parameters only)" if "parameters" in text else ""
        raise LatentkitError(
            f"{str(path)!r} holds no latentkit generation record{hint}; only PNGs written by "
            "latentkit generate can be replayed."
        )
    return _parse_json(text["latentkit"], f"the latentkit record in {str(path)!r}")


def _parse_json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except RecursionError:  # brackets nested thousands deep
        raise LatentkitError(f"{what} nests too deeply to be a record.") from None
    except ValueError as err:  # JSONDecodeError, and numbers of over 4300 digits
        raise LatentkitError(f"{what} is not valid JSON ({_first_line(err)}).") from None


def _first_line(err: Exception) -> str:
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def read_png_text(path: str | Path) -> dict[str, str]:
    """The text chunks of a PNG (``parameters`` and ``latentkit`` among them) that come
    before its pixels, which is where PIL, latentkit and AUTOMATIC1111 write them.

    Only the chunks before the pixel data are read: PIL's ``.text`` would decode the whole
    picture to find chunks after it. Nothing is decoded, so Pillow's warning about large
    pictures does not apply; its refusal of enormous ones is reported like any other.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path, formats=["PNG"]) as image:
                return {k: str(v) for k, v in image.info.items() if isinstance(v, str)}
    except FileNotFoundError:
        raise LatentkitError(f"image {str(path)!r} does not exist.") from None
    except Exception as err:  # PIL raises many types for files that are not PNGs
        raise LatentkitError(
            f"{str(path)!r} is not a readable PNG image ({_first_line(err)})."
        ) from None
