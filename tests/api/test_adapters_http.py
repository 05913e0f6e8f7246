"""LoRAs and textual-inversion embeddings over HTTP, on the embedded default model and the real pipeline:
<lora:NAME:W> tags and the ``lora`` field (the sd.cpp server's) name the same files in --lora-model-dir and
give the same image; names that leave the directory, unknown names and malformed tags are 400s in each
route's error shape; the infotext lists adapters and embeddings with A1111's short hashes, computed here from
its definitions; an embedding from --embd-dir changes the image, one for another family is a 400."""
import base64
import hashlib
import io
import json
import struct

import pytest
import torch
from PIL import Image

import sdcore
from bench.lora_files import write_lora
from sdcore.pipeline import generate
from sdcore.infotext import split_infotext
from tests.api_helpers import error_of, make_app

BODY = {"size": "128x128", "steps": 2, "seed": 7, "response_format": "b64_json"}


@pytest.fixture(scope="module")
def model(default_model_path):
    return sdcore.load_model(default_model_path, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def lora_dir(model, tmp_path_factory):
    d = tmp_path_factory.mktemp("loras")
    write_lora(d / "film_grain.safetensors", model, convolutions=True, seed=1)
    write_lora(d / "ink.safetensors", model, layout="peft", seed=2)
    (tmp_path_factory.getbasetemp() / "outside.safetensors").write_bytes((d / "ink.safetensors").read_bytes())
    return d


@pytest.fixture()
def client(model, lora_dir, tmp_path):
    app, _ = make_app(tmp_path, stub=generate, model=model, lora_model_dir=str(lora_dir))
    return app.test_client()


def _image(resp):
    assert resp.status_code == 200, resp.get_data(as_text=True)
    data = base64.b64decode(resp.get_json()["data"][0]["b64_json"])
    img = Image.open(io.BytesIO(data))
    return torch.tensor(list(img.convert("RGB").getdata())), img.text.get("parameters", "")


def _a1111_short_hash(path) -> str:
    """A1111's addnet hash of a safetensors file: sha256 of everything after the 8-byte length and the header."""
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    return hashlib.sha256(raw[8 + n:]).hexdigest()[:12]


def test_tag_and_field_give_the_same_image_and_differ_from_none(client, lora_dir):
    plain, _ = _image(client.post("/v1/images/generations", json={**BODY, "prompt": "a red barn"}))
    tagged, info = _image(client.post("/v1/images/generations",
                                      json={**BODY, "prompt": "a red barn <lora:film_grain:0.8>"}))
    field, info_field = _image(client.post("/v1/images/generations", json={
        **BODY, "prompt": "a red barn", "lora": [{"name": "film_grain", "multiplier": 0.8}]}))
    assert torch.equal(tagged, field)
    assert (tagged - plain).abs().float().mean() > 1.0         # the adapter changes the picture
    prompt, _, pairs = split_infotext(info)
    assert prompt == "a red barn <lora:film_grain:0.8>"        # as sent: replaying it applies the LoRA again
    assert pairs["Lora hashes"] == f"film_grain: {_a1111_short_hash(lora_dir / 'film_grain.safetensors')}"
    assert split_infotext(info_field)[2]["Lora hashes"] == pairs["Lora hashes"]
    again, _ = _image(client.post("/v1/images/generations", json={**BODY, "prompt": "a red barn"}))
    assert torch.equal(again, plain)                            # taken off again: today's image, bit for bit


def test_two_loras_and_a_repeated_name_add_up(client):
    both, _ = _image(client.post("/v1/images/generations", json={
        **BODY, "prompt": "a barn <lora:film_grain:0.5> <lora:ink>", "negative_prompt": "<lora:film_grain:0.3>"}))
    same, _ = _image(client.post("/v1/images/generations", json={
        **BODY, "prompt": "a barn  ", "negative_prompt": "",
        "lora": [{"name": "ink"}, {"name": "film_grain", "multiplier": 0.8}]}))
    assert torch.equal(both, same)


@pytest.mark.parametrize("body, param, words", [
    ({"prompt": "x <lora:../outside:1>"}, "lora", "not a file name"),
    ({"prompt": "x", "lora": [{"name": "/etc/passwd"}]}, "lora", "not a file name"),
    ({"prompt": "x <lora:nope:1>"}, "lora", "available: film_grain, ink"),
    ({"prompt": "x <lora:ink:lots>"}, "prompt", "must be a number"),
    ({"prompt": "x <lora:ink:1:2>"}, "prompt", "<lora:NAME:MULTIPLIER>"),
    ({"prompt": "x", "negative_prompt": "<lora:ink:nan>"}, "negative_prompt", "finite"),
    ({"prompt": "x", "lora": {"name": "ink"}}, "lora", "list"),
    ({"prompt": "x", "lora": [{"multiplier": 1}]}, "lora", "needs a 'name'"),
    ({"prompt": "x", "lora": [{"name": "ink", "multiplier": 50}]}, "multiplier", "between"),
    ({"prompt": "x", "lora": [{"name": "ink"}] * 17}, "lora", "at most 16"),
])
def test_bad_lora_requests_are_400s_and_the_server_goes_on(client, body, param, words):
    err = error_of(client.post("/v1/images/generations", json={**BODY, **body}), 400)
    assert err["param"] == param and words in err["message"], err
    _image(client.post("/v1/images/generations", json={**BODY, "prompt": "still up"}))


def test_a1111_route_takes_tags_and_refuses_unknown_names(client):
    ok = client.post("/sdapi/v1/txt2img", json={"prompt": "a barn <lora:ink:0.5>", "steps": 2, "width": 128,
                                                "height": 128, "seed": 3})
    assert ok.status_code == 200, ok.get_data(as_text=True)
    info = json.loads(ok.get_json()["info"])
    assert "Lora hashes: " in info["infotexts"][0]
    bad = client.post("/sdapi/v1/txt2img", json={"prompt": "a barn <lora:nope>", "steps": 2})
    assert bad.status_code == 422 or bad.status_code == 400
    assert "nope" in bad.get_data(as_text=True)


def test_without_a_lora_directory_tags_are_refused(model, tmp_path):
    app, _ = make_app(tmp_path, stub=generate, model=model)
    err = error_of(app.test_client().post("/v1/images/generations", json={**BODY, "prompt": "x <lora:ink>"}), 400)
    assert "--lora-model-dir" in err["message"]


def test_a_lora_for_another_family_is_a_400(model, lora_dir, tmp_path):
    from sdcore.formats.write import random_init_, save_single_file
    from sdcore.clip import TextEncoder
    from sdcore.unet import UNet
    from sdcore.vae import AutoencoderKL
    from tests.tiny_models import SDXL_TEXT, SDXL_TEXT_2, SDXL_UNET, SDXL_VAE
    path = tmp_path / "xl.safetensors"
    save_single_file(path, random_init_(UNet(SDXL_UNET), 1), random_init_(AutoencoderKL(SDXL_VAE), 2),
                     random_init_(TextEncoder(SDXL_TEXT), 3), family="sdxl",
                     text_2=random_init_(TextEncoder(SDXL_TEXT_2), 4), with_config=False)
    write_lora(tmp_path / "xl_style.safetensors", sdcore.load_model(path, device="cpu", dtype=torch.float32))
    app, _ = make_app(tmp_path / "srv", stub=generate, model=model, lora_model_dir=str(tmp_path))
    client = app.test_client()
    err = error_of(client.post("/v1/images/generations", json={**BODY, "prompt": "x <lora:xl_style>"}), 400)
    assert "another model family" in err["message"] and err["param"] == "lora"
    _image(client.post("/v1/images/generations", json={**BODY, "prompt": "still up"}))


def test_embeddings_from_embd_dir_change_the_image_and_other_widths_are_400s(model, tmp_path):
    d = tmp_path / "embeddings"
    d.mkdir()
    g = torch.Generator().manual_seed(4)
    torch.save({"string_to_param": {"*": torch.randn(2, model.text_encoder.cfg.width, generator=g)}},
               d / "watercolor.pt")
    from safetensors.torch import save_file
    save_file({"clip_l": torch.randn(1, 768, generator=g), "clip_g": torch.randn(1, 1280, generator=g)},
              str(d / "xl_only.safetensors"))
    app, _ = make_app(tmp_path / "srv", stub=generate, model=model, embd_dir=str(d))
    client = app.test_client()
    plain, _ = _image(client.post("/v1/images/generations", json={**BODY, "prompt": "a barn"}))
    styled, info = _image(client.post("/v1/images/generations", json={**BODY, "prompt": "a barn, watercolor"}))
    words, _ = _image(client.post("/v1/images/generations", json={**BODY, "prompt": "a barn, water color"}))
    assert (styled - plain).abs().float().mean() > 0.5 and not torch.equal(styled, words)
    digest = hashlib.sha256((d / "watercolor.pt").read_bytes()).hexdigest()[:12]
    assert split_infotext(info)[2]["TI hashes"] == f"watercolor: {digest}"
    err = error_of(client.post("/v1/images/generations", json={**BODY, "prompt": "a barn, xl_only"}), 400)
    assert err["param"] == "prompt" and "another model family" in err["message"]
    _image(client.post("/v1/images/generations", json={**BODY, "prompt": "still up"}))


def test_a1111_lists_the_loras_and_embeddings(model, lora_dir, tmp_path):
    d = tmp_path / "embeddings"
    d.mkdir()
    torch.save({"string_to_param": {"*": torch.zeros(3, model.text_encoder.cfg.width)}}, d / "style.pt")
    torch.save({"string_to_param": {"*": torch.zeros(1, 1024)}}, d / "sd2style.pt")
    app, _ = make_app(tmp_path / "srv", stub=generate, model=model, lora_model_dir=str(lora_dir), embd_dir=str(d))
    client = app.test_client()
    listed = client.get("/sdapi/v1/loras").get_json()
    assert [(x["name"], x["alias"]) for x in listed] == [("film_grain", "film_grain"), ("ink", "ink")]
    assert listed[0]["path"] == str((lora_dir / "film_grain.safetensors").resolve())
    got = client.get("/sdapi/v1/embeddings").get_json()
    assert got["loaded"]["style"]["vectors"] == 3 and got["loaded"]["style"]["shape"] == model.text_encoder.cfg.width
    assert list(got["skipped"]) == ["sd2style"]


def test_a_150_token_prompt_draws_differently_from_its_first_75_tokens(client, model):
    """Past 77 positions the prompt goes on in a second chunk, instead of being cut (the original server's
    behaviour, which would draw the first 75 tokens' image)."""
    first = " ".join(["red", "circle", "blue", "square"] * 19)[:-len(" square")]      # 75 one-token words
    rest = " ".join(["green", "triangle", "yellow", "background"] * 19)[:-len(" background")]
    assert len(model.tokenizer.encode(first)) == 75 and len(model.tokenizer.encode(first + " " + rest)) == 150
    short, _ = _image(client.post("/v1/images/generations", json={**BODY, "prompt": first}))
    long, _ = _image(client.post("/v1/images/generations", json={**BODY, "prompt": first + " " + rest}))
    assert (long - short).abs().float().mean() > 1.0
