"""ControlNet over HTTP, through a real gunicorn started with --control-net (SD_CONTROL_NET): the seed
document's own multipart example, JSON with a base64 control image, and an edit with a control image."""
import base64
import io

import pytest
import requests
import torch
from PIL import Image, ImageDraw

from bench.harness import API_KEY, Gunicorn, require_pipeline
from bench.references import pixels

AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory, default_model_path):
    require_pipeline()
    import sdcore
    from sdcore.controlnet import ControlNet
    from sdcore.formats.write import random_init_, save_controlnet
    tmp = tmp_path_factory.mktemp("controlnet-http")
    base = sdcore.load_model(default_model_path)
    save_controlnet(tmp / "control_tiny.safetensors", random_init_(ControlNet(base.unet.cfg), 21), dtype=torch.float16)
    srv = Gunicorn(tmp / "data", tmp / "gunicorn.log", SD_CONTROL_NET=str(tmp / "control_tiny.safetensors"))
    try:
        srv.wait_healthy()
        yield srv
    finally:
        srv.stop()


def control_png(size=64) -> bytes:
    img = Image.new("RGB", (size, size), (0, 0, 0))
    ImageDraw.Draw(img).ellipse((12, 12, size - 12, size - 12), outline=(255, 255, 255), width=3)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def fetch(server, item) -> Image.Image:
    if "b64_json" in item:
        data = base64.b64decode(item["b64_json"])
    else:
        r = requests.get(item["url"], headers=AUTH, timeout=30)
        assert r.status_code == 200
        data = r.content
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def test_seed_document_multipart_example(server):
    """curl --form 'control_image=@…' --form 'prompt="a person"' --form 'cfg_scale="7.0"' … (the seed's example)."""
    form = {"prompt": "a person", "cfg_scale": "7.0", "sample_method": "euler_a", "steps": "2", "size": "64x64",
            "control_strength": "0.9", "seed": "42"}
    r = requests.post(f"{server.base}/v1/images/generations", headers=AUTH, data=form,
                      files={"control_image": ("control_image.png", control_png(), "image/png")}, timeout=120)
    assert r.status_code == 200, r.text
    (item,) = r.json()["data"]
    img = fetch(server, item)
    assert img.size == (64, 64) and "Control strength: 0.9" in img.text["parameters"]


def test_json_base64_control_image_equals_multipart(server):
    fields = {"prompt": "a ring", "steps": 2, "size": "64x64", "seed": 5, "sample_method": "euler",
              "control_strength": 1.2, "response_format": "b64_json"}
    j = requests.post(f"{server.base}/v1/images/generations", headers=AUTH, timeout=120,
                      json=fields | {"control_image": base64.b64encode(control_png()).decode()})
    assert j.status_code == 200, j.text
    m = requests.post(f"{server.base}/v1/images/generations", headers=AUTH, timeout=120,
                      data={k: str(v) for k, v in fields.items()},
                      files={"control_image": ("c.png", control_png(), "image/png")})
    assert m.status_code == 200, m.text
    a, b = fetch(server, j.json()["data"][0]), fetch(server, m.json()["data"][0])
    assert torch.equal(pixels(a), pixels(b))
    plain = requests.post(f"{server.base}/v1/images/generations", headers=AUTH, timeout=120, json=fields)
    assert not torch.equal(pixels(fetch(server, plain.json()["data"][0])), pixels(a))   # the control matters
    zero = requests.post(f"{server.base}/v1/images/generations", headers=AUTH, timeout=120,
                         json=fields | {"control_strength": 0, "control_image": base64.b64encode(control_png()).decode()})
    assert torch.equal(pixels(fetch(server, zero.json()["data"][0])), pixels(fetch(server, plain.json()["data"][0])))


def test_edit_with_control_image_and_canny(server):
    photo = io.BytesIO()
    Image.new("RGB", (64, 64), (90, 140, 200)).save(photo, format="PNG")
    r = requests.post(f"{server.base}/v1/images/edits", headers=AUTH, timeout=120,
                      data={"prompt": "x", "steps": "3", "size": "64x64", "strength": "0.6", "response_format": "b64_json",
                            "apply_canny_preprocessor": "true"},
                      files={"image": ("i.png", photo.getvalue(), "image/png"),
                             "control_image": ("c.png", control_png(), "image/png")})
    assert r.status_code == 200, r.text
    text = fetch(server, r.json()["data"][0]).text["parameters"]
    assert "Control strength: 0.9" in text and "canny" in text and "Denoising strength: 0.6" in text
