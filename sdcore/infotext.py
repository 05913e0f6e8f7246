"""The "parameters" text every image carries (AUTOMATIC1111's "infotext"), and reading it back.

Layout, as AUTOMATIC1111 writes it and its ``parse_generation_parameters`` reads it:

    <prompt, any number of lines>
    Negative prompt: <negative prompt>                  (only when there is one)
    Steps: 20, Sampler: Euler a, Schedule type: Uniform, CFG scale: 7.0, Seed: 42, Size: 512x512, Model: sd

A value holding a comma, colon, newline or double quote is written as a JSON string, so that the
", "-separated line still splits where it should. Samplers and schedules are written with A1111's
labels (``SAMPLER_LABELS``, ``SCHEDULER_LABELS``), which A1111, image browsers and model sites
recognise; the parser takes our own names too (images written before the labels).
"""
from __future__ import annotations

import json
import re

from samplers import uses_guidance

# Our sampler and schedule names -> the labels AUTOMATIC1111 shows and writes. A sampler without an A1111
# counterpart keeps a label in the same style; a sampler registered at run time is written by its name.
SAMPLER_LABELS = {
    "euler": "Euler", "euler_a": "Euler a", "heun": "Heun", "dpm2": "DPM2", "dpm++2s_a": "DPM++ 2S a",
    "dpm++2m": "DPM++ 2M", "dpm++2mv2": "DPM++ 2M v2", "ipndm": "iPNDM", "ipndm_v": "iPNDM v", "lcm": "LCM",
}
# "discrete" (timesteps evenly spaced from 999 to 0) is what A1111 calls Uniform
SCHEDULER_LABELS = {"discrete": "Uniform", "karras": "Karras", "exponential": "Exponential", "lcm": "LCM"}


def sampler_label(name: str) -> str:
    return SAMPLER_LABELS.get(name, name)


def scheduler_label(name: str) -> str:
    return SCHEDULER_LABELS.get(name, name)


def _from_label(labels: dict, text: str) -> str:
    for name, label in labels.items():
        if text == label:
            return name
    return text                     # our own name (or one the parser cannot map: kept as written)


def quote(value) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ',\n:"') else text


def unquote(text: str) -> str:
    if text.startswith('"') and text.endswith('"') and len(text) >= 2:
        try:
            return json.loads(text)
        except ValueError:
            return text
    return text


def format_infotext(prompt: str, negative_prompt: str, fields: list[tuple[str, object]]) -> str:
    """The infotext of one image: ``fields`` are (key, value) pairs in the order they are written."""
    line = ", ".join(f"{key}: {quote(value)}" for key, value in fields if value is not None)
    negative = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{line}"


def generation_fields(p, model_name: str, loras=(), embeddings=()) -> list[tuple[str, object]]:
    """The (key, value) pairs of a ``GenerationParams`` whose seed and scheduler are the image's own;
    ``loras``: the adapter files applied (sdcore.formats.lora.LoraFile), ``embeddings``: the (name, short hash)
    of the textual-inversion embeddings the prompts name, listed with their short hashes as A1111 lists them
    (the multipliers and the names are in the prompts)."""
    fields = [("Steps", p.steps), ("Sampler", sampler_label(p.sample_method)),
              ("Schedule type", scheduler_label(p.scheduler)), ("CFG scale", p.cfg_scale), ("Seed", p.seed),
              ("Size", f"{p.width}x{p.height}"), ("Model", model_name)]
    if p.init_image is not None:
        fields.append(("Denoising strength", p.strength))
    if p.clip_skip != 1:
        fields.append(("Clip skip", p.clip_skip))
    if p.control_image is not None:
        fields.append(("Control strength", p.control_strength))
        if p.apply_canny_preprocessor:
            fields.append(("Control preprocessor", "canny"))
    if p.refiner is not None:
        fields += [("Refiner", p.refiner.name), ("Refiner switch at", p.refiner_switch_at)]
    if getattr(p, "slg_scale", 0) and uses_guidance(p.cfg_scale):       # skip-layer guidance acted (needs CFG)
        fields += [("SLG scale", p.slg_scale), ("SLG layers", " ".join(map(str, p.skip_layers))),
                   ("SLG start", p.skip_layer_start), ("SLG end", p.skip_layer_end)]
    if getattr(p, "guidance", None) is not None:          # FLUX dev's, under Forge's label
        fields.append(("Distilled CFG Scale", p.guidance))
    if loras:
        fields.append(("Lora hashes", ", ".join(f"{f.name}: {f.short_hash}" for f in loras)))
    if embeddings:
        fields.append(("TI hashes", ", ".join(f"{name}: {digest}" for name, digest in embeddings)))
    return fields


def infotext(p, model_name: str, loras=(), embeddings=()) -> str:
    return format_infotext(p.prompt, p.negative_prompt, generation_fields(p, model_name, loras, embeddings))


# "Key: value," pairs of the last line; a value is a JSON string or runs to the next comma
_PAIR = re.compile(r'\s*([A-Za-z][\w \-/]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def parse_pairs(line: str) -> dict[str, str]:
    return {key.strip(): unquote(value.strip()) for key, value in _PAIR.findall(line)}


def split_infotext(text: str) -> tuple[str, str, dict[str, str]]:
    """(prompt, negative prompt, {key: value}) of an infotext, by A1111's rules: the last line holds the
    pairs, a line starting with "Negative prompt:" starts the negative prompt."""
    *lines, last = text.split("\n")
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].lstrip(" ")
        (negative if in_negative else prompt).append(line)
    return "\n".join(prompt), "\n".join(negative), parse_pairs(last)


def parse_infotext(text: str) -> dict:
    """The ``GenerationParams`` fields (and "model") an infotext records."""
    prompt, negative, values = split_infotext(text)
    width, height = (int(v) for v in values["Size"].split("x"))
    out = dict(prompt=prompt, negative_prompt=negative, steps=int(values["Steps"]),
               sample_method=_from_label(SAMPLER_LABELS, values["Sampler"]),
               scheduler=_from_label(SCHEDULER_LABELS, values["Schedule type"]), cfg_scale=float(values["CFG scale"]),
               seed=int(values["Seed"]), width=width, height=height, model=values["Model"])
    if "Denoising strength" in values:
        out["strength"] = float(values["Denoising strength"])
    if "Clip skip" in values:
        out["clip_skip"] = int(values["Clip skip"])
    if "Control strength" in values:
        out["control_strength"] = float(values["Control strength"])
        out["apply_canny_preprocessor"] = values.get("Control preprocessor") == "canny"
    if "SLG scale" in values:
        out.update(slg_scale=float(values["SLG scale"]), skip_layers=tuple(int(v) for v in values["SLG layers"].split()),
                   skip_layer_start=float(values["SLG start"]), skip_layer_end=float(values["SLG end"]))
    if "Distilled CFG Scale" in values:
        out["guidance"] = float(values["Distilled CFG Scale"])
    if "Refiner" in values:              # a model name, as "model" is
        out["refiner"], out["refiner_switch_at"] = values["Refiner"], float(values["Refiner switch at"])
    for key, field in (("Lora hashes", "lora_hashes"), ("TI hashes", "embedding_hashes")):
        if key in values:                # name -> short hash; the prompts name them (and the LoRAs' multipliers)
            out[field] = dict(pair.split(": ", 1) for pair in values[key].split(", "))
    return out
