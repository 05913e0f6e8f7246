"""Request parsing and validation: a Flask request -> :class:`ImageRequest` (GenerationParams +
HTTP-only fields), or an :class:`~api.errors.APIError` (400/415) naming the offending ``param``.

JSON bodies are typed strictly: numbers must be JSON numbers (integers for integer fields; no
bools, strings, nulls, arrays, NaN or Infinity). Multipart/urlencoded form values are strings and
are parsed strictly (``"20"`` is an integer, ``"20.0"``, ``" "``, ``"1e3"`` and ``"nan"`` are not;
``"7.5"`` and ``"7"`` are numbers). OpenAI's ``user``, ``quality`` and ``style`` must be strings
(or null) and are then ignored; unknown fields are ignored. ``model`` may be absent, null or empty:
the default model.

Bounds (docs/api.md, Parameters): n 1..max_n, steps 1..max_steps, cfg_scale 0..30, control_strength 0..2,
strength 0..1, seed -2**63..2**64-1 (negative = random; seed+n-1 must stay within 64 bits),
width/height multiples of 8 in 64..(max_pixels/64) with width*height <= max_pixels; ``size``
("WIDTHxHEIGHT") overrides width/height. Uploaded images must be PNG, JPEG or WebP with at most
max_input_pixels pixels (checked from the header, before decoding) and sides of at least 8.
Strings must be valid Unicode; prompt and negative_prompt have at most max_prompt_chars
characters. Defaults never exceed the limits: steps defaults to min(20, max_steps), and the size
to 512x512 or the largest square within max_pixels. A multipart body needs its boundary.

The choices and defaults are the core's own (``samplers.SAMPLERS``, ``samplers.SCHEDULERS``, the
``GenerationParams`` dataclass), read at each request: a sampler registered at run time is accepted.
The ranges are this server's HTTP policy and are defined here.
"""
from __future__ import annotations

import base64
import dataclasses
import io
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Callable

from PIL import Image

import samplers
from sdcore.lora import LoraError, resolve_loras
from sdcore.pipeline import GenerationParams
from sdcore.prompts import extract_loras

from .errors import APIError, invalid

RESPONSE_FORMATS = ("url", "b64_json")
# OpenAI's GPT image models always answer in base64, and clients written for them read only b64_json
B64_ONLY_MODELS = ("gpt-image", "chatgpt-image")
# OpenAI's DALL-E 3 rewrites the prompt and answers the text it drew as revised_prompt; clients written for it
# show that text. Nothing is rewritten here: it is the prompt as sent.
REVISED_PROMPT_MODELS = ("dall-e-3",)
# OpenAI fields this server has no use for: type-checked (a string or null), then ignored
IGNORED_FIELDS = ("user", "style", "moderation", "input_fidelity")
OUTPUT_FORMATS = ("png", "jpeg", "webp")
COMPRESSION_RANGE = (0, 100)
PARTIAL_IMAGES_RANGE = (0, 3)             # OpenAI's: previews a streamed response carries before the image
STREAM_MAX_N = 1                          # a stream carries one image, as OpenAI's events have no image index
BACKGROUNDS = ("auto", "opaque")         # "transparent" is refused with its own message
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")

CFG_SCALE_RANGE = (0.0, 30.0)
GUIDANCE_RANGE = (0.0, 30.0)             # FLUX dev's distilled guidance (an input of the network)
SLG_SCALE_RANGE = (0.0, 30.0)            # SD3's skip-layer guidance
SKIP_LAYER_RANGE = (0, 255)              # joint block numbers (the model's depth bounds them further)
FRACTION_RANGE = (0.0, 1.0)
CONTROL_STRENGTH_RANGE = (0.0, 2.0)
STRENGTH_RANGE = (0.0, 1.0)
REFINER_SWITCH_RANGE = (0.0, 1.0)        # the fraction of the steps drawn before the refiner takes over
MICRO_SIDE_RANGE = (0, 16384)            # SDXL's micro-conditioning sizes and crop offsets, in pixels
AESTHETIC_RANGE = (0.0, 10.0)            # the refiner's aesthetic scores (its raters' scale)
SEED_RANGE = (-(2 ** 63), 2 ** 64 - 1)
LORA_MULTIPLIER_RANGE = (-10.0, 10.0)     # trained adapters are used within ±2; beyond ±10 only noise remains
MAX_LORAS = 16                           # adapters one request may apply
MIN_SIDE = 64
SIDE_MULTIPLE = 8
MIN_INPUT_SIDE = 8        # an uploaded image smaller than one autoencoder block carries nothing

# GenerationParams fields whose HTTP name differs (edits upload the init image as "image")
HTTP_PARAMS = {"init_image": "image", "loras": "lora"}


def sample_methods() -> tuple[str, ...]:
    return tuple(samplers.SAMPLERS)


def schedulers() -> tuple[str, ...]:
    return tuple(samplers.SCHEDULERS)


def defaults(model=None) -> dict:
    """What a request that leaves a field out gets: GenerationParams' defaults, and url; with ``model``, what its
    family draws with instead (sdcore's ``StableDiffusion.request_defaults``: SD3's sampler, steps and scale)."""
    out = {f.name: f.default for f in dataclasses.fields(GenerationParams)
           if f.default is not dataclasses.MISSING}
    out["response_format"] = "url"
    return {**out, **(getattr(model, "request_defaults", None) or {})}


def http_param(field: str | None) -> str | None:
    """The request field that sets the GenerationParams field ``field``."""
    return HTTP_PARAMS.get(field, field)


_INT_RE = re.compile(r"[+-]?[0-9]{1,40}")
_FLOAT_RE = re.compile(r"[+-]?(?:[0-9]{1,40}(?:\.[0-9]{0,40})?|\.[0-9]{1,40})(?:[eE][+-]?[0-9]{1,4})?")
_SIZE_RE = re.compile(r"([0-9]{1,9})[xX]([0-9]{1,9})")


@dataclass
class Limits:
    """The request limits of :class:`api.config.Settings` (their defaults are defined there)."""
    max_n: int
    max_steps: int
    max_pixels: int
    max_input_pixels: int
    max_prompt_chars: int

    @classmethod
    def from_settings(cls, s) -> "Limits":
        return cls(**{f.name: getattr(s, f.name) for f in dataclasses.fields(cls)})

    # Defaults never exceed the configured limits: a request that leaves a field out is valid.
    @property
    def default_steps(self) -> int:
        return self.model_steps(None)

    def model_steps(self, model) -> int:
        """The steps of a request that sends none, on ``model``: its family's, within max_steps."""
        return min(defaults(model)["steps"], self.max_steps)

    @property
    def default_side(self) -> int:
        """512, or the largest multiple of 8 whose square fits in max_pixels (at least 64)."""
        side = min(defaults()["width"], math.isqrt(self.max_pixels) // SIDE_MULTIPLE * SIDE_MULTIPLE)
        return max(MIN_SIDE, side)

    def model_side(self, model) -> int:
        """The side when a request sends no size: the model's native one if it fits, else
        ``default_side``."""
        native = getattr(model, "native_size", None)
        return native if native and native ** 2 <= self.max_pixels else self.default_side

    @property
    def max_side(self) -> int:
        """The longest side an output may have (the other side being MIN_SIDE)."""
        return self.max_pixels // MIN_SIDE // SIDE_MULTIPLE * SIDE_MULTIPLE


@dataclass
class ImageRequest:
    model: Any                 # the loaded model the request names
    response_format: str       # "url" | "b64_json"
    params: GenerationParams
    output_format: str = "png"       # "png" | "jpeg" | "webp"
    output_compression: int = 100    # JPEG/WebP quality, 0-100
    quality: str | None = None       # OpenAI's quality, echoed back (the steps set the work here)
    revised_prompt: bool = False     # answer revised_prompt (REVISED_PROMPT_MODELS)
    stream: bool = False             # answer server-sent events: partial images, then the image
    partial_images: int = 0          # how many previews the stream carries


# --- field sources ----------------------------------------------------------------------------
class _Fields:
    """Uniform access to a JSON object (typed values) or a form (string values)."""

    def __init__(self, values: dict, is_form: bool, files=None):
        self.values = values
        self.is_form = is_form
        self.files = files or {}

    @classmethod
    def from_json(cls, obj: dict) -> "_Fields":
        return cls(obj, False)

    @classmethod
    def from_form(cls, form, files) -> "_Fields":
        values = {}
        for key in form.keys():
            items = form.getlist(key)
            if len(items) > 1:
                raise invalid(key, f"'{key}' was given {len(items)} times; give it once.",
                              "duplicate_parameter")
            values[key] = items[0]
        return cls(values, True, files)

    def has(self, name: str) -> bool:
        return name in self.values

    def get(self, name: str):
        return self.values[name]


def _type_name(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, (list, tuple)):
        return "an array"
    if isinstance(v, dict):
        return "an object"
    if isinstance(v, float):
        return "a float"
    if isinstance(v, int):
        return "an integer"
    return type(v).__name__


def _get_int(f: _Fields, name: str, default: int, lo: int, hi: int) -> int:
    if not f.has(name):
        return default
    v = f.get(name)
    if f.is_form:
        s = v.strip()
        if not _INT_RE.fullmatch(s):
            raise invalid(name, f"'{name}' must be an integer, got {v!r}.", "invalid_type")
        v = int(s)
    elif type(v) is not int:
        raise invalid(name, f"'{name}' must be an integer, got {_type_name(v)}.", "invalid_type")
    if not lo <= v <= hi:
        raise invalid(name, f"'{name}' must be between {lo} and {hi}, got {v}.")
    return v


def _get_float(f: _Fields, name: str, default: float, lo: float, hi: float) -> float:
    if not f.has(name):
        return default
    v = f.get(name)
    if f.is_form:
        s = v.strip()
        if not _FLOAT_RE.fullmatch(s):
            raise invalid(name, f"'{name}' must be a number, got {v!r}.", "invalid_type")
        x = float(s)
    elif type(v) in (int, float):
        try:
            x = float(v)
        except OverflowError:
            x = math.inf
    else:
        raise invalid(name, f"'{name}' must be a number, got {_type_name(v)}.", "invalid_type")
    if not math.isfinite(x):
        raise invalid(name, f"'{name}' must be a finite number.")
    if not lo <= x <= hi:
        raise invalid(name, f"'{name}' must be between {lo:g} and {hi:g}, got {x:g}.")
    return x


def _get_bool(f: _Fields, name: str, default: bool) -> bool:
    """JSON true/false; in forms "true"/"false"/"1"/"0" (case-insensitive)."""
    if not f.has(name):
        return default
    v = f.get(name)
    if f.is_form and isinstance(v, str) and v.strip().lower() in ("true", "1", "false", "0"):
        return v.strip().lower() in ("true", "1")
    if isinstance(v, bool):
        return v
    raise invalid(name, f"'{name}' must be a boolean (true or false), got {_type_name(v)}.", "invalid_type")


def _get_str(f: _Fields, name: str, default: str | None, max_len: int | None = None
             ) -> str | None:
    if not f.has(name):
        return default
    v = f.get(name)
    if not isinstance(v, str):
        raise invalid(name, f"'{name}' must be a string, got {_type_name(v)}.", "invalid_type")
    if max_len is not None and len(v) > max_len:
        raise invalid(name, f"'{name}' is too long: at most {max_len} characters, got {len(v)}.",
                      "string_too_long")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:   # a lone surrogate, e.g. "\ud800" in JSON
        raise invalid(name, f"'{name}' is not valid Unicode text.", "invalid_string") from None
    return v


def _get_optional_str(f: _Fields, name: str, max_len: int) -> str | None:
    """A string field that may be left out or sent as null (None then)."""
    return _get_str(f, name, None, max_len) if f.has(name) and f.get(name) is not None else None


def _get_choice(f: _Fields, name: str, default, choices) -> str | None:
    v = _get_str(f, name, default, max_len=64)
    if v is default:
        return v
    norm = v.strip().lower()
    if norm not in choices:
        raise invalid(name, f"'{name}' must be one of {', '.join(choices)}; got {v!r}.")
    return norm


def _check_side(name: str, v: int, param: str) -> None:
    if v <= 0:
        raise invalid(param, f"{name} must be a positive integer, got {v}.")
    if v % SIDE_MULTIPLE:
        raise invalid(param, f"{name} must be a multiple of {SIDE_MULTIPLE} (the autoencoder "
                             f"works on 8x8 pixel blocks), got {v}.")
    if v < MIN_SIDE:
        raise invalid(param, f"{name} must be at least {MIN_SIDE} pixels, got {v}.")


def _size_sent(f: _Fields) -> bool:
    """Whether the request names a size: width, height, or a size other than "auto"."""
    if f.has("width") or f.has("height"):
        return True
    size = f.get("size") if f.has("size") else None
    return size is not None and not (isinstance(size, str) and size.strip().lower() == "auto")


def _get_size(f: _Fields, limits: Limits, model) -> tuple[int, int]:
    """(width, height); when no size is sent, the model's native size (``Limits.model_side``)."""
    side = limits.default_side if _size_sent(f) else limits.model_side(model)
    width = _get_int(f, "width", side, -(2 ** 31), 2 ** 31)
    height = _get_int(f, "height", side, -(2 ** 31), 2 ** 31)
    wparam, hparam = "width", "height"
    size = _get_str(f, "size", None, max_len=64)
    if size is not None and size.strip().lower() != "auto":
        m = _SIZE_RE.fullmatch(size.strip())
        if not m:
            raise invalid("size", f"'size' must be WIDTHxHEIGHT with positive integers, e.g. "
                                  f"512x512; got {size!r}.")
        width, height = int(m.group(1)), int(m.group(2))
        wparam = hparam = "size"
    _check_side("width", width, wparam)
    _check_side("height", height, hparam)
    if width * height > limits.max_pixels:
        blame = wparam if wparam == hparam else ("width" if width >= height else "height")
        raise invalid(blame,
                      f"{width}x{height} is too large: at most {limits.max_pixels} pixels "
                      f"(width*height) are allowed.")
    return width, height


def _load_image(storage, param: str, limits: Limits) -> Image.Image:
    """Decode an uploaded PNG/JPEG/WebP after checking its header dimensions."""
    data = storage.read()
    if not data:
        raise invalid(param, f"'{param}' is an empty file.")
    try:
        im = Image.open(io.BytesIO(data), formats=list(IMAGE_FORMATS))
    except Image.DecompressionBombError:
        raise invalid(param, f"'{param}' has too many pixels (at most "
                             f"{limits.max_input_pixels}).", "image_too_large") from None
    except Exception:
        raise invalid(param, f"'{param}' is not a PNG, JPEG or WebP image.",
                      "invalid_image_format") from None
    w, h = im.size
    if w <= 0 or h <= 0 or w * h > limits.max_input_pixels:
        raise invalid(param, f"'{param}' is {w}x{h}: too many pixels (at most "
                             f"{limits.max_input_pixels}).", "image_too_large")
    if w < MIN_INPUT_SIDE or h < MIN_INPUT_SIDE:
        raise invalid(param, f"'{param}' is {w}x{h}: each side must be at least "
                             f"{MIN_INPUT_SIDE} pixels.", "image_too_small")
    try:
        im.load()
    except Exception:
        raise invalid(param, f"'{param}' could not be decoded (corrupt or truncated image).",
                      "invalid_image") from None
    return im


def _base64_file(f: _Fields, param: str):
    """JSON bodies carry files as base64 strings (a ``data:image/...;base64,`` prefix is allowed)."""
    if not f.has(param) or f.get(param) is None:
        return None
    v = f.get(param)
    if not isinstance(v, str):
        raise invalid(param, f"'{param}' must be a base64-encoded PNG/JPEG/WebP string in JSON "
                             f"bodies, got {_type_name(v)}.", "invalid_type")
    if v.startswith("data:"):
        v = v.partition(",")[2]
    try:
        data = base64.b64decode(v, validate=True)
    except ValueError:
        raise invalid(param, f"'{param}' is not valid base64.", "invalid_base64") from None
    return io.BytesIO(data)


def _has_alpha(im: Image.Image) -> bool:
    return im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info


def _files(f: _Fields, names: tuple[str, ...]) -> list:
    found = []
    for n in names:
        found.extend(f.files.getlist(n) if f.files else [])
    return [x for x in found if x is not None]


def _single_file(f: _Fields, names: tuple[str, ...], param: str):
    found = _files(f, names)
    if len(found) > 1:
        raise invalid(param, f"only one '{param}' file is supported per request, got "
                             f"{len(found)}.")
    return found[0] if found else None


def _reject_text_for_file(f: _Fields, names: tuple[str, ...], param: str) -> None:
    for n in names:
        if f.has(n):
            raise invalid(param, f"'{param}' must be uploaded as a file in a multipart/form-data "
                                 f"request.", "invalid_type")


# --- bodies -----------------------------------------------------------------------------------
def get_refiner(f: _Fields, name: str, find: Callable, default_switch: float) -> dict:
    """The refiner fields of a request: {} when it names none, else the loaded model ``find(name)``
    returns (None: not served, a 400) and ``refiner_switch_at``."""
    switch = _get_float(f, "refiner_switch_at", default_switch, *REFINER_SWITCH_RANGE)   # checked even unused
    ref = _get_optional_str(f, name, 256)
    if ref is None or not ref.strip() or ref.strip() == "None":      # A1111 clients send "None" for none
        return {}
    refiner = find(ref.strip())
    if refiner is None:
        raise invalid(name, f"The refiner {ref.strip()!r} is not a model this server serves (start it with "
                            f"--model NAME=PATH as well).", "model_not_found")
    return {"refiner": refiner, "refiner_switch_at": switch}


def get_loras(f: _Fields, prompt: str, negative: str, lora_dir: str | None) -> list[tuple[str, float]]:
    """The adapters a request applies, as (file, multiplier): the prompts' <lora:NAME:W> tags and the ``lora``
    field's [{"name": NAME, "multiplier": W}] entries (the sd.cpp server's), found in ``lora_dir``."""
    named = []
    for param, text in (("prompt", prompt), ("negative_prompt", negative)):
        try:
            named += extract_loras(text)[1]
        except ValueError as e:
            raise invalid(param, str(e)) from None
    entries = f.get("lora") if f.has("lora") else None
    if isinstance(entries, str) and f.is_form:           # a form sends the list as JSON text
        try:
            entries = json.loads(entries)
        except ValueError:
            raise invalid("lora", "'lora' must be a JSON list of {\"name\": ..., \"multiplier\": ...}.") from None
    if entries is not None:
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise invalid("lora", "'lora' must be a list of {\"name\": ..., \"multiplier\": ...} objects.")
        for e in entries:
            entry = _Fields.from_json(e)
            name = _get_str(entry, "name", None, max_len=256)
            if not name or not name.strip():
                raise invalid("lora", "each 'lora' entry needs a 'name': a file name in the LoRA directory.")
            named.append((name.strip(), _get_float(entry, "multiplier", 1.0, *LORA_MULTIPLIER_RANGE)))
    if len(named) > MAX_LORAS:
        raise invalid("lora", f"at most {MAX_LORAS} LoRAs per request, got {len(named)}.")
    for name, multiplier in named:
        if not LORA_MULTIPLIER_RANGE[0] <= multiplier <= LORA_MULTIPLIER_RANGE[1]:
            raise invalid("lora", f"LoRA {name!r}: the multiplier must be within {LORA_MULTIPLIER_RANGE}, "
                                  f"got {multiplier}.")
    try:
        return resolve_loras(lora_dir, named)
    except LoraError as e:
        raise invalid("lora", str(e)) from None


def get_stream(f: _Fields, n: int, response_format: str | None) -> dict:
    """``stream`` and ``partial_images`` (OpenAI's streaming fields); ``response_format``: as sent, if it was."""
    stream = _get_bool(f, "stream", False)
    partial = _get_int(f, "partial_images", 0, *PARTIAL_IMAGES_RANGE)
    if stream and n > STREAM_MAX_N:
        raise invalid("n", f"a streamed response carries {STREAM_MAX_N} image; send n={STREAM_MAX_N} "
                           f"(or leave stream out), got n={n}.")
    if stream and response_format == "url":
        raise invalid("response_format", "a streamed response carries its image as b64_json; leave "
                                         "response_format out, or leave stream out for a url.")
    return {"stream": stream, "partial_images": partial}


def get_skip_layer_guidance(f: _Fields) -> dict:
    """SD3's skip-layer guidance: slg_scale, skip_layers (a JSON array of block numbers, or in a form "7,8,9"),
    skip_layer_start and skip_layer_end (defaults: GenerationParams'). The core checks what needs the model or
    applies only when slg_scale is on: the blocks against its depth, start < end."""
    d = defaults()
    out = {"slg_scale": _get_float(f, "slg_scale", d["slg_scale"], *SLG_SCALE_RANGE)}
    for name in ("skip_layer_start", "skip_layer_end"):
        out[name] = _get_float(f, name, d[name], *FRACTION_RANGE)
    if f.has("skip_layers"):
        sent, lo, hi = f.get("skip_layers"), *SKIP_LAYER_RANGE
        v = sent
        if f.is_form and isinstance(v, str):
            items = [x.strip() for x in v.strip().strip("[]").split(",")]
            v = [int(x) for x in items] if all(_INT_RE.fullmatch(x) for x in items) else None
        if not (isinstance(v, list) and 0 < len(v) <= hi and all(type(x) is int and lo <= x <= hi for x in v)):
            got = repr(sent) if isinstance(sent, str) else _type_name(sent) if not isinstance(sent, list) else sent
            raise invalid("skip_layers", f"'skip_layers' must be a non-empty array of block numbers from {lo} to "
                                         f"{hi} (in a form: \"7,8,9\"), got {got}.", "invalid_type")
        out["skip_layers"] = tuple(v)
    return out


def get_micro_conditioning(f: _Fields) -> dict:
    """SDXL's size/crop micro-conditioning and the refiner's aesthetic scores (defaults: GenerationParams')."""
    d, lo, hi = defaults(), *MICRO_SIDE_RANGE
    out = {name: _get_int(f, name, d[name], lo, hi) for name in ("crop_top", "crop_left")}
    for name in ("aesthetic_score", "negative_aesthetic_score"):
        out[name] = _get_float(f, name, d[name], *AESTHETIC_RANGE)
    for name in ("original_size", "target_size"):
        text = _get_optional_str(f, name, 64)
        if text is not None:
            m = _SIZE_RE.fullmatch(text.strip())
            if not m or not all(lo < int(v) <= hi for v in m.groups()):
                raise invalid(name, f"'{name}' must be WIDTHxHEIGHT, each from 1 to {hi}; got {text!r}.")
            out[name] = (int(m.group(1)), int(m.group(2)))
    return out


def _parse_common(f: _Fields, limits: Limits, models) -> dict:
    model_id = (_get_optional_str(f, "model", 256) or "").strip() or None
    model = models.resolve(model_id)      # first: the default size is the model's

    if not f.has("prompt"):
        raise invalid("prompt", "'prompt' is required.", "missing_required_parameter")
    prompt = _get_str(f, "prompt", None, max_len=limits.max_prompt_chars)
    if not prompt.strip():
        raise invalid("prompt", "'prompt' must not be empty.")
    for name in IGNORED_FIELDS:
        _get_optional_str(f, name, 256)
    d = defaults(model)
    n = _get_int(f, "n", d["n"], 1, limits.max_n)
    seed = _get_int(f, "seed", d["seed"], *SEED_RANGE)
    if seed >= 0 and seed + n - 1 > SEED_RANGE[1]:
        raise invalid("seed", f"'seed' + n - 1 must fit in 64 bits (at most {SEED_RANGE[1]}).")
    width, height = _get_size(f, limits, model)
    kw = dict(
        prompt=prompt,
        negative_prompt=_get_str(f, "negative_prompt", d["negative_prompt"],
                                 max_len=limits.max_prompt_chars),
        n=n,
        width=width,
        height=height,
        steps=_get_int(f, "steps", limits.model_steps(model), 1, limits.max_steps),
        cfg_scale=_get_float(f, "cfg_scale", d["cfg_scale"], *CFG_SCALE_RANGE),
        sample_method=_get_choice(f, "sample_method", d["sample_method"], sample_methods()),
        scheduler=_get_choice(f, "scheduler", d["scheduler"], schedulers()),
        seed=seed,
        control_strength=_get_float(f, "control_strength", d["control_strength"],
                                    *CONTROL_STRENGTH_RANGE),
        apply_canny_preprocessor=_get_bool(f, "apply_canny_preprocessor",
                                           d["apply_canny_preprocessor"]),
        **get_refiner(f, "refiner", models.find, d["refiner_switch_at"]),
        **get_micro_conditioning(f),
        **get_skip_layer_guidance(f),
    )
    kw["loras"] = get_loras(f, kw["prompt"], kw["negative_prompt"], models.lora_dir)
    response_format = _get_choice(f, "response_format", d["response_format"], RESPONSE_FORMATS)
    if model_id and model_id.lower().startswith(B64_ONLY_MODELS):
        response_format = "b64_json"
    revised = bool(model_id and model_id.lower().startswith(REVISED_PROMPT_MODELS))
    sent = _Fields({k: v for k, v in f.values.items() if v is not None}, f.is_form)     # null: not sent
    kw["guidance"] = _get_float(sent, "guidance", None, *GUIDANCE_RANGE)
    background = _get_str(sent, "background", None, max_len=64)
    if background is not None and background.strip().lower() == "transparent":
        raise invalid("background", "This server's models cannot draw a transparent background; send "
                                    "'auto' or 'opaque'.")
    _get_choice(sent, "background", None, BACKGROUNDS)
    encoding = {"output_format": _get_choice(sent, "output_format", "png", OUTPUT_FORMATS),
                "output_compression": _get_int(sent, "output_compression", COMPRESSION_RANGE[1], *COMPRESSION_RANGE),
                "quality": _get_str(sent, "quality", None, max_len=64), "revised_prompt": revised,
                **get_stream(sent, n, response_format if f.has("response_format") else None)}
    return {"model": model, "response_format": response_format, "kw": kw, "encoding": encoding}


def _make(parsed: dict) -> ImageRequest:
    return ImageRequest(parsed["model"], parsed["response_format"], GenerationParams(**parsed["kw"]),
                        **parsed["encoding"])


def _json_object(request) -> dict:
    import json
    raw = request.get_data(cache=True)
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError):
        raise APIError("The request body is not valid JSON.", code="invalid_json") from None
    if not isinstance(obj, dict):
        raise APIError("The request body must be a JSON object.", code="invalid_json")
    return obj


def _unsupported(request, allowed: str) -> APIError:
    got = request.mimetype or "none"
    return APIError(f"Unsupported Content-Type {got!r}; send {allowed}.", status=415,
                    code="unsupported_media_type")


def _check_multipart(request) -> None:
    if request.mimetype == "multipart/form-data" and not request.mimetype_params.get("boundary"):
        raise APIError("The multipart/form-data body has no boundary parameter in its "
                       "Content-Type.", code="invalid_multipart")


def parse_generation(request, limits: Limits, models) -> ImageRequest:
    """POST /v1/images/generations: JSON, or a form (multipart when control_image is sent).
    ``models``: the served models (``api.models.ModelRegistry``)."""
    mt = request.mimetype
    if request.is_json:
        f = _Fields.from_json(_json_object(request))
        control = _base64_file(f, "control_image")
    elif mt in ("multipart/form-data", "application/x-www-form-urlencoded"):
        _check_multipart(request)
        f = _Fields.from_form(request.form, request.files)
        _reject_text_for_file(f, ("control_image",), "control_image")
        control = _single_file(f, ("control_image",), "control_image")
    else:
        raise _unsupported(request, "application/json or multipart/form-data")
    parsed = _parse_common(f, limits, models)
    if control is not None:
        parsed["kw"]["control_image"] = _load_image(control, "control_image", limits).convert("RGB")
    return _make(parsed)


def parse_edit(request, limits: Limits, models) -> ImageRequest:
    """POST /v1/images/edits: multipart form with image (or image[]), optional mask and
    control_image. Without a mask, transparent pixels of the image itself (if any) are the
    area to repaint, as in OpenAI's API. Of several images (``image[]``, as GPT-image clients send
    reference images) the first is the one edited; the others must be images too and are not used."""
    if request.mimetype != "multipart/form-data":
        raise _unsupported(request, "multipart/form-data")
    _check_multipart(request)
    f = _Fields.from_form(request.form, request.files)
    _reject_text_for_file(f, ("image", "image[]"), "image")
    _reject_text_for_file(f, ("mask",), "mask")
    _reject_text_for_file(f, ("control_image",), "control_image")
    image_files = _files(f, ("image", "image[]"))
    mask_file = _single_file(f, ("mask",), "mask")
    control_file = _single_file(f, ("control_image",), "control_image")

    parsed = _parse_common(f, limits, models)
    kw = parsed["kw"]
    kw["strength"] = _get_float(f, "strength", defaults()["strength"], *STRENGTH_RANGE)
    if not image_files:
        raise invalid("image", "'image' is required: upload the image to edit as a file.",
                      "missing_required_parameter")
    image = _load_image(image_files[0], "image", limits)
    for extra in image_files[1:]:
        _load_image(extra, "image", limits)
    mask = None
    if mask_file is not None:
        m = _load_image(mask_file, "mask", limits)
        if m.size != image.size:
            raise invalid("mask", f"'mask' must have the same size as 'image' "
                                  f"({image.size[0]}x{image.size[1]}), got "
                                  f"{m.size[0]}x{m.size[1]}.")
        if not _has_alpha(m):
            raise invalid("mask", "'mask' must have an alpha channel: its fully transparent "
                                  "pixels mark the area to repaint.")
        mask = m.convert("RGBA")
    elif _has_alpha(image):
        rgba = image.convert("RGBA")
        if rgba.getchannel("A").getextrema()[0] < 255:
            mask = rgba
    kw["init_image"] = image.convert("RGB")
    kw["mask"] = mask
    if control_file is not None:
        kw["control_image"] = _load_image(control_file, "control_image", limits).convert("RGB")
    return _make(parsed)
