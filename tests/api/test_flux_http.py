"""A FLUX-dev-shaped model (small random networks, the transformer alone in Black Forest Labs' names with ae, clip_l
and t5xxl files beside it, as --diffusion-model, --vae, --clip-l and --t5xxl give them) served over HTTP with the
real pipeline: a generation with the guidance field equals diffusers' FluxPipeline on the same weights within 1/255,
the infotext records the guidance, the A1111 route takes Forge's distilled_cfg_scale, and guidance sent to a model
without that input is a 400."""
import base64
import io

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from PIL import Image

import sdcore
from bench.references import pixels
from sdcore.infotext import split_infotext
from sdcore.pipeline import generate
from tests.api_helpers import error_of, make_app
from tiny_models import flux_diffusers_pipeline, flux_files

BODY = {"prompt": "a kite over dunes", "size": "64x64", "steps": 3, "seed": 4, "guidance": 4.0,
        "response_format": "b64_json"}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("flux-http")
    parts = flux_files(d, dev=True, seed=7)
    model = sdcore.load_model(d / "transformer.safetensors", device="cpu", dtype=torch.float32, vae=d / "ae.safetensors",
                              clip_l=d / "clip_l.safetensors", t5xxl=d / "t5xxl.safetensors")
    return model, flux_diffusers_pipeline(parts, d)


@pytest.fixture()
def client(built, tmp_path):
    app, _ = make_app(tmp_path, stub=generate, model=built[0])
    return app.test_client()


def test_generation_with_guidance_equals_diffusers(client, built):
    model, pipe = built
    resp = client.post("/v1/images/generations", json=BODY)
    assert resp.status_code == 200, resp.get_data(as_text=True)
    img = Image.open(io.BytesIO(base64.b64decode(resp.get_json()["data"][0]["b64_json"])))
    noise = torch.randn((1, 16, 8, 8), generator=torch.Generator().manual_seed(BODY["seed"]))
    with torch.no_grad():
        ref = pipe(BODY["prompt"], height=64, width=64, num_inference_steps=3, guidance_scale=4.0,
                   latents=FluxPipeline._pack_latents(noise, 1, 16, 8, 8), output_type="np",
                   max_sequence_length=model.t5_tokens).images[0]
    want = torch.from_numpy(np.round(ref * 255).astype(np.uint8)).permute(2, 0, 1)
    assert want.float().std() > 10
    assert (pixels(img).int() - want.int()).abs().max() <= 1
    fields = split_infotext(img.text["parameters"])[2]
    assert (fields["Distilled CFG Scale"], fields["CFG scale"], fields["Sampler"]) == ("4.0", "1.0", "Euler")


def test_a1111_takes_forges_distilled_cfg_scale(client):
    body = {"prompt": BODY["prompt"], "width": 64, "height": 64, "steps": 2, "seed": 4, "distilled_cfg_scale": 2.5}
    resp = client.post("/sdapi/v1/txt2img", json=body)
    assert resp.status_code == 200, resp.get_data(as_text=True)
    info = resp.get_json()["info"]
    assert "Distilled CFG Scale: 2.5" in info


def test_guidance_out_of_range_or_for_another_model_is_a_400(client, tmp_path, default_model_path):
    assert error_of(client.post("/v1/images/generations", json={**BODY, "guidance": 31}), 400)["param"] == "guidance"
    sd1 = sdcore.load_model(default_model_path, device="cpu", dtype=torch.float32)
    app, _ = make_app(tmp_path / "sd1", stub=generate, model=sd1)
    err = error_of(app.test_client().post("/v1/images/generations", json={**BODY, "size": "64x64"}), 400)
    assert err["param"] == "guidance" and "FLUX dev" in err["message"]
    for c in (client, app.test_client()):               # skip-layer guidance is SD3's
        body = {k: v for k, v in BODY.items() if k != "guidance"} | {"size": "64x64", "slg_scale": 2.5}
        err = error_of(c.post("/v1/images/generations", json=body), 400)
        assert err["param"] == "slg_scale" and "SD3" in err["message"], err
