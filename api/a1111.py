"""AUTOMATIC1111's web API (``/sdapi/v1``) as its clients use it: the request fields and their defaults, its
sampler and scheduler names, the options it keeps, its checkpoint list with real file hashes, and the
``info`` it answers with. The views (``api/routes_a1111.py``) stay thin; the images come from the same
pipeline, through the same queue, as the OpenAI routes'.

Names: a sampler is accepted by its A1111 label (``Euler a``, ``DPM++ 2M``), by an A1111 alias
(``k_euler_a``) or by our name (``euler_a``); the old combined labels (``DPM++ 2M Karras``) name a sampler
and a schedule. The scheduler ``Automatic`` is A1111's choice for the sampler (Karras for DPM++ 2M, as
A1111 does), otherwise our default. An unknown name is an error, never a silent fallback.
"""
from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import logging
import os
import re
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageFilter, ImageOps

import samplers
from sdcore.formats import CheckpointError
from sdcore.infotext import sampler_label, scheduler_label, split_infotext
from sdcore.pipeline import INPAINT_FILLS, GenerationParams, cover_resize

from .errors import APIError, invalid
from . import params as P
from .params import (CFG_SCALE_RANGE, SEED_RANGE, STRENGTH_RANGE, ImageRequest, Limits, _base64_file, _Fields,
                     _get_bool, _get_float, _get_int, _get_size, _get_str, _json_object, _load_image, _type_name)

log = logging.getLogger("sd_api_server")

# --- names ------------------------------------------------------------------------------------------
DEFAULT_SAMPLER = "Euler"             # what A1111's API draws with when a request names no sampler
# DDIM with eta 0 is Euler's method on sigma (the same update in x / sqrt(alpha-bar) coordinates); its
# timesteps in A1111 are spaced a little differently
SAMPLER_ALIASES = {"euler": ("k_euler", "ddim"), "euler_a": ("k_euler_a", "k_euler_ancestral"), "heun": ("k_heun",),
                   "dpm2": ("k_dpm_2",), "dpm++2s_a": ("k_dpmpp_2s_a",), "dpm++2m": ("k_dpmpp_2m",), "lcm": ("k_lcm",)}
AUTOMATIC_SCHEDULE = {"dpm++2m": "karras"}        # A1111's "Automatic" for its samplers that set one
AUTOMATIC = "automatic"
# A1111's scheduler names (its API's ``name``; the labels are sdcore.infotext's); "normal" spaces the same
# timesteps as "uniform" on SD's schedule, so both are our "discrete"
SCHEDULER_NAMES = {"discrete": "uniform", "karras": "karras", "exponential": "exponential", "lcm": "lcm"}
SCHEDULER_ALIASES = {"discrete": ("normal", "discrete")}
INPAINT_FILL_CODES = dict(enumerate(INPAINT_FILLS))      # A1111's inpainting_fill numbers
RESIZE_MODES = ("just resize", "crop and resize", "resize and fill", "just resize (latent upscale)")
MAX_CLIP_SKIP = 12
MAX_MASK_BLUR = 64
# request fields A1111 has and this server does not draw: accepted, and named in the log when they ask for
# something (a true flag, a non-empty script or list)
UNSUPPORTED_FIELDS = ("alwayson_scripts", "script_name", "script_args", "styles", "enable_hr", "restore_faces",
                      "tiling", "subseed_strength", "firstphase_width", "firstphase_height",
                      "hr_scale", "hr_upscaler", "hr_second_pass_steps", "hr_resize_x", "hr_resize_y",
                      "inpaint_full_res", "image_cfg_scale", "initial_noise_multiplier", "latent_mask", "eta")
OPTIONS_MAX_BYTES = 64 * 1024
# A1111's SDXL options (stored with POST /options, or per request in override_settings) and the request
# fields of ours they set
SDXL_OPTIONS = {"sdxl_crop_top": "crop_top", "sdxl_crop_left": "crop_left",
                "sdxl_refiner_high_aesthetic_score": "aesthetic_score",
                "sdxl_refiner_low_aesthetic_score": "negative_aesthetic_score"}


def sampler_names() -> list[str]:
    return list(samplers.SAMPLERS)


def _find_sampler(text: str) -> str | None:
    key = text.strip().lower()
    for name in sampler_names():
        if key in (name, sampler_label(name).lower(), *SAMPLER_ALIASES.get(name, ())):
            return name
    return None


def _find_scheduler(text: str) -> str | None:
    key = text.strip().lower()
    for name in samplers.SCHEDULERS:
        if key in (name, scheduler_label(name).lower(), SCHEDULER_NAMES.get(name, name), *SCHEDULER_ALIASES.get(name, ())):
            return name
    return None


def resolve_sampler(sampler: str | None, scheduler: str | None) -> tuple[str, str]:
    """(sampler, scheduler) of our names for A1111's ``sampler_name`` and ``scheduler``."""
    text = sampler if sampler and sampler.strip() else DEFAULT_SAMPLER
    method, combined = _find_sampler(text), None
    if method is None:                  # "DPM++ 2M Karras": a label, a space, a schedule's label
        for name in samplers.SCHEDULERS:
            suffix = " " + scheduler_label(name).lower()
            if text.strip().lower().endswith(suffix):
                method, combined = _find_sampler(text.strip()[:-len(suffix)]), name
                if method is not None:
                    break
    if method is None:
        raise APIError(f"Sampler not found: {text!r}. Samplers: "
                       f"{', '.join(sampler_label(n) for n in sampler_names())}.", status=400, code="sampler_not_found")
    if combined is not None:            # as in A1111, the label's schedule wins over the scheduler field
        return method, combined
    if scheduler is None or not scheduler.strip() or scheduler.strip().lower() == AUTOMATIC:
        return method, AUTOMATIC_SCHEDULE.get(method) or samplers.default_scheduler(method)
    schedule = _find_scheduler(scheduler)
    if schedule is None:
        raise APIError(f"Scheduler not found: {scheduler!r}. Schedulers: Automatic, "
                       f"{', '.join(scheduler_label(n) for n in samplers.SCHEDULERS)}.", status=400,
                       code="scheduler_not_found")
    return method, schedule


def samplers_list() -> list[dict]:
    return [{"name": sampler_label(n), "aliases": [n, *SAMPLER_ALIASES.get(n, ())],
             "options": {"scheduler": AUTOMATIC_SCHEDULE[n]} if n in AUTOMATIC_SCHEDULE else {}}
            for n in sampler_names()]


def schedulers_list() -> list[dict]:
    out = [{"name": AUTOMATIC, "label": "Automatic", "aliases": None, "default_rho": -1, "need_inner_model": False}]
    for n in samplers.SCHEDULERS:
        name = SCHEDULER_NAMES.get(n, n)
        aliases = [a for a in (n, *SCHEDULER_ALIASES.get(n, ())) if a != name]
        out.append({"name": name, "label": scheduler_label(n), "aliases": sorted(set(aliases)) or None,
                    "default_rho": 7.0 if n == "karras" else -1, "need_inner_model": n == "discrete"})
    return out


# --- checkpoints ------------------------------------------------------------------------------------
class FileHashes:
    """sha256 of model files, as A1111 shows them (its short hash is the first 10 hex digits), computed
    once and kept in ``<data dir>/.model-hashes.json`` by path, size and modification time."""

    def __init__(self, data_dir):
        self.path = Path(data_dir) / ".model-hashes.json"
        self.lock = threading.Lock()
        self.memo: dict[str, str] = {}

    @staticmethod
    def _key(path: str) -> str | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        if not os.path.isfile(path):
            return None            # a diffusers folder has no single file to hash
        return f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}"

    def sha256(self, path: str | None) -> str | None:
        key = self._key(path) if path else None
        if key is None:
            return None
        with self.lock:
            if key in self.memo:
                return self.memo[key]
            stored = _read_json(self.path)
            digest = stored.get(key)
            if not isinstance(digest, str):
                h = hashlib.sha256()
                with open(path, "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        h.update(block)
                digest = h.hexdigest()
                try:
                    _write_json(self.path, {**stored, key: digest})
                except OSError:
                    log.warning("cannot keep model hashes in %s", self.path)
            self.memo[key] = digest
            return digest


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


def _write_json(path: Path, obj: dict) -> None:
    """Atomic: a reader (another worker) sees the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, ensure_ascii=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


@dataclass
class Checkpoint:
    id: str               # the served model id (the OpenAI routes' ``model``)
    path: str | None
    sha256: str | None

    @property
    def short_hash(self) -> str | None:
        return self.sha256[:10] if self.sha256 else None

    @property
    def title(self) -> str:
        return f"{self.id} [{self.short_hash}]" if self.short_hash else self.id

    def names(self) -> set[str]:
        """Every name A1111 clients may select it by: title, name, file name, hashes."""
        out = {self.id, self.title}
        if self.path:
            base = os.path.basename(os.path.normpath(self.path))
            out |= {self.path, base, os.path.splitext(base)[0]}
        if self.sha256:
            out |= {self.sha256, self.short_hash, self.sha256[:8]}
        return out

    def as_a1111(self) -> dict:
        return {"title": self.title, "model_name": self.id, "hash": self.short_hash, "sha256": self.sha256,
                "filename": os.path.abspath(self.path) if self.path else self.id, "config": None}


def checkpoints(models, hashes: FileHashes) -> list[Checkpoint]:
    return [Checkpoint(i, getattr(models.models[i], "source", None),
                       hashes.sha256(getattr(models.models[i], "source", None))) for i in models.ids()]


def find_checkpoint(models, hashes: FileHashes, name: str) -> Checkpoint | None:
    """The served checkpoint ``name`` selects (any of its names, or a --model-alias), else None."""
    name = name.strip()
    served = models.aliases.get(name, name)
    for ckpt in checkpoints(models, hashes):
        if served == ckpt.id or name in ckpt.names():
            return ckpt
    return None


# --- options ----------------------------------------------------------------------------------------
class OptionsStore:
    """The settings A1111 clients set with ``POST /sdapi/v1/options``, kept in ``<data dir>/sdapi-options.json``
    so that every worker process sees them (written atomically, under a file lock)."""

    def __init__(self, data_dir):
        self.path = Path(data_dir) / "sdapi-options.json"

    def get(self) -> dict:
        return _read_json(self.path)

    def update(self, changes: dict) -> dict:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(".sdapi-options.lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            merged = {**self.get(), **changes}
            if len(json.dumps(merged, ensure_ascii=False).encode("utf-8")) > OPTIONS_MAX_BYTES:
                raise APIError(f"The options would exceed {OPTIONS_MAX_BYTES} bytes; they were not changed.",
                               status=413, code="options_too_large")
            _write_json(self.path, merged)
        return merged


def options_view(stored: dict, ckpt: Checkpoint) -> dict:
    """GET /sdapi/v1/options: the keys clients read (the current checkpoint, clip skip), then whatever
    clients stored."""
    out = {"sd_model_checkpoint": ckpt.title, "sd_checkpoint_hash": ckpt.sha256, "CLIP_stop_at_last_layers": 1,
           "sd_vae": "Automatic", "samples_format": "png", "sd_lora": "None",
           **{option: P.defaults()[ours] for option, ours in SDXL_OPTIONS.items()}}
    out.update({k: v for k, v in stored.items() if k not in ("sd_model_checkpoint", "sd_checkpoint_hash")})
    return out


def check_options(body: dict, models, hashes: FileHashes) -> dict:
    """The changes of ``POST /sdapi/v1/options``; a checkpoint the server does not serve is a 400."""
    changes = dict(body)
    if "sd_model_checkpoint" in changes:
        v = changes["sd_model_checkpoint"]
        ckpt = find_checkpoint(models, hashes, v) if isinstance(v, str) else None
        if ckpt is None:
            raise APIError(f"Checkpoint not found: {v!r}. Served: "
                           f"{', '.join(c.title for c in checkpoints(models, hashes))}.", status=400,
                           code="model_not_found")
        changes["sd_model_checkpoint"] = ckpt.id
    if "CLIP_stop_at_last_layers" in changes:
        _get_int(_Fields.from_json(changes), "CLIP_stop_at_last_layers", 1, 1, MAX_CLIP_SKIP)
    _sdxl_options(changes, None)
    changes.pop("sd_checkpoint_hash", None)
    return changes


def _sdxl_options(options: dict, param: str | None) -> dict:
    """The request fields A1111's SDXL options among ``options`` set (checked: a bad value is a 400 naming
    ``param``, or the option)."""
    sent = {ours: options[option] for option, ours in SDXL_OPTIONS.items() if options.get(option) is not None}
    try:
        out = P.get_micro_conditioning(_Fields.from_json(sent))
    except APIError as e:
        option = next(o for o, ours in SDXL_OPTIONS.items() if ours == e.param)
        raise invalid(param or option, f"{option}: {e.message}") from None
    return {k: v for k, v in out.items() if k in sent}


# --- txt2img / img2img ------------------------------------------------------------------------------
@dataclass
class A1111Request:
    image_request: ImageRequest
    parameters: dict            # the request's fields with A1111's defaults filled in (the response echoes them)
    checkpoint: Checkpoint
    send_images: bool
    save_images: bool
    batch_size: int


# AUTOMATIC1111's request fields with its defaults: the parsers' defaults, and what `parameters` echoes
TXT2IMG_DEFAULTS = {"prompt": "", "negative_prompt": "", "styles": None, "seed": -1, "subseed": -1,
                    "subseed_strength": 0, "sampler_name": None, "scheduler": None, "batch_size": 1, "n_iter": 1,
                    "steps": 50, "cfg_scale": 7.0, "width": 512, "height": 512, "restore_faces": None,
                    "tiling": None, "override_settings": None, "override_settings_restore_afterwards": True,
                    "sampler_index": DEFAULT_SAMPLER, "script_name": None, "script_args": [], "send_images": True,
                    "save_images": False, "alwayson_scripts": {}, "enable_hr": False, "denoising_strength": None,
                    "refiner_checkpoint": None, "refiner_switch_at": None}
IMG2IMG_DEFAULTS = {**{k: v for k, v in TXT2IMG_DEFAULTS.items() if k != "enable_hr"},
                    "init_images": None, "resize_mode": 0, "denoising_strength": 0.75, "mask": None, "mask_blur": 4,
                    "inpainting_fill": 0, "inpaint_full_res": True, "inpainting_mask_invert": 0,
                    "include_init_images": False}


def _object(f: _Fields, name: str) -> dict:
    if not f.has(name) or f.get(name) is None:
        return {}
    v = f.get(name)
    if not isinstance(v, dict):
        raise invalid(name, f"'{name}' must be an object, got {_type_name(v)}.", "invalid_type")
    return v


def _flag(f: _Fields, name: str, default: bool) -> bool:
    """A1111 takes 0/1 as well as false/true for its flags."""
    if f.has(name) and type(f.get(name)) is int and f.get(name) in (0, 1):
        return bool(f.get(name))
    return _get_bool(f, name, default)


def _log_unsupported(f: _Fields, rid: str) -> None:
    asked = [n for n in UNSUPPORTED_FIELDS if f.has(n) and f.get(n) not in (None, False, 0, "", [], {}, 1.0, "None")]
    if asked:
        log.info("request %s: ignored AUTOMATIC1111 field(s) this server does not draw: %s", rid, ", ".join(asked))


def _parse_common(body: dict, st, defaults: dict, rid: str) -> tuple[_Fields, dict, Checkpoint, dict]:
    f = _Fields.from_json({k: v for k, v in body.items() if v is not None})     # A1111's fields are optional
    limits: Limits = st.limits
    _log_unsupported(f, rid)
    override = _object(f, "override_settings")
    stored = st.options.get()
    ckpt = None
    if "sd_model_checkpoint" in override:
        name = override["sd_model_checkpoint"]
        ckpt = find_checkpoint(st.models, st.hashes, name) if isinstance(name, str) else None
        if ckpt is None:
            raise invalid("override_settings", f"Checkpoint not found: {name!r}.", "model_not_found")
    elif f.has("model"):       # stable-diffusion.cpp's field, resolved as the OpenAI routes resolve theirs
        served = st.models.resolve(_get_str(f, "model", None, max_len=256).strip() or None)
        ckpt = next(c for c in checkpoints(st.models, st.hashes) if st.models.models[c.id] is served)
    elif isinstance(stored.get("sd_model_checkpoint"), str):   # set by POST /options; gone if no longer served
        ckpt = find_checkpoint(st.models, st.hashes, stored["sd_model_checkpoint"])
    if ckpt is None:
        ckpt = find_checkpoint(st.models, st.hashes, st.models.default_id)
    model = st.models.models[ckpt.id]
    ignored = sorted(set(override) - {"sd_model_checkpoint", "CLIP_stop_at_last_layers", *SDXL_OPTIONS})
    if ignored:
        log.info("request %s: override_settings not applied: %s", rid, ", ".join(ignored))

    prompt = _get_str(f, "prompt", defaults["prompt"], max_len=limits.max_prompt_chars)
    negative = _get_str(f, "negative_prompt", defaults["negative_prompt"], max_len=limits.max_prompt_chars)
    batch_size = _get_int(f, "batch_size", defaults["batch_size"], 1, limits.max_n)
    n_iter = _get_int(f, "n_iter", defaults["n_iter"], 1, limits.max_n)
    if batch_size * n_iter > limits.max_n:
        raise invalid("batch_size", f"batch_size × n_iter must be at most {limits.max_n}, got "
                                    f"{batch_size} × {n_iter}.")
    seed = _get_int(f, "seed", defaults["seed"], *SEED_RANGE)
    n = batch_size * n_iter
    if seed >= 0 and seed + n - 1 > SEED_RANGE[1]:
        raise invalid("seed", f"'seed' + the number of images - 1 must fit in 64 bits (at most {SEED_RANGE[1]}).")
    width, height = _get_size(_Fields({k: v for k, v in body.items() if k in ("width", "height")}, False),
                              limits, model)
    sampler_text = _get_str(f, "sampler_name", None, max_len=64) or _get_str(f, "sampler_index", None, max_len=64)
    method, schedule = resolve_sampler(sampler_text, _get_str(f, "scheduler", None, max_len=64))
    clip_default = override.get("CLIP_stop_at_last_layers", stored.get("CLIP_stop_at_last_layers", 1))
    clip_skip = _get_int(_Fields.from_json({"CLIP_stop_at_last_layers": clip_default}), "CLIP_stop_at_last_layers",
                         1, 1, MAX_CLIP_SKIP)
    kw = dict(prompt=prompt, negative_prompt=negative, n=n, width=width, height=height,
              steps=_get_int(f, "steps", min(defaults["steps"], limits.max_steps), 1, limits.max_steps),
              cfg_scale=_get_float(f, "cfg_scale", defaults["cfg_scale"], *CFG_SCALE_RANGE), sample_method=method,
              scheduler=schedule,
              seed=seed, clip_skip=_get_int(f, "clip_skip", clip_skip, 1, MAX_CLIP_SKIP),
              **P.get_refiner(f, "refiner_checkpoint", lambda name: _served(st, name), P.defaults()["refiner_switch_at"]),
              **P.get_skip_layer_guidance(f),
              **{**_sdxl_options(stored, None), **_sdxl_options(override, "override_settings")})
    kw["loras"] = P.get_loras(f, prompt, negative, st.models.lora_dir)
    # Forge's field for FLUX dev's distilled guidance (its default, 3.5, is the model's own: not sent means that)
    kw["guidance"] = _get_float(f, "distilled_cfg_scale", None, *P.GUIDANCE_RANGE)
    parameters = {**defaults, **{k: v for k, v in body.items() if k in defaults}}
    return f, kw, ckpt, parameters


def _served(st, name: str):
    """The loaded model a checkpoint title, file name or id names; None if none."""
    ckpt = find_checkpoint(st.models, st.hashes, name)
    return st.models.models[ckpt.id] if ckpt else None


def parse_txt2img(body: dict, st, rid: str) -> A1111Request:
    f, kw, ckpt, parameters = _parse_common(body, st, TXT2IMG_DEFAULTS, rid)
    return _request(f, kw, ckpt, parameters, st)


def _request(f, kw, ckpt, parameters, st) -> A1111Request:
    image_request = ImageRequest(st.models.models[ckpt.id], "b64_json", GenerationParams(**kw))
    d = TXT2IMG_DEFAULTS
    return A1111Request(image_request, parameters, ckpt, _flag(f, "send_images", d["send_images"]),
                        _flag(f, "save_images", d["save_images"]), _get_int(f, "batch_size", d["batch_size"], 1, st.limits.max_n))


def _decode(value, param: str, limits: Limits) -> Image.Image:
    if not isinstance(value, str):
        raise invalid(param, f"'{param}' must hold base64 images (strings), got {_type_name(value)}.", "invalid_type")
    return _load_image(_base64_file(_Fields.from_json({param: value}), param), param, limits)


def resize(im: Image.Image, mode: int, width: int, height: int) -> Image.Image:
    """A1111's resize modes: 0 (and 3) stretch, 1 crop to cover, 2 fit and fill the bands with the stretched
    edge rows (or columns)."""
    if mode == 1:
        return cover_resize(im, width, height)
    if mode != 2:
        return im.resize((width, height), Image.Resampling.LANCZOS)
    scale = min(width / im.width, height / im.height)
    w, h = max(1, round(im.width * scale)), max(1, round(im.height * scale))
    fitted = im.resize((w, h), Image.Resampling.LANCZOS)
    out = Image.new(im.mode, (width, height))
    x, y = (width - w) // 2, (height - h) // 2
    out.paste(fitted, (x, y))
    if y > 0:
        out.paste(fitted.crop((0, 0, w, 1)).resize((w, y)), (x, 0))
        out.paste(fitted.crop((0, h - 1, w, h)).resize((w, height - y - h)), (x, y + h))
    if x > 0:
        out.paste(fitted.crop((0, 0, 1, h)).resize((x, h)), (0, y))
        out.paste(fitted.crop((w - 1, 0, w, h)).resize((width - x - w, h)), (x + w, y))
    return out


def a1111_mask(im: Image.Image, invert: bool, blur: int) -> Image.Image:
    """A1111's mask: white repaints. A mask with transparency is read from its alpha channel (opaque
    repaints) and made black and white; then inverted if asked, then blurred."""
    if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
        alpha = im.convert("RGBA").getchannel("A")
        mask = alpha.point(lambda v: 255 if v > 128 else 0) if alpha.getextrema()[0] < 255 else im.convert("L")
    else:
        mask = im.convert("L")
    if invert:
        mask = ImageOps.invert(mask)
    return mask.filter(ImageFilter.GaussianBlur(blur)) if blur > 0 else mask


def parse_img2img(body: dict, st, rid: str) -> A1111Request:
    f, kw, ckpt, parameters = _parse_common(body, st, IMG2IMG_DEFAULTS, rid)
    limits = st.limits
    if not f.has("init_images") or f.get("init_images") is None:
        raise invalid("init_images", "'init_images' is required: a list with the base64 image to edit.",
                      "missing_required_parameter")
    images = f.get("init_images")
    if not isinstance(images, list) or not images:
        raise invalid("init_images", "'init_images' must be a non-empty list of base64 images, got "
                                     f"{_type_name(images) if not isinstance(images, list) else 'an empty list'}.",
                      "invalid_type")
    if len(images) > limits.max_n:
        raise invalid("init_images", f"'init_images' has {len(images)} images; at most {limits.max_n}.")
    decoded = [_decode(v, "init_images", limits) for v in images]
    if len(decoded) > 1:
        log.info("request %s: %d init_images; the first is edited", rid, len(decoded))
    mode = _get_int(f, "resize_mode", IMG2IMG_DEFAULTS["resize_mode"], 0, len(RESIZE_MODES) - 1)
    w, h = kw["width"], kw["height"]
    kw["init_image"] = resize(decoded[0].convert("RGB"), mode, w, h)
    kw["strength"] = _get_float(f, "denoising_strength", IMG2IMG_DEFAULTS["denoising_strength"], *STRENGTH_RANGE)
    blur = _get_int(f, "mask_blur", IMG2IMG_DEFAULTS["mask_blur"], 0, MAX_MASK_BLUR)
    invert = _flag(f, "inpainting_mask_invert", bool(IMG2IMG_DEFAULTS["inpainting_mask_invert"]))
    fill = _get_int(f, "inpainting_fill", IMG2IMG_DEFAULTS["inpainting_fill"], 0, len(INPAINT_FILL_CODES) - 1)
    if f.has("mask") and f.get("mask") is not None:
        mask = _decode(f.get("mask"), "mask", limits)
        kw["mask"] = a1111_mask(resize(mask, mode, w, h), invert, blur)
        kw["inpaint_fill"] = INPAINT_FILL_CODES[fill]
    parameters = {**parameters, "init_images": None, "mask": None}      # as A1111: the images are not echoed
    return _request(f, kw, ckpt, parameters, st)


def read_body(request) -> dict:
    if not request.is_json:
        got = request.mimetype or "none"
        raise APIError(f"Unsupported Content-Type {got!r}; send application/json.", status=415,
                       code="unsupported_media_type")
    return _json_object(request)


# --- answers ----------------------------------------------------------------------------------------
def info(req: A1111Request, images, version: str) -> dict:
    """The ``info`` object (sent as a JSON string) with the keys of A1111's, for the images drawn."""
    p = req.image_request.params
    seeds = [int(im.seed) for im in images]
    n = len(images)
    img2img = p.init_image is not None
    return {
        "prompt": p.prompt, "all_prompts": [p.prompt] * n, "negative_prompt": p.negative_prompt,
        "all_negative_prompts": [p.negative_prompt] * n, "seed": seeds[0], "all_seeds": seeds, "subseed": seeds[0],
        "all_subseeds": seeds, "subseed_strength": 0, "width": p.width, "height": p.height,
        "sampler_name": sampler_label(p.sample_method), "cfg_scale": p.cfg_scale, "steps": p.steps,
        "batch_size": req.batch_size, "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": req.checkpoint.id, "sd_model_hash": req.checkpoint.short_hash, "sd_vae_name": None,
        "sd_vae_hash": None, "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": p.strength if img2img else None,
        "extra_generation_params": {"Schedule type": scheduler_label(p.scheduler)},
        "index_of_first_image": 0, "infotexts": [im.parameters for im in images], "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "clip_skip": p.clip_skip,
        "is_using_inpainting_conditioning": bool(img2img and getattr(req.image_request.model, "inpainting", False)),
        "version": version,
    }


def png_info(body: dict, limits: Limits) -> dict:
    """POST /sdapi/v1/png-info: an image's infotext, read back by A1111's rules (a "Size" is split into
    "Size-1" and "Size-2"), and its other text chunks."""
    f = _Fields.from_json(body)
    if not f.has("image") or f.get("image") is None:
        raise invalid("image", "'image' is required: a base64 image.", "missing_required_parameter")
    im = _decode(f.get("image"), "image", limits)
    text = {k: v for k, v in im.info.items() if isinstance(v, str)}
    infotext = text.pop("parameters", "")
    if not infotext:
        return {"info": "", "items": text, "parameters": {}}
    prompt, negative, pairs = split_infotext(infotext)
    parameters = {"Prompt": prompt, "Negative prompt": negative}
    for key, value in pairs.items():
        m = re.fullmatch(r"(\d+)x(\d+)", value)
        parameters.update({f"{key}-1": m[1], f"{key}-2": m[2]} if m else {key: value})
    return {"info": infotext, "items": text, "parameters": parameters}


def progress(jobs, waiting: int, want_image: bool) -> dict:
    """GET /sdapi/v1/progress: the oldest running generation of any worker (api.jobs), in A1111's shape: the
    fraction done over the request's images, the time left estimated from the time so far, and, when asked
    (``skip_current_image`` false), its latest preview. ``waiting``: requests queued in this worker."""
    running = jobs.running()
    if want_image:
        jobs.watch()
    if not running:
        return {"progress": 0.0, "eta_relative": 0.0,
                "state": {"skipped": False, "interrupted": False, "job": "", "job_count": waiting,
                          "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0},
                "current_image": None, "textinfo": None}
    job = running[0]
    done = (job["image"] + job["step"] / max(job["steps"], 1)) / job["images"]
    elapsed = max(0.0, time.time() - job["started"])
    preview = jobs.preview(job) if want_image else None
    return {"progress": done, "eta_relative": elapsed / done - elapsed if done > 0 else 0.0,
            "state": {"skipped": False, "interrupted": False, "job": f"Batch {job['image'] + 1} out of {job['images']}",
                      "job_count": job["images"], "job_no": job["image"],
                      "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job["started"])),
                      "sampling_step": job["step"], "sampling_steps": job["steps"]},
            "current_image": base64.b64encode(preview).decode("ascii") if preview else None,
            "textinfo": f"request {job['request_id']}: step {job['step']}/{job['steps']} of image "
                        f"{job['image'] + 1}/{job['images']}"}


def loras(lora_dir: str | None) -> list[dict]:
    """GET /sdapi/v1/loras: the adapters prompts may name, with their safetensors metadata (A1111's shape)."""
    from sdcore.formats.files import TensorFile
    from sdcore.lora import available, find_lora
    out = []
    for name in available(lora_dir) if lora_dir else []:
        path = find_lora(lora_dir, name)
        try:
            metadata = dict(TensorFile(path).metadata) if path.endswith(".safetensors") else {}
        except CheckpointError:          # listed all the same: a request naming it gets the reason
            metadata = {}
        out.append({"name": name, "alias": name, "path": path, "metadata": metadata})
    return out


def embeddings(model) -> dict:
    """GET /sdapi/v1/embeddings: the embeddings of --embd-dir this model's text encoder can take ("loaded") and
    those made for another width ("skipped"), in A1111's shape."""
    found = {"loaded": {}, "skipped": {}}
    directory = getattr(model, "embeddings", None)
    if directory is None:
        return found
    width = model.text_encoder.cfg.width
    for name in directory.names():
        try:
            vectors = directory.vectors(name, width)
            found["loaded"][name] = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                     "shape": width, "vectors": len(vectors)}
        except CheckpointError:          # made for another text-encoder width, or unreadable
            found["skipped"][name] = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                      "shape": None, "vectors": None}
    return found
