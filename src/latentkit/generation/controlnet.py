"""ControlNet at generation time: control pictures in, U-Net residuals out at each step.

A :class:`Control` names one ControlNet, its control picture, a scale and the fraction of
the steps it acts on (``start`` to ``end``). ``prepare_controls`` checks each against the
model (the U-Net it feeds, the VAE's scale), resizes the picture to the output size (Lanczos,
as diffusers' control image processor does; a picture of another shape beyond
``MAX_ASPECT_STRETCH`` is refused) and keeps it in [0, 1]. ``ControlResiduals``
is called by the denoiser's network wrapper before each U-Net call: every active ControlNet
sees the same input as the U-Net (the latent; with guidance, both halves of the batch, as
diffusers does without guess mode) and their residuals are summed, as diffusers'
MultiControlNet does.

Which step a call belongs to is read from its timestep: the number of scheduled timesteps
above it. A ControlNet acts at step ``i`` of ``N`` unless ``i/N < start`` or
``(i+1)/N > end`` (diffusers' ``controlnet_keep``).

Guess mode (diffusers' ``guess_mode``) lets a ControlNet steer without the prompt's help:
under guidance it sees only the conditional half and adds nothing to the unconditional one,
and its residuals are scaled from 0.1 (the first skip) up to 1 (the mid block), times
``scale``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from latentkit.config import brief_repr
from latentkit.errors import ConfigError
from latentkit.generation.img2img import DEFAULT_MAX_INPUT_PIXELS, read_input_image
from latentkit.models.components import Components
from latentkit.models.controlnet import ControlNet, check_matches_unet


@dataclass(frozen=True)
class Control:
    """One ControlNet steering a generation. ``image`` is a picture or its path (read with
    the input-image pixel cap); ``scale`` multiplies its residuals; it acts from the
    fraction ``start`` to ``end`` of the steps."""

    controlnet: ControlNet
    image: Image.Image | str | Path
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    guess_mode: bool = False


@dataclass
class PreparedControl:
    """A checked :class:`Control` with its picture as a [n, C, H, W] tensor in [0, 1]."""

    control: Control
    hint: torch.Tensor
    image_path: str | None
    resized_from: tuple[int, int] | None


def check_control(control: object, index: int = 0) -> Control:
    """``control`` if it is a usable :class:`Control`, else one sentence saying why."""
    label = f"control {index + 1}"
    if not isinstance(control, Control):
        raise ConfigError(f"{label} must be a latentkit Control, got {brief_repr(control)}.")
    if not isinstance(control.controlnet, ControlNet):
        raise ConfigError(
            f"{label}'s controlnet must be a loaded ControlNet (latentkit.load_controlnet), "
            f"got {brief_repr(control.controlnet)}."
        )
    check_control_numbers(control.scale, control.start, control.end, label)
    if not isinstance(control.guess_mode, bool):
        raise ConfigError(
            f"{label}'s guess_mode must be true or false, got {brief_repr(control.guess_mode)}."
        )
    return control


def check_control_numbers(scale: object, start: object, end: object, label: str) -> None:
    """A finite scale and 0 <= start < end <= 1, else one sentence naming ``label``."""
    for name, value in (("scale", scale), ("start", start), ("end", end)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{label}'s {name} must be a number, got {brief_repr(value)}.")
        if not math.isfinite(value):
            raise ConfigError(f"{label}'s {name} must be a finite number, got {value!r}.")
    if not 0.0 <= start < end <= 1.0:
        raise ConfigError(
            f"{label} acts from {start} to {end} of the steps; give 0 <= start < end <= 1."
        )


def check_fits_model(controlnet: ControlNet, components: Components, label: str) -> None:
    """A ControlNet whose residuals fit the model's U-Net and whose hint encoder brings the
    picture to the VAE's latent grid; else one sentence naming the difference."""
    check_matches_unet(controlnet.config, components.config.unet, where=f"of {label}")
    hint, vae = controlnet.config.hint_downscale_factor, components.config.vae.downscale_factor
    if hint != vae:
        raise ConfigError(
            f"the ControlNet of {label} was made for another model: its hint encoder scales "
            f"pictures down by {hint} but this model's VAE by {vae}."
        )


def read_control_image(
    image: Image.Image | str | Path, label: str, max_pixels: int = DEFAULT_MAX_INPUT_PIXELS
) -> tuple[Image.Image, str | None]:
    """The control picture and its path (None when given as a picture)."""
    if isinstance(image, Image.Image):
        return image, getattr(image, "filename", None) or None
    if not isinstance(image, (str, Path)):
        raise ConfigError(
            f"the image of {label} must be a PIL picture or a path, got {brief_repr(image)}."
        )
    return read_input_image(image, f"the control image of {label}", max_pixels=max_pixels), str(
        image
    )


def hint_tensor(image: Image.Image, size: tuple[int, int], channels: int) -> torch.Tensor:
    """[1, channels, H, W] in [0, 1] at the output ``size`` (RGB, or grey for 1 channel)."""
    fitted = image.convert("L" if channels == 1 else "RGB")
    if fitted.size != tuple(size):
        fitted = fitted.resize(size, Image.LANCZOS)  # what fit_image and diffusers use
    array = np.asarray(fitted, dtype=np.float32) / 255.0
    if array.ndim == 2:
        array = array[..., None]
    if array.shape[-1] != channels:
        raise ConfigError(
            f"the ControlNet takes {channels}-channel control pictures; latentkit feeds it "
            "RGB (3) or grey (1) pictures only."
        )
    return torch.from_numpy(array).permute(2, 0, 1)[None]


# A control picture is stretched to the output's shape when the two aspect ratios differ by
# at most this factor (a 40x48 hint for 32x32: 1.2); beyond it, stretching would move the
# hint's lines where the user did not draw them, so it is refused.
MAX_ASPECT_STRETCH = 1.25


def check_aspect(picture_size: tuple[int, int], size: tuple[int, int], label: str) -> None:
    """Refuse a control picture whose shape differs from the output's beyond the tolerance."""
    theirs, ours = picture_size[0] / picture_size[1], size[0] / size[1]
    if max(theirs, ours) / min(theirs, ours) > MAX_ASPECT_STRETCH:
        raise ConfigError(
            f"{label}: the control picture is {picture_size[0]}x{picture_size[1]} and the "
            f"picture {size[0]}x{size[1]}; their aspect ratios differ by more than "
            f"{MAX_ASPECT_STRETCH - 1:.0%}, so resizing would distort the hint; crop it to "
            "the picture's shape or set --width and --height to match it."
        )


def prepare_controls(
    controls, components: Components, size: tuple[int, int], n: int, device, dtype
) -> list[PreparedControl]:
    """Every control checked, its picture read and fitted; nothing is computed yet."""
    if controls is None:
        return []
    if not isinstance(controls, (list, tuple)):
        raise ConfigError(f"controls must be a list of Control, got {brief_repr(controls)}.")
    prepared = []
    for index, control in enumerate(controls):
        control = check_control(control, index)
        label = f"control {index + 1}"
        check_fits_model(control.controlnet, components, label)
        image, path = read_control_image(control.image, label)
        check_aspect(image.size, tuple(size), label)
        channels = control.controlnet.config.conditioning_channels
        hint = hint_tensor(image, size, channels).to(device, dtype).repeat(n, 1, 1, 1)
        resized = image.size if image.size != tuple(size) else None
        _place(control.controlnet, device, dtype)
        prepared.append(PreparedControl(control, hint, path, resized))
    return prepared


def _place(controlnet: ControlNet, device, dtype) -> None:
    """The ControlNet on the U-Net's device and in its dtype (moved in place if not)."""
    param = next(controlnet.parameters())
    if param.device != torch.device(device) or param.dtype != dtype:
        controlnet.to(device=device, dtype=dtype)
    controlnet.eval()


class ControlResiduals:
    """The summed residuals of the active controls for one U-Net call, or ``{}``."""

    def __init__(self, prepared: list[PreparedControl]):
        self.prepared = prepared
        self.timesteps: torch.Tensor | None = None

    def follow(self, timesteps: torch.Tensor) -> None:
        """The timesteps the sampler walks, one per step (decreasing), for ``start``/``end``."""
        self.timesteps = timesteps.detach().float().cpu()

    def step_of(self, t: torch.Tensor) -> tuple[int, int]:
        """(step index, number of steps) of a call at timestep ``t``."""
        if self.timesteps is None:
            return 0, 1
        now = float(t.reshape(-1)[0])
        return int((self.timesteps > now + 1e-3).sum()), len(self.timesteps)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> dict:
        i, total = self.step_of(t)
        down, mid = None, None
        for item in self.prepared:
            control = item.control
            if i / total < control.start or (i + 1) / total > control.end:
                continue
            d, m = self._residuals(control, item.hint, x, t, context)
            down = d if down is None else [a + b for a, b in zip(down, d, strict=True)]
            mid = m if mid is None else mid + m
        if down is None:
            return {}
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}

    @staticmethod
    def _residuals(control: Control, hint: torch.Tensor, x, t, context):
        n = hint.shape[0]
        if not control.guess_mode:
            hint = hint.repeat(x.shape[0] // n, 1, 1, 1)
            return control.controlnet(x, t, context, hint, scale=control.scale)
        # Under guidance the batch is [unconditional, conditional]: only the second half.
        guided = x.shape[0] == 2 * n
        half = slice(n, None) if guided else slice(None)
        t = t.reshape(-1)
        t = t[half] if t.shape[0] == x.shape[0] else t
        down, mid = control.controlnet(x[half], t, context[half], hint, scale=control.scale)
        ramp = torch.logspace(-1, 0, len(down) + 1, device=x.device)
        down = [r * s.to(r.dtype) for r, s in zip(down, ramp, strict=False)]
        mid = mid * ramp[-1].to(mid.dtype)
        if guided:
            down = [torch.cat([torch.zeros_like(r), r]) for r in down]
            mid = torch.cat([torch.zeros_like(mid), mid])
        return down, mid


@dataclass(frozen=True)
class ControlRequest:
    """A control as files name it (the command line, a PNG record): the ControlNet's path,
    the control picture's path and the numbers of :class:`Control`."""

    controlnet: str
    image: str
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    guess_mode: bool = False


def requests_from_lists(
    controlnets: list[str],
    images: list[str],
    scales: list[float],
    starts: list[float],
    ends: list[float],
    guess_mode: bool = False,
) -> list[ControlRequest]:
    """One request per ControlNet, paired in order with the control pictures; each number
    list gives one value for all or one per ControlNet (none: the default)."""
    if len(images) != len(controlnets):
        raise ConfigError(
            f"got {len(controlnets)} --controlnet and {len(images)} --control; give one "
            "control picture per ControlNet, in the same order."
        )
    columns = {}
    for flag, values, default in (
        ("--control-scale", scales, 1.0),
        ("--control-start", starts, 0.0),
        ("--control-end", ends, 1.0),
    ):
        if len(values) not in (0, 1, len(controlnets)):
            raise ConfigError(
                f"got {len(values)} {flag} for {len(controlnets)} --controlnet; give one "
                "for all of them or one for each."
            )
        columns[flag] = values * len(controlnets) if len(values) == 1 else values
        columns[flag] = columns[flag] or [default] * len(controlnets)
    requests = []
    for i, (net, image) in enumerate(zip(controlnets, images, strict=True)):
        scale, start, end = (columns[f][i] for f in columns)
        check_control_numbers(scale, start, end, f"control {i + 1}")
        requests.append(ControlRequest(str(net), str(image), scale, start, end, guess_mode))
    return requests


def requests_from_record(stored: object, where: str) -> list[ControlRequest]:
    """The controls a PNG record names, for ``--from`` to replay them."""
    if not isinstance(stored, list):
        raise ConfigError(
            f"the record's controls in {where} must be a list, not {brief_repr(stored)}."
        )
    requests = []
    for i, entry in enumerate(stored):
        label = f"the record's control {i + 1} in {where}"
        if not isinstance(entry, dict) or not all(
            isinstance(entry.get(key), str) for key in ("controlnet", "image")
        ):
            raise ConfigError(
                f"{label} names no ControlNet file and control picture (it was given as "
                "objects); give --controlnet and --control to replay it."
            )
        numbers = [entry.get(key, default) for key, default in _NUMBER_DEFAULTS]
        check_control_numbers(*numbers, label)
        guess_mode = entry.get("guess_mode", False)
        if not isinstance(guess_mode, bool):
            raise ConfigError(f"{label}'s guess_mode must be true or false.")
        request = ControlRequest(entry["controlnet"], entry["image"], *numbers, guess_mode)
        requests.append(request)
    return requests


_NUMBER_DEFAULTS = (("scale", 1.0), ("start", 0.0), ("end", 1.0))


def read_control_images(requests: list[ControlRequest], max_pixels: int) -> list[Image.Image]:
    """Each request's control picture, read (with the pixel cap) before any model is."""
    return [
        read_control_image(r.image, f"control {i + 1}", max_pixels)[0]
        for i, r in enumerate(requests)
    ]


def controls_for(
    requests: list[ControlRequest],
    images: list[Image.Image],
    components: Components,
    load_controlnet,
) -> list[Control]:
    """The :class:`Control` of each request: its ControlNet loaded by ``load_controlnet(path,
    for_unet=...)`` (checked against the model's U-Net) and its picture, which keeps its path
    for the record."""
    controls = []
    for request, image in zip(requests, images, strict=True):
        controlnet = load_controlnet(request.controlnet, for_unet=components.config.unet)
        image.filename = request.image  # the record names the picture by its path
        numbers = (request.scale, request.start, request.end, request.guess_mode)
        controls.append(Control(controlnet, image, *numbers))
    return controls


def control_records(prepared: list[PreparedControl]) -> list[dict]:
    """What a PNG record keeps of each control: the ControlNet's and the picture's paths
    (None when they were given as objects), scale, start and end."""
    records = []
    for item in prepared:
        control = item.control
        source = getattr(control.controlnet, "source", None)
        records.append(
            {
                "controlnet": str(source) if source is not None else None,
                "image": item.image_path,
                "scale": float(control.scale),
                "start": float(control.start),
                "end": float(control.end),
                "guess_mode": control.guess_mode,
            }
        )
    return records


__all__ = [
    "Control",
    "ControlResiduals",
    "PreparedControl",
    "check_control",
    "control_records",
    "prepare_controls",
]
