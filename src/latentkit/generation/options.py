"""The settings of one generation, and the one validator every way in shares.

Settings arrive as command-line flags, as a replayed record (``latentkit generate --from``:
a PNG's JSON chunk or a JSON file), from the Python API, and (to come) as an HTTP request's
JSON. All of them become a :class:`GenerateOptions`, whose construction checks every field's
type and range, so no way in can skip a check or phrase it differently. A plain dict, as
JSON gives it, goes through :func:`options_from_fields`.

Two settings only mean something in some runs: ``strength`` with an init image, ``eta``
with the DDIM sampler. They default to ``None`` ("not given") and :func:`prepare_for_run`
refuses them where they would have no effect, so nothing is silently ignored and then
stored in the picture's record as if it had counted.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from latentkit.config import brief_repr, check_seed, is_unicode
from latentkit.diffusion.samplers import SAMPLERS
from latentkit.errors import ConfigError

SCHEDULES = ("default", "karras", "exponential")
PROMPT_MODES = ("chunks", "truncate")
DEFAULT_STRENGTH = 0.75  # image-to-image without a strength: the reference's default
DEFAULT_ETA = 0.0  # DDIM without an eta: deterministic, as the reference's default
MAX_IMAGES = 64
MAX_MICRO = 65536  # past any picture's side; exact in the float32 the U-Net reads them in
# SDXL's micro-conditioning settings, each with the order of its two numbers.
MICRO_CONDITIONING = {
    f"{prefix}{name}": pair
    for prefix in ("", "negative_")
    for name, pair in (
        ("original_size", "height, width"),
        ("crops_coords_top_left", "top, left"),
        ("target_size", "height, width"),
    )
}


@dataclass(frozen=True)
class GenerateOptions:
    """Everything that decides a picture besides the model. Sizes default to the model's;
    ``strength`` and ``eta`` are ``None`` unless the run uses them (see the module's note);
    SDXL's micro-conditioning pairs are ``None`` for the reference's defaults.

    Construction validates every field (:class:`ConfigError`, one sentence) and stores
    numbers as plain ``int``/``float``, so what is accepted can be written as JSON."""

    prompt: str
    negative_prompt: str = ""
    width: int | None = None
    height: int | None = None
    steps: int = 20
    cfg: float = 7.5
    guidance_rescale: float = 0.0
    sampler: str = "euler"
    schedule: str = "default"
    seed: int = 0
    n: int = 1
    eta: float | None = None
    clip_skip: int = 1
    prompt_mode: str = "chunks"
    strength: float | None = None
    vae_tiling: bool = False
    # SDXL's micro-conditioning (diffusers' names and order: sizes (height, width), the crop
    # (top, left)); None is the reference's default: the picture's size, no crop, and for
    # each negative_* its positive counterpart.
    original_size: tuple[int, int] | None = None
    crops_coords_top_left: tuple[int, int] | None = None
    target_size: tuple[int, int] | None = None
    negative_original_size: tuple[int, int] | None = None
    negative_crops_coords_top_left: tuple[int, int] | None = None
    negative_target_size: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field against its rule, storing each value in its plain type."""
        for name, rule in _RULES.items():
            object.__setattr__(self, name, rule.checked(name, getattr(self, name)))
        check_seed("seed", self.seed)


FIELD_NAMES = tuple(f.name for f in dataclasses.fields(GenerateOptions))


@dataclass(frozen=True)
class _Rule:
    """What one field must be: a plain type, a test of the value, and how to say both."""

    kind: type
    valid: str  # completes "NAME must be ..."
    accepts: Callable[[Any], bool] = lambda value: True
    optional: bool = False  # None is allowed
    label: str = ""  # the name as messages say it, when the bare name is cryptic

    def checked(self, name: str, value: Any) -> Any:
        if value is None and self.optional:
            return None
        plain = _plain(self.kind, value)
        if plain is None or not self.accepts(plain):
            name = self.label or name
            raise ConfigError(f"{name} must be {self.valid}, got {brief_repr(value)}.")
        return plain


def _plain(kind: type, value: Any) -> Any:
    """``value`` as the plain ``kind`` (numpy scalars and ints for floats included), or None
    when it is not one: bools are not numbers, and floats must be finite."""
    if kind is bool:
        return value if isinstance(value, bool) else None
    if kind is str:
        return value if isinstance(value, str) and is_unicode(value) else None
    if kind is tuple:
        return _plain_pair(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    if kind is int:
        return int(value) if isinstance(value, numbers.Integral) else None
    try:
        number = float(value)
    except OverflowError:  # an int past what a float holds
        return None
    return number if math.isfinite(number) else None


def _plain_pair(value: Any) -> tuple[int, int] | None:
    """Two whole numbers (a JSON list or a tuple) as a tuple of ints, or None."""
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        return None
    parts = tuple(_plain(int, v) for v in value)
    return None if None in parts else parts


def _one_of(choices) -> _Rule:
    return _Rule(str, f"one of {', '.join(choices)}", lambda value: value in choices)


_SIZE = _Rule(
    int, "a positive multiple of 8 (or null: the model's size)", lambda v: v >= 8 and v % 8 == 0
)
_RULES: dict[str, _Rule] = {
    "prompt": _Rule(str, "text"),
    "negative_prompt": _Rule(str, "text"),
    "width": dataclasses.replace(_SIZE, optional=True),
    "height": dataclasses.replace(_SIZE, optional=True),
    "steps": _Rule(int, "a positive whole number", lambda v: v >= 1),
    "cfg": _Rule(float, "a finite number >= 0", lambda v: v >= 0, label="cfg (guidance scale)"),
    "guidance_rescale": _Rule(float, "a number from 0 to 1", lambda v: 0 <= v <= 1),
    "sampler": _one_of(tuple(SAMPLERS)),
    "schedule": _one_of(SCHEDULES),
    "seed": _Rule(int, "a whole number from 0 to 2**63-1"),  # range: check_seed's, shared
    "n": _Rule(
        int,
        f"a whole number from 1 to {MAX_IMAGES}",
        lambda v: 1 <= v <= MAX_IMAGES,
        label="n (images per prompt)",
    ),
    "eta": _Rule(
        float,
        "a number from 0 to 1 (or null)",
        lambda v: 0 <= v <= 1,
        optional=True,
        label="eta (DDIM's noise)",
    ),
    "clip_skip": _Rule(int, "a positive whole number", lambda v: v >= 1),
    "prompt_mode": _one_of(PROMPT_MODES),
    "strength": _Rule(float, "a number in (0, 1] (or null)", lambda v: 0 < v <= 1, optional=True),
    "vae_tiling": _Rule(bool, "true or false"),
    **{
        name: _Rule(
            tuple,
            f"two whole numbers from 0 to {MAX_MICRO} ({pair}), or null",
            lambda v: 0 <= min(v) and max(v) <= MAX_MICRO,
            optional=True,
        )
        for name, pair in MICRO_CONDITIONING.items()
    },
}
assert set(_RULES) == set(FIELD_NAMES), "every field has exactly one rule"


def require_settings_object(value: Any, where: str = "generation settings") -> Mapping:
    """``value`` when it is a mapping (a JSON object); else one sentence naming what it is."""
    if not isinstance(value, Mapping):
        raise ConfigError(
            f"{where} must be a JSON object of settings (name: value), not {_json_kind(value)}."
        )
    return value


def _json_kind(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, str):
        return "text"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true or false"
    return "a number" if isinstance(value, numbers.Number) else type(value).__name__


def options_from_fields(fields: Any) -> GenerateOptions:
    """Validated options from a plain dict of settings, as JSON gives it (an HTTP request's
    body, a replayed record's settings). Unknown names are refused, not ignored: a typo
    would otherwise silently leave a setting at its default."""
    fields = require_settings_object(fields)
    unknown = sorted((name for name in fields if name not in FIELD_NAMES), key=str)
    if unknown:
        raise ConfigError(
            f"{brief_repr(unknown[0])} is not a generation setting; valid: "
            f"{', '.join(FIELD_NAMES)}."
        )
    if "prompt" not in fields:
        raise ConfigError("the prompt is missing; give the text to draw (it may be empty).")
    return GenerateOptions(**fields)


def settings_without_effect(options: GenerateOptions, *, init_image: bool) -> dict[str, str]:
    """The settings given that this run would ignore, each with the sentence that says so."""
    found = {}
    if options.strength is not None and not init_image:
        found["strength"] = (
            "strength applies only to image-to-image; give an init image or leave strength out."
        )
    if options.eta is not None and options.sampler != "ddim":
        found["eta"] = (
            f"eta applies only to the ddim sampler, not {options.sampler!r}; choose ddim or "
            "leave eta out."
        )
    return found


def prepare_for_run(options: GenerateOptions, *, init_image: bool) -> GenerateOptions:
    """``options`` with the run's defaults for its conditional settings filled in (strength
    with an init image, eta with DDIM), so the picture's record says what was used; a
    setting the run would ignore is refused."""
    problems = settings_without_effect(options, init_image=init_image)
    if problems:
        raise ConfigError(next(iter(problems.values())))
    defaults = {}
    if init_image and options.strength is None:
        defaults["strength"] = DEFAULT_STRENGTH
    if options.sampler == "ddim" and options.eta is None:
        defaults["eta"] = DEFAULT_ETA
    return dataclasses.replace(options, **defaults) if defaults else options
