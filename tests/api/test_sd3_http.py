"""An SD3-shaped model (small random networks in Stability AI's single-file layout) served over HTTP with the real
pipeline: a generation equals diffusers' StableDiffusion3Pipeline on the same weights within 1/255, edits run,
a request that leaves them out gets the family's sampler, steps and scale, a prompt past T5's window is cut
there (the CLIPs read on in chunks), and what SD3 cannot do is a 400 naming the field."""
import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

import sdcore
from bench.references import pixels
from sdcore.infotext import split_infotext
from sdcore.model import T5_TOKENS
from sdcore.pipeline import generate
from tests.api_helpers import error_of, make_app
from tiny_models import sd3_diffusers_pipeline, sd3_single_file

BODY = {"prompt": "a red fox in snow, woodcut", "negative_prompt": "blurry", "size": "64x64", "steps": 3,
        "cfg_scale": 5.0, "seed": 21, "sample_method": "euler", "response_format": "b64_json"}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("sd3-http")
    sd = sd3_single_file(d / "sd3_tiny.safetensors", seed=5)
    model = sdcore.load_model(d / "sd3_tiny.safetensors", device="cpu", dtype=torch.float32)
    return model, sd3_diffusers_pipeline(sd, d)


@pytest.fixture()
def client(built, tmp_path):
    app, _ = make_app(tmp_path, stub=generate, model=built[0])
    return app.test_client()


def _image(resp) -> Image.Image:
    assert resp.status_code == 200, resp.get_data(as_text=True)
    return Image.open(io.BytesIO(base64.b64decode(resp.get_json()["data"][0]["b64_json"])))


def test_generation_equals_diffusers(client, built):
    _, pipe = built
    img = _image(client.post("/v1/images/generations", json=BODY))
    noise = torch.randn((1, 16, 8, 8), generator=torch.Generator().manual_seed(BODY["seed"]))
    with torch.no_grad():
        ref = pipe(BODY["prompt"], negative_prompt=BODY["negative_prompt"], height=64, width=64, num_inference_steps=3,
                   guidance_scale=5.0, latents=noise, output_type="np").images[0]
    want = torch.from_numpy(np.round(ref * 255).astype(np.uint8)).permute(2, 0, 1)
    assert want.float().std() > 10
    assert (pixels(img).int() - want.int()).abs().max() <= 1


def test_skip_layer_guidance_equals_diffusers(client, built):
    """diffusers' SD3 pipeline with skip_guidance_layers: of 6 steps, those with 6·start < i < 6·end (i = 1, 2 for
    start 0.01, end 0.5) also get scale·(v_c − v_skip). Over a form as over JSON; the image records it."""
    _, pipe = built
    slg = {"slg_scale": 2.8, "skip_layers": [1], "skip_layer_start": 0.01, "skip_layer_end": 0.5}
    body = {**BODY, "steps": 6, **slg}
    img = _image(client.post("/v1/images/generations", json=body))
    plain = _image(client.post("/v1/images/generations", json={**body, "slg_scale": 0}))
    form = {k: str(v) for k, v in body.items()} | {"skip_layers": "1"}
    assert np.array_equal(np.asarray(_image(client.post("/v1/images/generations", data=form))), np.asarray(img))
    noise = torch.randn((1, 16, 8, 8), generator=torch.Generator().manual_seed(BODY["seed"]))
    with torch.no_grad():
        ref = pipe(BODY["prompt"], negative_prompt=BODY["negative_prompt"], height=64, width=64, num_inference_steps=6,
                   guidance_scale=5.0, latents=noise, output_type="np", skip_guidance_layers=[1],
                   skip_layer_guidance_scale=2.8, skip_layer_guidance_start=0.01,
                   skip_layer_guidance_stop=0.5).images[0]
    want = torch.from_numpy(np.round(ref * 255).astype(np.uint8)).permute(2, 0, 1)
    assert (pixels(img).int() - want.int()).abs().max() <= 1
    assert (pixels(img).int() - pixels(plain).int()).abs().float().mean() > 2          # it does guide
    fields = split_infotext(img.text["parameters"])[2]
    slg_fields = (fields["SLG scale"], fields["SLG layers"], fields["SLG start"], fields["SLG end"])
    assert slg_fields == ("2.8", "1", "0.01", "0.5")
    assert "SLG scale" not in split_infotext(plain.text["parameters"])[2]


def test_family_defaults_and_edits(client):
    body = {k: v for k, v in BODY.items() if k not in ("steps", "cfg_scale", "sample_method")}
    fields = split_infotext(_image(client.post("/v1/images/generations", json=body)).text["parameters"])[2]
    assert (fields["Steps"], fields["Sampler"], fields["CFG scale"]) == ("28", "Euler", "7.0")        # A1111's name for it
    src = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 40, 40)).save(src, format="PNG")
    form = {"prompt": "a fox", "size": "64x64", "steps": "4", "strength": "0.5", "response_format": "b64_json",
            "image": (io.BytesIO(src.getvalue()), "a.png")}
    resp = client.post("/v1/images/edits", data=form, content_type="multipart/form-data")
    assert _image(resp).size == (64, 64)


def test_a_prompt_past_t5s_window_is_cut_there(built):
    model, _ = built
    words = " ".join(f"word{i}" for i in range(400))
    assert model.tokenizer_3.count(words) > T5_TOKENS
    cut, longer = model.encode_t5([words]), model.encode_t5([words + " and more words at the end"])
    assert torch.equal(cut, longer)                   # nothing past the 255th token reaches T5
    assert not torch.equal(model.encode_t5(["word0 word1"]), cut)


@pytest.mark.parametrize("change, param", [
    ({"size": "72x64"}, "width"),                     # SD3 works on 16-pixel blocks (8-pixel VAE blocks, 2×2 patches)
    ({"size": "512x512"}, "width"),                   # past the small model's position table (16×16 patches)
    ({"scheduler": "karras"}, "scheduler"),
    ({"sample_method": "dpm++2mv2"}, "sample_method"),
    ({"slg_scale": 2.5, "skip_layers": [3]}, "skip_layers"),          # the small model has joint blocks 0-2
    ({"slg_scale": 2.5, "skip_layers": []}, "skip_layers"),
    ({"slg_scale": 2.5, "skip_layers": "7,8"}, "skip_layers"),       # JSON takes an array
    ({"slg_scale": 2.5, "skip_layers": [1.0]}, "skip_layers"),
    ({"slg_scale": -1}, "slg_scale"),
    ({"slg_scale": 2.5, "skip_layers": [1], "skip_layer_start": 0.5, "skip_layer_end": 0.5}, "skip_layer_start"),
    ({"skip_layer_end": 1.5}, "skip_layer_end"),
])
def test_what_sd3_cannot_do_is_a_400(client, change, param):
    err = error_of(client.post("/v1/images/generations", json={**BODY, **change}), 400)
    assert err["param"] == param, err
    assert client.get("/health").status_code == 200


def test_control_image_is_refused(client):
    buf = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buf, format="PNG")
    body = {**BODY, "control_image": base64.b64encode(buf.getvalue()).decode()}
    err = error_of(client.post("/v1/images/generations", json=body), 400)
    assert err["param"] == "control_image" and ("SD3" in err["message"] or "ControlNet" in err["message"]), err
