"""The AUTOMATIC1111-compatible API under ``/sdapi/v1``, over the same job queue.

A1111 clients (webuiapi, editor plugins, bots) call ``txt2img``/``img2img`` and wait for
the pictures. Here each such call is translated into one native job (``queue.submit``:
the shared validator, limits and memory check), awaited without tying up a thread, and
answered in A1111's shape: base64 PNGs (the result files themselves, parameters inside),
the request echoed, and ``info``, a JSON string with A1111's keys.

The translation is strict where A1111 is loose, so that nothing a client asks for is
silently dropped:

* every field A1111's API documents is known here (``TXT2IMG_FIELDS``/``IMG2IMG_FIELDS``);
  any other name is refused (422), so a typo does not leave a setting at its default;
* a field for a feature latentkit lacks (hires fix, face restoration, scripts, ...) is
  accepted only at a value that has no effect, which is A1111's own default or what
  latentkit does anyway (``NO_EFFECT``); any other value is refused naming the field and
  what is valid. Clients such as webuiapi send every field with its default, so their
  ordinary calls pass;
* sampler names are A1111's (one table, ``A1111_SAMPLERS``), legacy combined names such as
  "DPM++ 2M Karras" included; an unknown one is refused listing the valid names.

Server-wide A1111 options (``/options``) are the default model and clip skip, chosen by
name only; they live in this router, not in the queue, so the native API is unaffected.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Depends, Request

from latentkit.config import brief_repr
from latentkit.errors import ConfigError, LatentkitError
from latentkit.generation.addons import available_loras
from latentkit.generation.options import MAX_IMAGES
from latentkit.generation.pipeline import image_size
from latentkit.generation.pngmeta import (
    A1111_SAMPLER_NAMES,
    A1111_SCHEDULE_NAMES,
    PNG_SIGNATURE,
    read_png_text,
)
from latentkit.images import open_capped
from latentkit.models.components import is_inpainting
from latentkit.server.common import ApiError, bearer_check, read_json, refusal
from latentkit.server.jobs import JobQueue, wait_finished
from latentkit.server.requests import MAX_INPUT_PIXELS, UnknownName

# --- samplers and schedulers ------------------------------------------------------------

# A1111's other spellings of our samplers (its "aliases"), and the schedule its "Automatic"
# picks for a sampler (A1111 runs DPM++ 2M with Karras sigmas unless told otherwise).
SAMPLER_ALIASES = {
    "euler_a": ("k_euler_a", "k_euler_ancestral"),
    "euler": ("k_euler",),
    "lms": ("k_lms",),
    "heun": ("k_heun",),
    "dpmpp_2m": ("k_dpmpp_2m",),
    "dpmpp_2m_sde": ("k_dpmpp_2m_sde",),
}
AUTOMATIC_SCHEDULE = {"dpmpp_2m": "karras", "dpmpp_2m_sde": "exponential"}
STOCHASTIC = ("euler_a", "ddpm", "dpmpp_2m_sde")  # their eta is 1, as A1111's default
AUTOMATIC = "default"  # our schedule name for A1111's "Automatic" (pngmeta's table)


@dataclass(frozen=True)
class A1111Sampler:
    name: str  # as A1111 spells it
    sampler: str  # ours
    schedule: str | None  # fixed by a legacy combined name ("DPM++ 2M Karras"), else None


def _sampler_table() -> dict[str, A1111Sampler]:
    """Every accepted spelling, lower-cased -> what it means."""
    table = {}
    for ours, name in A1111_SAMPLER_NAMES.items():
        for spelling in (name, ours, *SAMPLER_ALIASES.get(ours, ())):
            table[spelling.lower()] = A1111Sampler(name, ours, None)
        for schedule, label in A1111_SCHEDULE_NAMES.items():
            if schedule != AUTOMATIC:
                table[f"{name} {label}".lower()] = A1111Sampler(name, ours, schedule)
    return table


A1111_SAMPLERS = _sampler_table()
SCHEDULE_SPELLINGS = {
    spelling.lower(): ours
    for ours, label in A1111_SCHEDULE_NAMES.items()
    for spelling in (label, ours)
}


def resolve_sampler(sampler_name: Any, scheduler: Any) -> tuple[str, str]:
    """(our sampler, our schedule) for A1111's sampler and scheduler fields."""
    if not isinstance(sampler_name, str) or sampler_name.lower() not in A1111_SAMPLERS:
        raise ConfigError(
            f"sampler_name must be one of {', '.join(A1111_SAMPLER_NAMES.values())} (or "
            f"with Karras or Exponential appended), got {brief_repr(sampler_name)}."
        )
    sampler = A1111_SAMPLERS[sampler_name.lower()]
    if scheduler in (None, ""):
        scheduler = "automatic"
    if not isinstance(scheduler, str) or scheduler.lower() not in SCHEDULE_SPELLINGS:
        raise ConfigError(
            f"scheduler must be one of {', '.join(A1111_SCHEDULE_NAMES.values())}, "
            f"got {brief_repr(scheduler)}."
        )
    schedule = SCHEDULE_SPELLINGS[scheduler.lower()]
    if sampler.schedule is not None:
        if schedule not in (AUTOMATIC, sampler.schedule):
            raise ConfigError(
                f"sampler_name {sampler_name!r} already names its schedule; give scheduler "
                f"Automatic or use sampler_name {sampler.name!r}."
            )
        return sampler.sampler, sampler.schedule
    if schedule == AUTOMATIC:
        schedule = AUTOMATIC_SCHEDULE.get(sampler.sampler, AUTOMATIC)
    return sampler.sampler, schedule


def sampler_list() -> list[dict[str, Any]]:
    return [
        {
            "name": name,
            "aliases": list(SAMPLER_ALIASES.get(ours, ())),
            "options": {"scheduler": AUTOMATIC_SCHEDULE[ours]}
            if ours in AUTOMATIC_SCHEDULE
            else {},
        }
        for ours, name in A1111_SAMPLER_NAMES.items()
    ]


def scheduler_list() -> list[dict[str, Any]]:
    return [
        {
            "name": "automatic" if ours == AUTOMATIC else ours,
            "label": label,
            "aliases": None,
            "default_rho": 7.0 if ours == "karras" else -1,
            "need_inner_model": False,
        }
        for ours, label in A1111_SCHEDULE_NAMES.items()
    ]


# --- the request's fields ---------------------------------------------------------------


def _off(value: Any) -> bool:
    return value is None or value is False or (type(value) is int and value == 0)


def _empty(value: Any) -> bool:
    return value is None or value in ("", [], {})


def _one_of(*allowed: Any) -> Callable[[Any], bool]:
    def accepts(value: Any) -> bool:
        return value is None or (not isinstance(value, bool) and value in allowed)

    return accepts


def _not_positive(value: Any) -> bool:
    return value is None or (type(value) is int and value <= 0)


# Fields for features latentkit lacks: (accepts the value, what is valid). Only values with
# no effect are accepted: A1111's default, or what latentkit does anyway.
NO_EFFECT: dict[str, tuple[Callable[[Any], bool], str]] = {
    "enable_hr": (_off, "false (the hires fix is not supported)"),
    "firstphase_width": (_one_of(0), "0 (the hires fix is not supported)"),
    "firstphase_height": (_one_of(0), "0 (the hires fix is not supported)"),
    "restore_faces": (_off, "false (face restoration is not supported)"),
    "tiling": (_off, "false (tiling is not supported)"),
    "styles": (_empty, "empty (this server has no saved styles)"),
    "subseed_strength": (_one_of(0), "0 (variation seeds are not supported)"),
    "seed_resize_from_h": (_not_positive, "0 or -1 (seed resizing is not supported)"),
    "seed_resize_from_w": (_not_positive, "0 or -1 (seed resizing is not supported)"),
    "s_churn": (_one_of(0), "0 (sampler noise settings are not supported)"),
    "s_tmin": (_one_of(0), "0 (sampler noise settings are not supported)"),
    "s_tmax": (_one_of(0), "0 (sampler noise settings are not supported)"),
    "s_noise": (_one_of(1), "1 (sampler noise settings are not supported)"),
    "s_min_uncond": (_one_of(0), "0 (negative guidance minimum sigma is not supported)"),
    "script_name": (_empty, "empty (scripts are not supported)"),
    "alwayson_scripts": (_empty, "empty (scripts and extensions are not supported)"),
    "refiner_checkpoint": (_empty, "empty (refiners are not supported)"),
    "infotext": (_empty, "empty (pasting an infotext is not supported)"),
    "resize_mode": (_one_of(0), "0, just resize (other resize modes are not supported)"),
    "initial_noise_multiplier": (_one_of(1), "1 (noise multipliers are not supported)"),
    "latent_mask": (_empty, "empty (a separate latent mask is not supported)"),
    "mask_blur": (_one_of(0, 4), "0 or A1111's default 4 (the mask is not blurred)"),
    "mask_blur_x": (_one_of(0, 4), "0 or A1111's default 4 (the mask is not blurred)"),
    "mask_blur_y": (_one_of(0, 4), "0 or A1111's default 4 (the mask is not blurred)"),
    "inpainting_fill": (
        _one_of(0, 1),
        "0 or 1 (both start from the original picture; latent noise and latent nothing are "
        "not supported)",
    ),
}
# Fields accepted with any value because they cannot change the pictures here: the hires
# fix's settings (it is refused), where results go (this server always keeps them in its
# outputs folder), a variation seed whose strength must be 0, script arguments without a
# script, an image CFG scale (instruct-pix2pix models only), whole picture vs only masked
# (latentkit always inpaints the whole picture), and A1111's bookkeeping.
IGNORED = frozenset(
    {
        "hr_scale", "hr_upscaler", "hr_second_pass_steps", "hr_resize_x", "hr_resize_y",
        "hr_checkpoint_name", "hr_sampler_name", "hr_scheduler", "hr_prompt",
        "hr_negative_prompt", "refiner_switch_at", "do_not_save_samples",
        "do_not_save_grid", "save_images", "subseed", "script_args", "image_cfg_scale",
        "inpaint_full_res", "inpaint_full_res_padding", "force_task_id", "comments",
        "disable_extra_networks",
    }
)  # fmt: skip
USED = frozenset(
    {
        "prompt", "negative_prompt", "seed", "steps", "cfg_scale", "width", "height",
        "sampler_name", "sampler_index", "scheduler", "batch_size", "n_iter", "eta",
        "denoising_strength", "override_settings", "override_settings_restore_afterwards",
        "send_images",
    }
)  # fmt: skip
IMG2IMG_ONLY = frozenset(
    {
        "init_images", "mask", "include_init_images", "inpainting_mask_invert",
        "resize_mode", "initial_noise_multiplier", "latent_mask", "mask_blur",
        "mask_blur_x", "mask_blur_y", "inpainting_fill", "inpaint_full_res",
        "inpaint_full_res_padding", "image_cfg_scale",
    }
)  # fmt: skip
TXT2IMG_ONLY = frozenset(
    name for name in (*NO_EFFECT, *IGNORED) if name.startswith(("hr_", "firstphase", "enable_hr"))
)
ALL_FIELDS = USED | IGNORED | frozenset(NO_EFFECT) | IMG2IMG_ONLY
TXT2IMG_FIELDS = ALL_FIELDS - IMG2IMG_ONLY
IMG2IMG_FIELDS = ALL_FIELDS - TXT2IMG_ONLY

# A1111's defaults where a request leaves a field out (or null); the size defaults to the
# model's own rather than A1111's 512, which only suits 512-pixel models.
A1111_DEFAULTS = {"steps": 50, "cfg_scale": 7.0, "sampler_name": "Euler", "seed": -1}
DEFAULT_DENOISING = 0.75


def check_fields(body: dict[str, Any], known: frozenset[str], endpoint: str) -> None:
    """Unknown names and values of unsupported features, refused in one sentence."""
    for name in body:
        if name not in known:
            raise ConfigError(
                f"{brief_repr(name)} is not a field of AUTOMATIC1111's {endpoint} API; check "
                "its spelling (docs/serving.md lists what this server takes)."
            )
    for name, (accepts, valid) in NO_EFFECT.items():
        if name in body and not accepts(body[name]):
            raise ConfigError(f"{name} must be {valid}, got {brief_repr(body[name])}.")


def given(body: dict[str, Any], name: str, default: Any = None) -> Any:
    """A field's value; a missing or null field is ``default`` (A1111's fields are all
    nullable)."""
    value = body.get(name)
    return default if value is None else value


def whole_number(body: dict[str, Any], name: str, default: int, low: int = 1) -> int:
    value = given(body, name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} must be a whole number >= {low}, got {brief_repr(value)}.")
    return value


def image_count(body: dict[str, Any]) -> int:
    """batch_size x n_iter: latentkit makes them all in one job (seeds seed, seed+1, ...)."""
    batch_size, n_iter = whole_number(body, "batch_size", 1), whole_number(body, "n_iter", 1)
    if batch_size * n_iter > MAX_IMAGES:
        raise ConfigError(
            f"batch_size x n_iter must be at most {MAX_IMAGES} images, got {batch_size} x {n_iter}."
        )
    return batch_size * n_iter


def chosen_seed(body: dict[str, Any]) -> int:
    """The seed; A1111's -1 (the default) picks a random one, as A1111 does."""
    seed = given(body, "seed", A1111_DEFAULTS["seed"])
    return secrets.randbelow(2**32) if type(seed) is int and seed == -1 else seed


def guidance_scale(body: dict[str, Any]) -> float:
    value = given(body, "cfg_scale", A1111_DEFAULTS["cfg_scale"])
    number = float(value) if type(value) in (int, float) and abs(value) < 1e300 else math.nan
    if not (math.isfinite(number) and number >= 0):
        raise ConfigError(f"cfg_scale must be a finite number >= 0, got {brief_repr(value)}.")
    return number


def denoising_strength(body: dict[str, Any]) -> float:
    value = given(body, "denoising_strength", DEFAULT_DENOISING)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ConfigError(f"denoising_strength must be in (0, 1], got {brief_repr(value)}.")
    return float(value)


def eta_setting(body: dict[str, Any], sampler: str) -> dict[str, Any]:
    """Our ``eta`` for DDIM; A1111's default 1 for the stochastic samplers (theirs is
    fixed at 1 here); and nothing for the others, which A1111 also runs without eta."""
    eta = body.get("eta")
    if sampler == "ddim":
        return {} if eta is None else {"eta": eta}
    if sampler in STOCHASTIC and not _one_of(1)(eta):
        name = A1111_SAMPLER_NAMES[sampler]
        raise ConfigError(f"eta must be 1 (or null) with {name} on this server, got {eta!r}.")
    return {}


# --- options: the default model and clip skip -------------------------------------------

OPTION_NAMES = ("sd_model_checkpoint", "CLIP_stop_at_last_layers", "sd_vae")
VAE_CHOICES = ("Automatic", "None")  # both mean the model's own VAE


def checked_options(queue: JobQueue, options: Any, where: str) -> dict[str, Any]:
    """A1111 options (``/options``, ``override_settings``) this server supports, checked;
    all or none of them are taken."""
    if not isinstance(options, dict):
        raise ConfigError(f"{where} must be a JSON object of option: value.")
    for name in options:
        if name not in OPTION_NAMES:
            raise ConfigError(
                f"{where}: the option {brief_repr(name)} is not supported; supported: "
                f"{', '.join(OPTION_NAMES)}."
            )
    return {name: checked_option(queue, name, value) for name, value in options.items()}


def checked_option(queue: JobQueue, name: str, value: Any) -> Any:
    if name == "sd_model_checkpoint":
        if not isinstance(value, str) or value not in queue.models:  # by name, never a path
            raise UnknownName(
                f"sd_model_checkpoint must name a served model, got {brief_repr(value)}; "
                f"valid: {', '.join(queue.models)}."
            )
        return value
    if name == "CLIP_stop_at_last_layers":
        return whole_number({name: value}, name, 1)
    if value not in VAE_CHOICES:
        raise ConfigError(
            f"sd_vae must be {' or '.join(VAE_CHOICES)} (the model's own VAE), got "
            f"{brief_repr(value)}."
        )
    return value


# --- pictures in ------------------------------------------------------------------------


def decode_base64(value: Any, field: str) -> bytes:
    """The bytes of a base64 field (plain, or a ``data:`` URL as browsers make them)."""
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{field} must be a base64-encoded image, got {brief_repr(value)}.")
    if value.startswith(("http://", "https://")):
        raise ConfigError(f"{field} must be the image's base64, not a URL (none is fetched).")
    if value.startswith("data:"):
        value = value.partition(",")[2]
    try:
        return base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(f"{field} is not valid base64.") from None


def a1111_mask(data: bytes, invert: bool) -> bytes:
    """A1111's mask rule as a black and white PNG: white is repainted; an RGBA mask with
    transparency is read from its alpha; ``invert`` swaps the two. The queue scales it to
    the picture when it has the init image's size (``requests.fit_mask``)."""
    try:
        with open_capped(io.BytesIO(data), MAX_INPUT_PIXELS, what="mask") as image:
            image.load()
            if image.mode == "RGBA" and image.getextrema()[-1] != (255, 255):
                gray = image.getchannel("A")
            else:
                gray = image.convert("L")
    except LatentkitError:
        raise
    except Exception:  # PIL raises many types for data that is not a picture
        raise ConfigError("mask is not a readable image.") from None
    painted = (lambda v: 0 if v > 128 else 255) if invert else (lambda v: 255 if v > 128 else 0)
    binary = gray.point(painted)
    out = io.BytesIO()
    binary.save(out, format="PNG")
    return out.getvalue()


# --- the translation --------------------------------------------------------------------


@dataclass
class Translated:
    """A native job body and what the answer needs besides the job."""

    body: dict[str, Any]
    sampler_name: str
    batch_size: int
    persist: dict[str, Any]  # options to keep after the call (override_settings_...=false)


def translate(queue: JobQueue, settings: dict[str, Any], body: Any, *, img2img: bool) -> Translated:
    """The native job for an A1111 txt2img/img2img request, or one sentence saying why not."""
    endpoint = "img2img" if img2img else "txt2img"
    if not isinstance(body, dict):
        raise ConfigError(f"the {endpoint} request must be a JSON object of fields.")
    check_fields(body, IMG2IMG_FIELDS if img2img else TXT2IMG_FIELDS, endpoint)
    override = checked_options(queue, given(body, "override_settings", {}), "override_settings")
    options = {**settings, **override}
    name = given(body, "sampler_name") or given(body, "sampler_index")
    name = name or A1111_DEFAULTS["sampler_name"]  # A1111 also takes "" as not given
    sampler, schedule = resolve_sampler(name, body.get("scheduler"))
    native = {
        "prompt": given(body, "prompt", ""),
        "negative_prompt": given(body, "negative_prompt", ""),
        "width": body.get("width"),
        "height": body.get("height"),
        "steps": given(body, "steps", A1111_DEFAULTS["steps"]),
        "cfg": guidance_scale(body),
        "sampler": sampler,
        "schedule": schedule,
        "seed": chosen_seed(body),
        "n": image_count(body),
        "clip_skip": options["CLIP_stop_at_last_layers"],
        "model": options["sd_model_checkpoint"],
        **eta_setting(body, sampler),
    }
    if img2img:
        native.update(pictures_in(body))
    keep = given(body, "override_settings_restore_afterwards", True) is False
    return Translated(
        native, A1111_SAMPLER_NAMES[sampler], given(body, "batch_size", 1), override if keep else {}
    )


def pictures_in(body: dict[str, Any]) -> dict[str, Any]:
    """img2img's init image, mask and strength as the native job takes them; with no width
    and height, the picture has the init image's size (A1111 would make it 512x512)."""
    images = body.get("init_images")
    if not isinstance(images, list) or len(images) != 1:
        count = len(images) if isinstance(images, list) else brief_repr(images)
        raise ConfigError(
            f"init_images must be a list of exactly one base64 image here, got {count}; "
            "send one request per init image."
        )
    fields = {"init_image": decode_base64(images[0], "init_images[0]")}
    fields["strength"] = denoising_strength(body)
    if body.get("mask"):  # A1111 also takes "" as no mask
        invert = given(body, "inpainting_mask_invert", 0)
        if invert not in (0, 1) or isinstance(invert, bool):
            raise ConfigError(f"inpainting_mask_invert must be 0 or 1, got {brief_repr(invert)}.")
        fields["mask"] = a1111_mask(decode_base64(body["mask"], "mask"), bool(invert))
    return fields


# --- pictures out -----------------------------------------------------------------------


def generation_info(queue: JobQueue, job, request: Translated, names: list[str]) -> dict:
    """A1111's ``info`` (``Processed.js()``) for a finished job: its keys, our values."""
    options = job.options
    width, height = image_size(queue.models[job.model], options)
    n = options.n
    texts = [read_png_text(queue.outputs / name).get("parameters", "") for name in names]
    return {
        "prompt": options.prompt,
        "all_prompts": [options.prompt] * n,
        "negative_prompt": options.negative_prompt,
        "all_negative_prompts": [options.negative_prompt] * n,
        "seed": options.seed,
        "all_seeds": [options.seed + i for i in range(n)],
        "subseed": -1,
        "all_subseeds": [-1] * n,
        "subseed_strength": 0,
        "width": width,
        "height": height,
        "sampler_name": request.sampler_name,
        "scheduler": A1111_SCHEDULE_NAMES[options.schedule],
        "cfg_scale": options.cfg,
        "steps": options.steps,
        "batch_size": request.batch_size,
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": job.model,
        "sd_model_hash": None,
        "sd_vae_name": None,
        "sd_vae_hash": None,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": options.strength,
        "extra_generation_params": {"Schedule type": A1111_SCHEDULE_NAMES[options.schedule]},
        "index_of_first_image": 0,
        "infotexts": texts,
        "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.started or job.created)),
        "clip_skip": options.clip_skip,
        "is_using_inpainting_conditioning": "mask" in request.body
        and is_inpainting(queue.models[job.model].config),
        "interrupted": job.state == "cancelled",
    }


def echoed_parameters(body: dict[str, Any]) -> dict[str, Any]:
    """The request as given; A1111 leaves the init images and mask out unless asked."""
    if body.get("include_init_images") is True:
        return body
    return {**body, **{k: None for k in ("init_images", "mask") if k in body}}


async def generation_answer(queue: JobQueue, job, request: Translated, body: dict) -> dict:
    """Await the job; A1111's answer: images (none when interrupted), parameters, info."""
    await wait_finished(job)
    with queue.lock:
        state, names, error = job.state, list(job.images), job.error
    if state == "failed":
        raise ApiError(500, error or "generation failed.")
    images = []
    if given(body, "send_images", True) is not False:
        images = [base64.b64encode((queue.outputs / n).read_bytes()).decode() for n in names]
    info = generation_info(queue, job, request, names)
    return {"images": images, "parameters": echoed_parameters(body), "info": json.dumps(info)}


# --- progress ---------------------------------------------------------------------------


def progress_answer(queue: JobQueue, skip_image: bool) -> dict[str, Any]:
    """A1111's ``/progress``: the running job's share done, its ETA and latest preview."""
    job = queue.running  # takes the lock itself
    if job is None:
        return {"progress": 0.0, "eta_relative": 0.0, "state": idle_state(),
                "current_image": None, "textinfo": None}  # fmt: skip
    with queue.lock:
        step, total, eta, preview, kind = job.step, job.total, job.eta, job.preview, job.kind
        started = job.started or job.created
    image = None if skip_image or preview is None else base64.b64encode(preview).decode()
    state = {
        **idle_state(),
        "job": f"scripts_{'txt2img' if kind == 'txt2img' else 'img2img'}",
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(started)),
        "job_count": 1,
        "sampling_step": step,
        "sampling_steps": total,
    }
    return {
        "progress": min(step / total, 1.0) if total else 0.0,
        "eta_relative": float(eta or 0.0),
        "state": state,
        "current_image": image,
        "textinfo": f"step {step} of {total}",
    }


def idle_state() -> dict[str, Any]:
    return {
        "skipped": False,
        "interrupted": False,
        "stopping_generation": False,
        "job": "",
        "job_count": 0,
        "job_timestamp": "0",
        "job_no": 0,
        "sampling_step": 0,
        "sampling_steps": 0,
    }


# --- png-info ---------------------------------------------------------------------------


def png_info(body: Any) -> dict[str, Any]:
    """A1111's ``/png-info``: the parameters text of an uploaded PNG, its other text chunks,
    and the text parsed. Only the chunks before the pixels are read; none is decoded."""
    if not isinstance(body, dict) or "image" not in body:
        raise ConfigError('the png-info request must be {"image": "<base64 PNG>"}.')
    data = decode_base64(body["image"], "image")
    if not data.startswith(PNG_SIGNATURE):
        raise ConfigError("image must be a base64-encoded PNG (png-info reads PNG text only).")
    try:
        texts = read_png_text(io.BytesIO(data))
    except LatentkitError:
        raise ConfigError("image is not a readable PNG (its chunks are damaged).") from None
    info = texts.pop("parameters", "")
    return {"info": info, "items": texts, "parameters": parse_parameters(info)}


def parse_parameters(text: str) -> dict[str, str]:
    """A1111's reading of a ``parameters`` text: ``Prompt``, ``Negative prompt``, then each
    ``Key: value`` of the last line (a ``WxH`` value also as ``Key-1``/``Key-2``).
    Linear in the text's length: no backtracking pattern meets a stranger's text."""
    lines = text.strip().split("\n")
    pairs = key_values(lines[-1])
    if pairs is not None and len(pairs) >= 3:
        lines = lines[:-1]
    else:
        pairs = []
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line.removeprefix("Negative prompt:").strip()
        (negative if in_negative else prompt).append(line)
    parsed = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in pairs:
        parsed[key] = value
        width, x, height = value.partition("x")
        if x and width.isdigit() and height.isdigit():
            parsed[f"{key}-1"], parsed[f"{key}-2"] = width, height
    return parsed


def key_values(line: str) -> list[tuple[str, str]] | None:
    """``Key: value, Key: "quoted, value"`` as pairs; None when the line is not that."""
    pairs, at, decoder = [], 0, json.JSONDecoder()
    while at < len(line):
        colon = line.find(":", at)
        if colon < 0:
            return None
        key, at = line[at:colon].strip(), colon + 1
        while line.startswith(" ", at):
            at += 1
        if line.startswith('"', at):
            try:
                value, at = decoder.raw_decode(line, at)
            except ValueError:
                return None
        else:
            end = line.find(",", at)
            end = len(line) if end < 0 else end
            value, at = line[at:end].strip(), end
        if at < len(line) and line[at] != ",":
            return None
        pairs.append((key, str(value).encode("utf-8", "replace").decode()))
        at += 1
    return pairs


# --- the router -------------------------------------------------------------------------


def a1111_api(queue: JobQueue, token: str | None) -> APIRouter:
    """AUTOMATIC1111's API over ``queue``, to mount at ``/sdapi/v1``."""
    api = APIRouter(dependencies=[Depends(bearer_check(token))])
    first = next(iter(queue.models))
    settings = {"sd_model_checkpoint": first, "CLIP_stop_at_last_layers": 1, "sd_vae": "Automatic"}

    async def generate(request: Request, *, img2img: bool) -> dict:
        body = await read_json(request)
        try:
            translated = translate(queue, settings, body, img2img=img2img)
            job = queue.submit(translated.body)
        except LatentkitError as err:
            raise refusal(err) from None
        settings.update(translated.persist)
        return await generation_answer(queue, job, translated, body)

    @api.post("/txt2img", summary="Text to image, synchronous (AUTOMATIC1111's fields)")
    async def txt2img(request: Request) -> dict:
        return await generate(request, img2img=False)

    @api.post("/img2img", summary="Image to image and inpainting, synchronous")
    async def img2img(request: Request) -> dict:
        return await generate(request, img2img=True)

    @api.get("/progress", summary="The running job: share done, ETA, latest preview")
    async def progress(skip_current_image: bool = False) -> dict:
        return progress_answer(queue, skip_current_image)

    async def stop_running() -> dict:
        job = queue.running
        if job is not None:
            queue.cancel(job.id)
        return {}

    api.post("/interrupt", summary="Stop the running job at its next step")(stop_running)
    api.post("/skip", summary="As interrupt: a job here is one batch")(stop_running)

    @api.get("/samplers", summary="Sampler names as A1111 spells them")
    async def samplers() -> list:
        return sampler_list()

    @api.get("/schedulers", summary="Schedule types (A1111's scheduler field)")
    async def schedulers() -> list:
        return scheduler_list()

    @api.get("/sd-models", summary="The served models, by name (never a path)")
    async def sd_models() -> list:
        return [
            {"title": name, "model_name": name, "hash": None, "sha256": None,
             "filename": name, "config": None}
            for name in queue.models
        ]  # fmt: skip

    @api.get("/loras", summary="The LoRAs a prompt's <lora:NAME:WEIGHT> may name")
    async def loras() -> list:
        return [
            {"name": name, "alias": name, "path": path.name, "metadata": {}}
            for name, path in available_loras(queue.folders.lora_dir).items()
        ]  # by file name only: the server's folders are not shown

    @api.post("/refresh-loras", summary="Nothing to do: the LoRA folder is read per request")
    async def refresh_loras() -> None:
        return None

    @api.get("/options", summary="The options this server supports")
    async def get_options() -> dict:
        return dict(settings)

    @api.post("/options", summary="Set options: sd_model_checkpoint (a model name), ...")
    async def set_options(request: Request) -> dict:
        try:
            settings.update(checked_options(queue, await read_json(request), "the options"))
        except LatentkitError as err:
            raise refusal(err) from None
        return {}

    @api.get("/scripts", summary="Scripts: none on this server")
    async def scripts() -> dict:
        return {"txt2img": [], "img2img": []}

    @api.post("/png-info", summary="The generation parameters stored in a PNG")
    async def png_info_route(request: Request) -> dict:
        try:
            return png_info(await read_json(request))
        except LatentkitError as err:
            raise refusal(err) from None

    return api
