"""The committed default model (weights/shapes-sd1.safetensors) is what the weights/README.md says,
loads through the public loader, and — served by a real gunicorn with no model named, asked
through the openai client — draws the colours it is asked for (read back from the pixels)."""
import base64
import hashlib
import io
import re

import numpy as np
import pytest
import torch
from openai import OpenAI
from PIL import Image

import sdcore
from sdcore.pipeline import GenerationParams, generate
from bench.harness import API_KEY, ROOT, Gunicorn
from weights import score, shapes

MODEL = ROOT / "weights" / "shapes-sd1.safetensors"
PROMPTS = [("circle", "red", "blue", "in the centre"), ("square", "yellow", "black", "on the left"),
           ("triangle", "white", "green", "on the right"), ("circle", "blue", "yellow", "on the left"),
           ("square", "green", "white", "in the centre"), ("triangle", "black", "red", "in the centre")]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_images_stay_within_stated_tolerance_of_float32(dtype):
    """The server's default dtype is bf16 on a CPU with native bf16 and on CUDA cards with bf16, fp16 on
    older cards (sdcore.device.resolve_dtype); on the default model their images must stay faithful to
    fp32's (same prompts, seeds, samplers): the same colours, background and shape read back, mean abs
    pixel difference ≤ 1.5/255 over the images and ≤ 5/255 for any one (measured: bf16 0.87 and 3.0,
    its rounding can move a shape's edge by a pixel; fp16 0.06 and 0.29). fp16 runs here on the CPU: its
    rounding, not a card's kernels.

    Position is the exception: the model never learned the position words (weights/README.md: position at
    chance), so where a shape lands is decided by the smallest differences, and bf16 as AMX computes it
    moved one of the nine shapes to the other side (12/255 mean for that image). One image of nine may
    land elsewhere; it is then left out of the pixel figures, which measure rounding, not a moved shape."""
    m32, m16 = sdcore.load_model(MODEL, device="cpu", dtype=torch.float32), sdcore.load_model(MODEL, dtype=dtype)
    diffs, moved = [], []
    for i, labels in enumerate(PROMPTS[:3]):
        for sampler in ("euler_a", "euler", "dpm++2m"):
            p = GenerationParams(prompt=shapes.caption(*labels), width=64, height=64, steps=20, cfg_scale=5.0,
                                 sample_method=sampler, seed=i)
            a, b = (generate(m, p)[0].image for m in (m32, m16))
            got, want = score.classify(b), score.classify(a)
            assert {k: v for k, v in got.items() if k != "position"} == {
                k: v for k, v in want.items() if k != "position"}, (labels, sampler)
            if got["position"] != want["position"]:
                moved.append((labels, sampler))
                continue
            diffs.append(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).mean())
    assert len(moved) <= 1, moved
    assert np.mean(diffs) <= 1.5 and max(diffs) <= 5, diffs


def test_checkpoint_matches_readme_and_loads():
    readme = (ROOT / "weights" / "README.md").read_text()
    recorded = re.search(r"sha256 `([0-9a-f]{64})`", readme).group(1)
    assert hashlib.sha256(MODEL.read_bytes()).hexdigest() == recorded
    m = sdcore.load_model(MODEL, device="cpu", dtype=torch.float32)
    assert (m.family, m.prediction, m.native_size) == ("sd1", "eps", 64)
    assert m.vae.cfg.scale_factor != 0.18215                       # measured, stored in the metadata


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("default-model")
    # no model named and no dtype: the defaults a newcomer gets (bf16 on a CPU with native bf16)
    srv = Gunicorn(tmp / "data", tmp / "gunicorn.log", SD_MODEL="", SD_DTYPE="")
    try:
        srv.wait_healthy()
        yield OpenAI(base_url=f"{srv.base}/v1", api_key=API_KEY, max_retries=0, timeout=300)
    finally:
        srv.stop()


def test_served_by_default_and_draws_the_asked_colours(client):
    assert [m.id for m in client.models.list().data] == ["shapes-sd1"]
    right = backgrounds = shapes_right = 0
    for i, labels in enumerate(PROMPTS * 2):
        r = client.images.generate(prompt=shapes.caption(*labels), response_format="b64_json",
                                   extra_body={"steps": 20, "cfg_scale": 5.0, "sample_method": "euler", "seed": 100 + i})
        img = Image.open(io.BytesIO(base64.b64decode(r.data[0].b64_json)))
        assert img.size == (64, 64)                                 # the model's native size
        seen = score.classify(img)
        right += seen["background"] == labels[2] and seen["colour"] == labels[1]
        backgrounds += seen["background"] == labels[2]
        shapes_right += seen["shape"] == labels[0]
    print(f"asked colour on asked background: {right}/12; asked background: {backgrounds}/12; asked shape: {shapes_right}/12")
    assert right >= 10 and backgrounds >= 11 and shapes_right >= 9, (right, backgrounds, shapes_right)
