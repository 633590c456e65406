"""One request, checked whole before it is queued: the model it names, its settings and its
pictures. Every API of the server (native, AUTOMATIC1111's, OpenAI's) turns its body into the
native fields and comes through :func:`check_request`, which uses the shared validator of every
way in (``options_from_fields`` + ``prepare_for_run``) and adds the server's own limits, so
a refused request starts no work and is refused in the same words everywhere.

Pictures arrive as base64 text (plain or a ``data:`` URL) or as the bytes of an uploaded
file. Their size is read from the header and capped before any pixel is decoded.

Add-ons are named, never given by path: ``<lora:NAME:WEIGHT>`` in a prompt (every API) or
the native ``loras`` field (``[{"name": NAME, "weight": W}]``) finds NAME in the server's
``--lora-dir`` or among the shipped LoRAs; embeddings are found by the prompt's words in
its ``--embedding-dir``. Every file a request names is read and checked before it is queued.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import re
from dataclasses import dataclass
from typing import Any

from PIL import Image

from latentkit.config import brief_repr
from latentkit.errors import ConfigError, LatentkitError
from latentkit.generation.addons import AddOns, check_addons, check_weight, find_lora
from latentkit.generation.options import (
    GenerateOptions,
    options_from_fields,
    prepare_for_run,
    require_settings_object,
)
from latentkit.generation.pipeline import image_size
from latentkit.images import TooManyPixels, open_capped
from latentkit.models.components import Components
from latentkit.runtime.memory import check_fits
from latentkit.weights.lora_files import read_lora

# What one request may ask of a shared server (the library itself has no upper bounds).
MAX_STEPS = 500
MAX_SIDE = 2048
MAX_INPUT_PIXELS = 4096 * 4096  # an uploaded init image or mask, before it is decoded
PICTURE_FIELDS = ("init_image", "mask")
_DATA_URL = re.compile(r"data:image/[a-z0-9.+-]+;base64,", re.IGNORECASE)


class UnknownName(LatentkitError):
    """A job, model or image name the server does not know (HTTP 404)."""


@dataclass(frozen=True)
class Request:
    """A checked request: ready to run, nothing left to refuse."""

    model: str
    options: GenerateOptions
    init_image: Image.Image | None = None
    mask: Image.Image | None = None
    addons: AddOns | None = None  # None: the base model alone


def model_names(models: dict[str, Components]) -> str:
    return ", ".join(models)


def choose_model(models: dict[str, Components], name: Any) -> str:
    """The model a request names (by name only, never a path); the first when absent."""
    if name is None:
        return next(iter(models))
    if not isinstance(name, str):
        raise ConfigError(f"model must be a model name, got {brief_repr(name)}.")
    if name in models:
        return name
    if any(sep in name for sep in "/\\") or name.endswith((".safetensors", ".ckpt", ".pt")):
        raise ConfigError(f"models are chosen by name, not by path; valid: {model_names(models)}.")
    raise UnknownName(f"no model is named {brief_repr(name)}; valid: {model_names(models)}.")


def decode_picture(value: Any, field: str) -> Image.Image:
    """A picture from base64 text (plain or a data: URL) or an uploaded file's bytes,
    decoded only when its header claims at most ``MAX_INPUT_PIXELS`` pixels."""
    if isinstance(value, str):
        text = _DATA_URL.sub("", value.strip(), count=1)
        try:
            value = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise ConfigError(
                f"{field} must be a PNG or JPEG picture as base64 text (or a data: URL)."
            ) from None
    if not isinstance(value, (bytes, bytearray)):
        raise ConfigError(f"{field} must be a picture as base64 text, got {brief_repr(value)}.")
    try:
        with open_capped(io.BytesIO(value), MAX_INPUT_PIXELS, what=field) as image:
            image.load()
            return image.copy()
    except TooManyPixels:
        raise
    except Exception:  # Pillow raises many types for bytes that are not a picture
        raise ConfigError(f"{field} is not a readable picture (PNG, JPEG or WebP).") from None


def default_size_from(options: GenerateOptions, init_image: Image.Image | None):
    """With an init image and no size asked, the init image's size (down to a multiple of
    8), as diffusers' image-to-image does; otherwise the options as they are."""
    if init_image is None or (options.width and options.height):
        return options
    width, height = (max(8, side - side % 8) for side in init_image.size)
    return dataclasses.replace(
        options, width=options.width or width, height=options.height or height
    )


def fit_mask(mask: Image.Image | None, size: tuple[int, int], init_image) -> Image.Image | None:
    """The mask at the picture's size: a mask drawn over the init image (the same size as
    it) is scaled with the picture, nearest-neighbour; any other size is refused."""
    if mask is None or mask.size == size:
        return mask
    if init_image is not None and mask.size == init_image.size:
        return mask.convert("L").resize(size, Image.NEAREST)
    raise ConfigError(
        f"the mask is {mask.size[0]}x{mask.size[1]}; give it the init image's size "
        f"({init_image.size[0]}x{init_image.size[1]}) or the picture's ({size[0]}x{size[1]})."
    )


def named_loras(value: Any, folders: AddOns) -> list:
    """The (LoRA, weight) pairs of a native ``loras`` field: a list of
    ``{"name": NAME, "weight": W}`` (weight 1 when absent), each NAME found as a tag's is."""
    if value is None:
        return []
    if not isinstance(value, list):
        example = '[{"name": "NAME", "weight": 0.8}]'
        raise ConfigError(f"loras must be a list like {example}, got {brief_repr(value)}.")
    loras = []
    for entry in value:
        if not (isinstance(entry, dict) and isinstance(entry.get("name"), str)):
            raise ConfigError(
                f'each of loras must be {{"name": "NAME", "weight": W}}, got {brief_repr(entry)}.'
            )
        unknown = set(entry) - {"name", "weight"}
        if unknown:
            raise ConfigError(
                f"a loras entry has name and weight only, not {', '.join(sorted(unknown))}."
            )
        name = entry["name"]
        weight = check_weight(entry.get("weight", 1.0), f"the LoRA {name!r}")
        path = find_lora(folders.lora_dir, name)
        loras.append((read_lora(path, allow_pickle=folders.allow_pickle), weight))
    return loras


def request_addons(
    components: Components, folders: AddOns, loras: list, options: GenerateOptions
) -> AddOns | None:
    """The add-ons a request uses (its LoRAs and the server's folders), every file read and
    checked against the model now; None when it uses none, so it may share a batch."""
    addons = dataclasses.replace(folders, loras=loras)
    active = check_addons(components, addons, [options.prompt], [options.negative_prompt])
    return addons if active.loras or active.embeddings else None


def check_request(
    models: dict[str, Components], body: Any, folders: AddOns | None = None
) -> Request:
    """The checked request for a native request body, or one sentence saying why not
    (ConfigError, UnknownName, WeightsError). ``folders`` holds the server's ``lora_dir``
    and ``embedding_dir``. Nothing is run."""
    folders = folders or AddOns()
    fields = dict(require_settings_object(body, "the request body"))
    model = choose_model(models, fields.pop("model", None))
    pictures = {name: fields.pop(name, None) for name in PICTURE_FIELDS}
    lora_field = fields.pop("loras", None)
    options = options_from_fields(fields)  # settings first: a typo beats a bad picture
    addons = request_addons(models[model], folders, named_loras(lora_field, folders), options)
    init_image, mask = (
        None if value is None else decode_picture(value, name) for name, value in pictures.items()
    )
    if mask is not None and init_image is None:
        raise ConfigError("a mask needs an init_image to paint into; give init_image too.")
    options = prepare_for_run(
        default_size_from(options, init_image), init_image=init_image is not None
    )
    if options.steps > MAX_STEPS:
        raise ConfigError(f"steps must be at most {MAX_STEPS} on this server, got {options.steps}.")
    components = models[model]
    width, height = image_size(components, options)
    if max(width, height) > MAX_SIDE:
        raise ConfigError(
            f"width and height must be at most {MAX_SIDE} pixels on this server, "
            f"got {width}x{height}."
        )
    device, dtype = components.placement(None, None)
    check_fits(components, (width, height), options.n, options.cfg, device, dtype)
    mask = fit_mask(mask, (width, height), init_image)
    return Request(model, options, init_image, mask, addons)
