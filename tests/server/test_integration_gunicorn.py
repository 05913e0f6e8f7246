"""End to end: a real gunicorn (gunicorn.conf.py, wsgi:app) with the tiny default model, driven by
the official ``openai`` client. Needs weights/tiny-sd1.safetensors and sdcore.pipeline.generate;
fails clearly (does not skip) when they are missing."""
import base64
import io

import openai
import pytest
import requests
from openai import OpenAI
from PIL import Image

from bench.harness import API_KEY, Gunicorn, require_pipeline

PROMPT = "a red fox in the snow"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    require_pipeline()
    tmp = tmp_path_factory.mktemp("gunicorn")
    srv = Gunicorn(tmp / "data", tmp / "gunicorn.log")
    try:
        srv.wait_healthy()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=f"{server.base}/v1", api_key=API_KEY, max_retries=0, timeout=300)


def auth():
    return {"Authorization": f"Bearer {API_KEY}"}


def png_of(data: bytes, size=(64, 64)) -> Image.Image:
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and not data.startswith(b"data:")
    im = Image.open(io.BytesIO(data))
    im.load()
    assert im.format == "PNG" and im.size == size
    return im


def check_parameters(im: Image.Image, prompt: str, seed: int, steps: int, size="64x64"):
    text = im.text.get("parameters")
    assert text, f"no parameters chunk in {im.text!r}"
    assert text.startswith(prompt), text
    assert f"Steps: {steps}" in text and f"Seed: {seed}" in text and f"Size: {size}" in text, text


def item_seed(item) -> int:
    return (item.model_extra or {}).get("seed")


def b64_images(resp) -> list[bytes]:
    return [base64.b64decode(d.b64_json, validate=True) for d in resp.data]


def test_models_and_health(server, client):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["tiny-sd1"]
    assert requests.get(server.base + "/health", timeout=10).json()["status"] == "ok"


def test_generate_b64_json(client):
    resp = client.images.generate(prompt=PROMPT, n=3, size="64x64", response_format="b64_json",
                                  extra_body={"steps": 3, "seed": 1234, "sample_method": "euler"})
    assert len(resp.data) == 3
    for i, (item, raw) in enumerate(zip(resp.data, b64_images(resp))):
        assert item_seed(item) == 1234 + i and item.model_extra.get("prompt") == PROMPT
        check_parameters(png_of(raw), PROMPT, 1234 + i, 3)
    assert len(set(b64_images(resp))) == 3          # different seeds, different images


def test_generate_url_and_download(server, client):
    resp = client.images.generate(prompt=PROMPT, n=3, size="64x64", response_format="url",
                                  extra_body={"steps": 2, "seed": 77, "sample_method": "dpm++2m",
                                              "scheduler": "karras"})
    assert len(resp.data) == 3
    for i, item in enumerate(resp.data):
        assert item.url.startswith(f"{server.base}/v1/files/download/file-")
        assert item_seed(item) == 77 + i
        r = requests.get(item.url, headers=auth(), timeout=30)
        assert r.status_code == 200 and r.headers["Content-Type"] == "image/png"
        check_parameters(png_of(r.content), PROMPT, 77 + i, 2)
        assert requests.get(item.url, timeout=30).status_code == 401   # the key guards downloads too
    files = requests.get(server.base + "/v1/files", headers=auth(), timeout=30).json()["data"]
    assert {item.url.split("/")[-2] for item in resp.data} <= {f["id"] for f in files}


@pytest.mark.parametrize("sampler", ["euler_a", "heun", "dpm2", "dpm++2s_a", "dpm++2mv2", "ipndm",
                                     "ipndm_v", "lcm"])
def test_samplers(client, sampler):
    resp = client.images.generate(prompt=PROMPT, n=1, size="64x64", response_format="b64_json",
                                  extra_body={"steps": 2, "seed": 5, "sample_method": sampler})
    (raw,) = b64_images(resp)
    check_parameters(png_of(raw), PROMPT, 5, 2)


def test_http_image_equals_reference_pipeline(client, default_model_path):
    """The served image equals one computed by diffusers + transformers + k-diffusion's euler on the
    same weights and seed, within 1/255 per pixel after PNG rounding."""
    import sdcore
    import torch
    from bench.references import pixels, reference_image
    resp = client.images.generate(prompt="a blue square", size="64x64", response_format="b64_json",
                                  extra_body={"steps": 5, "seed": 2024, "sample_method": "euler", "cfg_scale": 6.0,
                                              "negative_prompt": "red"})
    ours = pixels(png_of(b64_images(resp)[0]))
    model = sdcore.load_model(default_model_path, device="cpu", dtype=torch.float32)
    ref = reference_image(model, "a blue square", "red", 2024, 5, 6.0, 64)
    assert (ours.int() - ref.int()).abs().max() <= 1
    assert ours.float().std() > 5


def test_same_seed_same_bytes(client):
    kw = dict(prompt=PROMPT, n=1, size="64x64", response_format="b64_json")
    body = {"steps": 3, "seed": 4242, "sample_method": "euler_a"}
    a = b64_images(client.images.generate(**kw, extra_body=body))[0]
    b = b64_images(client.images.generate(**kw, extra_body=body))[0]
    c = b64_images(client.images.generate(**kw, extra_body={**body, "seed": 4243}))[0]
    assert a == b and a != c


def test_size_honoured(client):
    resp = client.images.generate(prompt=PROMPT, size="128x64", response_format="b64_json",
                                  extra_body={"steps": 2})
    png_of(b64_images(resp)[0], (128, 64))


def _input_png(size=(64, 64)) -> bytes:
    im = Image.new("RGB", size)
    for x in range(size[0]):
        for y in range(size[1]):
            im.putpixel((x, y), (x * 4 % 256, y * 4 % 256, 128))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _mask_png(size=(64, 64)) -> bytes:
    m = Image.new("RGBA", size, (0, 0, 0, 255))
    m.paste((0, 0, 0, 0), (0, 0, size[0] // 2, size[1]))   # repaint the left half
    buf = io.BytesIO()
    m.save(buf, format="PNG")
    return buf.getvalue()


def test_edit_without_mask(client):
    resp = client.images.edit(image=("in.png", _input_png(), "image/png"), prompt=PROMPT, n=2,
                              size="64x64", response_format="b64_json",
                              extra_body={"steps": 4, "seed": 11, "strength": 0.5})
    assert [item_seed(d) for d in resp.data] == [11, 12]
    for i, raw in enumerate(b64_images(resp)):
        check_parameters(png_of(raw), PROMPT, 11 + i, 4)


def test_edit_with_mask_and_url(server, client):
    common = dict(prompt=PROMPT, n=1, size="64x64", extra_body={"steps": 4, "seed": 21, "strength": 0.8})
    masked = client.images.edit(image=("in.png", _input_png(), "image/png"),
                                mask=("mask.png", _mask_png(), "image/png"), response_format="url", **common)
    assert item_seed(masked.data[0]) == 21
    raw = requests.get(masked.data[0].url, headers=auth(), timeout=30).content
    check_parameters(png_of(raw), PROMPT, 21, 4)
    plain = client.images.edit(image=[("in.png", _input_png(), "image/png")],   # sent as image[]
                               response_format="b64_json", **common)
    assert b64_images(plain)[0] != raw


def test_bad_request_through_client(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(prompt=PROMPT, size="65x64")
    assert e.value.status_code == 400 and e.value.body["param"] == "size"
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(prompt=PROMPT, extra_body={"sample_method": "nope"})
    assert e.value.body["param"] == "sample_method"


def test_auth_required(server):
    bad = OpenAI(base_url=f"{server.base}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.images.generate(prompt=PROMPT, size="64x64")
    r = requests.post(server.base + "/v1/images/generations", json={"prompt": PROMPT}, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = requests.get(server.base + "/v1/models", timeout=30)
    assert r.status_code == 401


def test_progress_logged(server, client):
    client.images.generate(prompt=PROMPT, size="64x64", response_format="b64_json",
                           extra_body={"steps": 2}, extra_headers={"X-Request-Id": "progress-check"})
    log = server.log_tail(200000)
    assert "request progress-check: step" in log and "s/step" in log
    assert API_KEY not in log


def test_control_image_without_controlnet_is_a_400(server):
    import base64 as b64
    r = requests.post(f"{server.base}/v1/images/generations", headers=auth(), timeout=60,
                      json={"prompt": "x", "size": "64x64", "steps": 1,
                            "control_image": b64.b64encode(_input_png()).decode()})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "control_image" and "no ControlNet" in err["message"]
    bad = requests.post(f"{server.base}/v1/images/generations", headers=auth(), timeout=60,
                        json={"prompt": "x", "size": "64x64", "control_image": "not base64 !!"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "control_image"
    flag = requests.post(f"{server.base}/v1/images/generations", headers=auth(), timeout=60,
                         json={"prompt": "x", "size": "64x64", "apply_canny_preprocessor": "yes"})
    assert flag.status_code == 400 and flag.json()["error"]["param"] == "apply_canny_preprocessor"


def test_default_size_is_the_models_native_size(client):
    """No size/width/height: the model's native resolution from its metadata (64 for the tiny
    default model); an explicit size is still honoured."""
    native = client.images.generate(prompt="x", response_format="b64_json", extra_body={"steps": 1})
    assert png_of(b64_images(native)[0], size=(64, 64))
    explicit = client.images.generate(prompt="x", size="128x64", response_format="b64_json", extra_body={"steps": 1})
    assert png_of(b64_images(explicit)[0], size=(128, 64))
    auto = client.images.generate(prompt="x", response_format="b64_json", extra_body={"steps": 1, "width": 72})
    assert png_of(b64_images(auto)[0], size=(72, 512))
