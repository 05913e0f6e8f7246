"""The infotext every image carries, read back by AUTOMATIC1111's own rules (the reference below restates
modules/infotext_utils.py's parse_generation_parameters: its parameter regex, its prompt / negative prompt
split, its unquoting and "Size-1"/"Size-2"), and by ours."""
import json
import re

import pytest
from PIL import Image

from sdcore.infotext import format_infotext, infotext, parse_infotext
from sdcore.pipeline import GenerationParams

# AUTOMATIC1111's re_param_code and re_imagesize (modules/infotext_utils.py)
A1111_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
A1111_SIZE = re.compile(r"^(\d+)x(\d+)$")


def a1111_parse(text: str) -> dict:
    """What A1111's parse_generation_parameters returns for ``text`` (without its defaults for absent keys)."""
    res = {}
    *lines, last = text.strip().split("\n")
    if len(A1111_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt, negative, done_with_prompt = "", "", False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done_with_prompt = True
            line = line[16:].strip()
        if done_with_prompt:
            negative += ("" if negative == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    res["Prompt"], res["Negative prompt"] = prompt, negative
    for k, v in A1111_PARAM.findall(last):
        if v and v[0] == '"' and v[-1] == '"':
            v = json.loads(v)
        m = A1111_SIZE.match(v)
        if m:
            res[f"{k}-1"], res[f"{k}-2"] = m.group(1), m.group(2)
        else:
            res[k] = v
    return res


@pytest.mark.parametrize("p, model", [
    (GenerationParams("a lighthouse at dusk", steps=20, sample_method="dpm++2m", scheduler="karras", seed=42), "sd15"),
    (GenerationParams("line one\nline two, with: colons", negative_prompt="a, b: c\nd", steps=4, cfg_scale=4.5,
                      sample_method="euler_a", scheduler="discrete", seed=2 ** 40, width=768, height=512, clip_skip=2,
                      init_image=Image.new("RGB", (8, 8)), strength=0.35), 'odd, "model": name'),
    (GenerationParams("東京 😀", steps=1, sample_method="lcm", scheduler="lcm", seed=0), "m"),
])
def test_a1111_reads_every_field_back(p, model):
    text = infotext(p, model)
    got = a1111_parse(text)
    assert got["Prompt"] == p.prompt and got["Negative prompt"] == p.negative_prompt
    labels = {"dpm++2m": "DPM++ 2M", "euler_a": "Euler a", "lcm": "LCM"}
    schedules = {"karras": "Karras", "discrete": "Uniform", "lcm": "LCM"}
    assert got["Steps"] == str(p.steps) and got["Sampler"] == labels[p.sample_method]
    assert got["Schedule type"] == schedules[p.scheduler] and float(got["CFG scale"]) == p.cfg_scale
    assert got["Seed"] == str(p.seed) and (got["Size-1"], got["Size-2"]) == (str(p.width), str(p.height))
    assert got["Model"] == model
    if p.init_image is not None:
        assert float(got["Denoising strength"]) == p.strength
    assert got.get("Clip skip", "1") == str(p.clip_skip)
    # and ours reads it back into the same parameters
    back = parse_infotext(text)
    assert (back["sample_method"], back["scheduler"], back["seed"], back["model"]) == (
        p.sample_method, p.scheduler, p.seed, model)
    assert (back["prompt"], back["negative_prompt"]) == (p.prompt, p.negative_prompt)


def test_skip_layer_guidance_is_recorded_when_it_acts_and_read_back():
    p = GenerationParams("a fox", steps=28, cfg_scale=4.5, sample_method="euler", scheduler="discrete", slg_scale=2.5,
                         skip_layers=(7, 8, 9), skip_layer_start=0.01, skip_layer_end=0.2)
    text = infotext(p, "sd3.5_medium")
    got = a1111_parse(text)
    assert (got["SLG scale"], got["SLG layers"], got["SLG start"], got["SLG end"]) == ("2.5", "7 8 9", "0.01", "0.2")
    back = parse_infotext(text)
    assert (back["slg_scale"], back["skip_layers"], back["skip_layer_start"], back["skip_layer_end"]) == (
        2.5, (7, 8, 9), 0.01, 0.2)
    for off in (dict(slg_scale=0.0), dict(cfg_scale=1.0)):          # off, or no guidance for it to act in
        assert "SLG" not in infotext(GenerationParams(**{**vars(p), **off}), "m")


def test_layout_as_a1111_writes_it():
    text = format_infotext("p", "", [("Steps", 1), ("Sampler", "Euler"), ("Model", None), ("Size", "64x64")])
    assert text == "p\nSteps: 1, Sampler: Euler, Size: 64x64"       # no negative line when empty; None omitted
    assert format_infotext("p", "n", [("Model", "a:b")]) == 'p\nNegative prompt: n\nModel: "a:b"'


def test_older_infotexts_with_our_names_still_parse():
    old = "x\nNegative prompt: \nSteps: 3, Sampler: dpm++2m, Schedule type: karras, CFG scale: 7.0, Seed: 9, " \
          "Size: 64x64, Model: m"
    got = parse_infotext(old)
    assert (got["sample_method"], got["scheduler"], got["negative_prompt"]) == ("dpm++2m", "karras", "")
