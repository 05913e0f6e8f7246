"""AUTOMATIC1111's API (/sdapi/v1) in-process: its names and defaults, the request -> GenerationParams mapping,
the info object, options and checkpoints (real file hashes), HTTP Basic, errors in A1111's shapes, bad input,
and the same pixels through both doors (the real tiny model)."""
import base64
import hashlib
import io
import json
import re

import pytest
import torch
from PIL import Image

import sdcore
from api import a1111
from api.config import ConfigError, Settings
from api_helpers import StubModel, error_of, make_app, png_bytes
from sdcore.infotext import SAMPLER_LABELS

T2I, I2I, OPT = "/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/sdapi/v1/options"
# The keys of A1111's info object (modules/processing.py, Processed.js()), from its source
A1111_INFO_KEYS = {
    "prompt", "all_prompts", "negative_prompt", "all_negative_prompts", "seed", "all_seeds", "subseed", "all_subseeds",
    "subseed_strength", "width", "height", "sampler_name", "cfg_scale", "steps", "batch_size", "restore_faces",
    "face_restoration_model", "sd_model_name", "sd_model_hash", "sd_vae_name", "sd_vae_hash", "seed_resize_from_w",
    "seed_resize_from_h", "denoising_strength", "extra_generation_params", "index_of_first_image", "infotexts",
    "styles", "job_timestamp", "clip_skip", "is_using_inpainting_conditioning", "version"}


def b64png(size=(64, 64), mode="RGB", color=(200, 30, 30)) -> str:
    return base64.b64encode(png_bytes(size, mode, color)).decode()


def a1111_error(resp, status):
    """A1111's exception-handler shape; returns its detail."""
    assert resp.status_code == status, (resp.status_code, resp.get_data(as_text=True))
    body = resp.get_json()
    assert set(body) == {"error", "detail", "body", "errors"} and body["detail"], body
    return body["detail"]


def validation_error(resp):
    """FastAPI's 422 shape; returns the field it names."""
    assert resp.status_code == 422, (resp.status_code, resp.get_data(as_text=True))
    detail = resp.get_json()["detail"]
    assert len(detail) == 1 and set(detail[0]) == {"loc", "msg", "type"} and detail[0]["loc"][0] == "body"
    return detail[0]["loc"][1]


@pytest.fixture
def files(tmp_path):
    """Two checkpoint files with known bytes, as stub models' sources."""
    out = {}
    for name in ("first", "second"):
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(hashlib.sha512(name.encode()).digest() * 300)
        out[name] = path
    return out


@pytest.fixture
def two(tmp_path, files):
    models = {}
    for name, path in files.items():
        models[name] = StubModel(name)
        models[name].source = str(path)
    app, stub = make_app(tmp_path, model=models, max_n=6)
    return app, app.test_client(), stub, models


# --- names ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sent, scheduler, want", [
    (None, None, ("euler", "discrete")),                 # A1111's API default sampler is Euler
    ("Euler a", None, ("euler_a", "discrete")),
    ("euler a", "Karras", ("euler_a", "karras")),        # case does not matter here
    ("k_euler_a", "exponential", ("euler_a", "exponential")),
    ("DPM++ 2M", None, ("dpm++2m", "karras")),           # A1111's Automatic for DPM++ 2M is Karras
    ("DPM++ 2M", "Automatic", ("dpm++2m", "karras")),
    ("DPM++ 2M", "Uniform", ("dpm++2m", "discrete")),
    ("DPM++ 2M Karras", None, ("dpm++2m", "karras")),    # the old combined labels
    ("DPM++ 2M Karras", "Exponential", ("dpm++2m", "karras")),   # the label's schedule wins, as in A1111
    ("DPM++ 2S a Exponential", None, ("dpm++2s_a", "exponential")),
    ("Heun", "normal", ("heun", "discrete")),
    ("DPM2", None, ("dpm2", "discrete")),
    ("LCM", None, ("lcm", "lcm")),
    ("DDIM", None, ("euler", "discrete")),
    ("dpm++2m", "discrete", ("dpm++2m", "discrete")),    # our own names too (stable-diffusion.cpp clients)
])
def test_sampler_and_scheduler_names(sent, scheduler, want):
    assert a1111.resolve_sampler(sent, scheduler) == want


def test_labels_are_a1111s_spelling():
    # the labels AUTOMATIC1111 lists (modules/sd_samplers_kdiffusion.py, sd_samplers_lcm.py)
    assert {SAMPLER_LABELS[n] for n in ("euler", "euler_a", "heun", "dpm2", "dpm++2s_a", "dpm++2m", "lcm")} == {
        "Euler", "Euler a", "Heun", "DPM2", "DPM++ 2S a", "DPM++ 2M", "LCM"}
    names = [s["name"] for s in a1111.samplers_list()]
    assert len(names) == len(set(names)) == len(sdcore.pipeline.samplers.SAMPLERS)
    for entry in a1111.samplers_list():       # every listed name and alias is accepted back
        for text in [entry["name"], *entry["aliases"]]:
            assert a1111.resolve_sampler(text, None)[0] == a1111.resolve_sampler(entry["name"], None)[0]
    schedulers = a1111.schedulers_list()
    assert schedulers[0]["label"] == "Automatic"
    for entry in schedulers[1:]:
        assert a1111.resolve_sampler("Euler", entry["name"])[1] == a1111.resolve_sampler("Euler", entry["label"])[1]


def test_unknown_names_are_errors_in_a1111s_shape(two):
    _, client, stub, _ = two
    assert "Sampler not found" in a1111_error(client.post(T2I, json={"sampler_name": "UniPC"}), 400)
    assert "Scheduler not found" in a1111_error(client.post(T2I, json={"scheduler": "beta"}), 400)
    assert "Sampler not found" in a1111_error(client.post(T2I, json={"sampler_index": "DPM++ 2M Beta"}), 400)
    assert stub.calls == []


# --- txt2img ------------------------------------------------------------------------------------------
def test_txt2img_defaults_and_mapping(two):
    app, client, stub, models = two
    r = client.post(T2I, json={"prompt": "a cat"})
    assert r.status_code == 200, r.get_json()
    model, p = stub.calls[-1]
    assert model is models["first"]
    # A1111's API defaults: 50 steps, cfg 7, Euler, a random seed; the size is the model's native one
    assert (p.steps, p.cfg_scale, p.sample_method, p.scheduler, p.seed, p.n) == (50, 7.0, "euler", "discrete", -1, 1)
    assert (p.width, p.height, p.clip_skip, p.prompt, p.negative_prompt) == (512, 512, 1, "a cat", "")
    body = r.get_json()
    assert set(body) == {"images", "parameters", "info"} and isinstance(body["info"], str)
    assert body["parameters"]["seed"] == -1 and body["parameters"]["sampler_index"] == "Euler"   # as sent, as A1111
    Image.open(io.BytesIO(base64.b64decode(body["images"][0], validate=True))).verify()


def test_batches_seeds_and_info(two):
    _, client, stub, _ = two
    sent = {"prompt": "p", "negative_prompt": "n", "seed": 100, "batch_size": 2, "n_iter": 3, "steps": 4,
            "cfg_scale": 5.5, "width": 64, "height": 96, "sampler_name": "DPM++ 2M", "scheduler": "Exponential"}
    body = client.post(T2I, json=sent).get_json()
    p = stub.params
    assert (p.n, p.seed, p.width, p.height, p.steps, p.cfg_scale) == (6, 100, 64, 96, 4, 5.5)
    info = json.loads(body["info"])
    assert set(info) == A1111_INFO_KEYS
    assert info["all_seeds"] == [100, 101, 102, 103, 104, 105] and info["seed"] == 100
    assert (info["width"], info["height"], info["steps"], info["cfg_scale"], info["batch_size"]) == (64, 96, 4, 5.5, 2)
    assert info["sampler_name"] == "DPM++ 2M" and info["extra_generation_params"] == {"Schedule type": "Exponential"}
    assert info["all_prompts"] == ["p"] * 6 and info["negative_prompt"] == "n" and info["sd_model_name"] == "first"
    assert len(body["images"]) == len(info["infotexts"]) == 6
    assert re.fullmatch(r"\d{14}", info["job_timestamp"])


def test_send_and_save_images(two):
    app, client, _, _ = two
    body = client.post(T2I, json={"prompt": "p", "send_images": False, "save_images": True, "batch_size": 2,
                                  "width": 64, "height": 64}).get_json()
    assert body["images"] == [] and len(json.loads(body["info"])["all_seeds"]) == 2
    stored = client.get("/v1/files").get_json()["data"]
    assert len(stored) == 2 and all(f["filename"].endswith(".png") for f in stored)


def test_clip_skip_from_the_field_override_and_options(two):
    _, client, stub, _ = two
    client.post(T2I, json={"prompt": "p", "override_settings": {"CLIP_stop_at_last_layers": 2}})
    assert stub.params.clip_skip == 2
    client.post(T2I, json={"prompt": "p", "clip_skip": 3, "override_settings": {"CLIP_stop_at_last_layers": 2}})
    assert stub.params.clip_skip == 3
    assert client.post(OPT, json={"CLIP_stop_at_last_layers": 2}).status_code == 200
    client.post(T2I, json={"prompt": "p"})
    assert stub.params.clip_skip == 2
    assert validation_error(client.post(T2I, json={"prompt": "p", "clip_skip": 13})) == "clip_skip"


def test_null_fields_are_not_sent_and_unknown_fields_are_ignored(two):
    _, client, stub, _ = two
    r = client.post(T2I, json={"prompt": "p", "sampler_name": None, "seed": None, "steps": None, "url": "http://x",
                               "auth": "", "alwayson_scripts": {"ADetailer": {"args": []}}, "do_not_save_grid": False})
    assert r.status_code == 200
    assert (stub.params.sample_method, stub.params.seed, stub.params.steps) == ("euler", -1, 50)


# --- checkpoints and options --------------------------------------------------------------------------
def test_sd_models_hash_the_files_as_a1111(two, files):
    _, client, _, _ = two
    listed = client.get("/sdapi/v1/sd-models").get_json()
    for entry, (name, path) in zip(listed, files.items()):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        assert entry == {"title": f"{name} [{digest[:10]}]", "model_name": name, "hash": digest[:10],
                         "sha256": digest, "filename": str(path), "config": None}


def test_options_select_the_checkpoint_for_every_worker(two, tmp_path):
    app, client, stub, models = two
    opts = client.get(OPT).get_json()
    assert opts["sd_model_checkpoint"].startswith("first [") and "forge_preset" not in opts
    second = client.get("/sdapi/v1/sd-models").get_json()[1]
    # Open WebUI posts the whole object back with the checkpoint changed; unknown keys are kept
    assert client.post(OPT, json={**opts, "sd_model_checkpoint": second["title"], "my_key": [1]}).get_json() is None
    client.post(T2I, json={"prompt": "p"})
    assert stub.calls[-1][0] is models["second"]
    # another worker (another app on the same data dir) sees the choice
    other, _ = make_app(tmp_path, model=models)
    again = other.test_client().get(OPT).get_json()
    assert again["sd_model_checkpoint"] == second["title"] and again["my_key"] == [1]
    for name in ("first", second["hash"], second["sha256"], "second.safetensors", second["filename"]):
        assert client.post(OPT, json={"sd_model_checkpoint": name}).status_code == 200, name
    # a request may pick its own checkpoint
    client.post(T2I, json={"prompt": "p", "override_settings": {"sd_model_checkpoint": "first"}})
    assert stub.calls[-1][0] is models["first"]


def test_unknown_checkpoint_changes_nothing(two):
    _, client, stub, _ = two
    before = client.get(OPT).get_json()
    assert "Checkpoint not found" in a1111_error(client.post(OPT, json={"sd_model_checkpoint": "sdxl.safetensors"}), 400)
    assert a1111_error(client.post(OPT, json={"sd_model_checkpoint": 7}), 400)
    assert validation_error(client.post(OPT, json={"CLIP_stop_at_last_layers": "2"})) == "CLIP_stop_at_last_layers"
    assert client.get(OPT).get_json() == before
    assert validation_error(client.post(T2I, json={"prompt": "p", "override_settings": {
        "sd_model_checkpoint": "nope"}})) == "override_settings"
    assert stub.calls == []


def test_stable_diffusion_cpp_model_field(two):
    _, client, stub, models = two
    client.post(T2I, json={"prompt": "p", "model": "second"})
    assert stub.calls[-1][0] is models["second"]
    client.post(T2I, json={"prompt": "p", "model": "some-other-name"})     # as the OpenAI routes: the default
    assert stub.calls[-1][0] is models["first"]


def test_listings_clients_read(two):
    _, client, _, _ = two
    for path, kind in (("samplers", list), ("schedulers", list), ("upscalers", list), ("latent-upscale-modes", list),
                       ("sd-vae", list), ("loras", list), ("prompt-styles", list), ("embeddings", dict),
                       ("cmd-flags", dict)):
        r = client.get(f"/sdapi/v1/{path}")
        assert r.status_code == 200 and isinstance(r.get_json(), kind), path
    prog = client.get("/sdapi/v1/progress").get_json()
    assert prog["progress"] == 0 and prog["state"]["job_count"] == 0
    assert client.post("/sdapi/v1/interrupt").status_code == 200
    assert client.post("/sdapi/v1/refresh-checkpoints").status_code == 200


# --- auth -----------------------------------------------------------------------------------------------
def basic(user_pass: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(user_pass.encode()).decode()}


def test_http_basic_and_bearer(tmp_path):
    app, _ = make_app(tmp_path, api_key="KEY", api_auth="alice:s3cret:x,bob:pw")
    client = app.test_client()
    for headers in (basic("alice:s3cret:x"), basic("bob:pw"), basic("anyone:KEY"), {"Authorization": "Bearer KEY"},
                    {"authorization": "basic " + base64.b64encode(b"bob:pw").decode()}):
        assert client.get(OPT, headers=headers).status_code == 200, headers
        assert client.get("/v1/models", headers=headers).status_code == 200, headers
    for headers in ({}, basic("alice:wrong"), basic("bob:"), basic("KEY"), {"Authorization": "Basic !!!"},
                    {"Authorization": "Bearer pw"}, {"Authorization": "Basic "}):
        r = client.get(OPT, headers=headers)
        assert a1111_error(r, 401) and r.headers["WWW-Authenticate"].startswith("Basic"), headers
        assert error_of(client.get("/v1/models", headers=headers), 401)["type"] == "authentication_error"
    assert client.get("/health").status_code == 200


def test_basic_pairs_without_a_key(tmp_path):
    app, _ = make_app(tmp_path, api_auth="u:p")
    client = app.test_client()
    assert client.post(T2I, json={"prompt": "p"}, headers=basic("u:p")).status_code == 200
    assert client.post(T2I, json={"prompt": "p"}, headers={"Authorization": "Bearer p"}).status_code == 401
    with pytest.raises(ConfigError):
        Settings.from_mapping({"api_auth": "no-colon"})


# --- bad input ------------------------------------------------------------------------------------------
WRONG_TYPES = [("prompt", 3), ("negative_prompt", ["x"]), ("seed", "1"), ("seed", 1.5), ("steps", "20"), ("steps", True),
               ("cfg_scale", "7"), ("width", 64.0), ("height", "64"), ("batch_size", "2"), ("n_iter", []),
               ("sampler_name", 1), ("sampler_index", {}), ("scheduler", 2), ("clip_skip", "2"),
               ("override_settings", "x"), ("send_images", "yes"), ("save_images", 2), ("model", 5)]


@pytest.mark.parametrize("field, value", WRONG_TYPES)
def test_wrong_types_are_422_naming_the_field(two, field, value):
    _, client, stub, _ = two
    assert validation_error(client.post(T2I, json={"prompt": "p", field: value})) == field
    assert stub.calls == []


@pytest.mark.parametrize("field, value", [
    ("init_images", "abc"), ("init_images", []), ("init_images", [3]), ("init_images", [None]), ("mask", ""),
    ("init_images", ["bm90IGFuIGltYWdl"]),
    ("init_images", ["%%%"]), ("denoising_strength", 1.5), ("denoising_strength", "0.5"), ("mask", 3),
    ("mask", "bm90IGFuIGltYWdl"), ("mask_blur", -1), ("mask_blur", 1000), ("inpainting_fill", 4),
    ("inpainting_mask_invert", "no"), ("resize_mode", 7)])
def test_img2img_bad_fields(two, field, value):
    _, client, stub, _ = two
    body = {"prompt": "p", "init_images": [b64png()], field: value}
    assert validation_error(client.post(I2I, json=body)) == field
    assert stub.calls == []


def test_bad_bodies(two, tmp_path):
    app, client, stub, _ = two
    client.post(T2I, json={"prompt": "kept", "save_images": True, "width": 64, "height": 64})
    kept = client.get("/v1/files").get_json()["data"]
    huge = validation_error(client.post(T2I, json={"prompt": "p", "batch_size": 6, "n_iter": 6}))
    assert huge == "batch_size"
    assert validation_error(client.post(T2I, json={"prompt": "p", "batch_size": 10 ** 9, "n_iter": 10 ** 9}))
    assert validation_error(client.post(I2I, json={"prompt": "p"})) == "init_images"
    assert a1111_error(client.post(T2I, data="{not json", content_type="application/json"), 400)
    assert a1111_error(client.post(T2I, json=[1, 2]), 400)
    assert a1111_error(client.post(T2I, data="prompt=p", content_type="application/x-www-form-urlencoded"), 415)
    assert a1111_error(client.get("/sdapi/v1/nothing-here"), 404)
    assert a1111_error(client.get(T2I), 405)
    assert len(stub.calls) == 1
    assert client.get("/v1/files").get_json()["data"] == kept            # nothing stored was lost


# --- img2img ------------------------------------------------------------------------------------------
def test_img2img_mapping(two):
    _, client, stub, _ = two
    mask = Image.new("L", (32, 16), 0)
    mask.paste(255, (0, 0, 16, 16))                                       # left half white: repaint
    buf = io.BytesIO()
    mask.save(buf, "PNG")
    body = {"prompt": "p", "init_images": [b64png((32, 16)), b64png((40, 40))], "width": 64, "height": 64,
            "mask": base64.b64encode(buf.getvalue()).decode(), "mask_blur": 0, "inpainting_fill": 1,
            "denoising_strength": 0.4, "resize_mode": 0}
    info = json.loads(client.post(I2I, json=body).get_json()["info"])
    p = stub.params
    assert p.init_image.size == (64, 64) and p.strength == 0.4 and p.inpaint_fill == "original"
    assert info["denoising_strength"] == 0.4
    m = p.mask.convert("L")
    assert m.getpixel((5, 30)) == 255 and m.getpixel((60, 30)) == 0        # stretched (resize mode 0)
    body.update(inpainting_mask_invert=1, inpainting_fill=3)
    client.post(I2I, json=body)
    assert stub.params.mask.convert("L").getpixel((5, 30)) == 0 and stub.params.inpaint_fill == "latent_nothing"


def test_resize_modes():
    im = Image.new("RGB", (40, 20), (10, 20, 30))
    im.paste((250, 0, 0), (0, 0, 1, 20))                                   # a red left column
    stretched, cropped, filled = (a1111.resize(im, mode, 40, 40) for mode in (0, 1, 2))
    assert stretched.size == cropped.size == filled.size == (40, 40)
    assert stretched.getpixel((0, 35))[0] > 200                           # stretched: the column reaches the bottom
    assert cropped.getpixel((0, 20))[0] < 100                              # cropped to cover: the column is cut off
    assert filled.getpixel((20, 2)) == filled.getpixel((20, 12)) == (10, 20, 30)   # bands: stretched edge rows


def test_a1111_mask_rules():
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    rgba.paste((0, 0, 0, 255), (0, 0, 4, 8))                               # opaque left half
    m = a1111.a1111_mask(rgba, invert=False, blur=0)
    assert m.getpixel((1, 1)) == 255 and m.getpixel((6, 1)) == 0          # with alpha: opaque repaints
    assert a1111.a1111_mask(rgba, invert=True, blur=0).getpixel((1, 1)) == 0
    blurred = a1111.a1111_mask(Image.new("L", (32, 8), 0).convert("RGB"), invert=True, blur=4)
    assert blurred.getpixel((16, 4)) == 255


# --- the same pixels through both doors ----------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(default_model_path):
    return sdcore.load_model(default_model_path, device="cpu", dtype=torch.float32)


@pytest.mark.parametrize("openai, a1111_fields", [
    ({"sample_method": "dpm++2m", "scheduler": "karras"}, {"sampler_index": "DPM++ 2M Karras"}),
    ({"sample_method": "euler_a", "scheduler": "discrete"}, {"sampler_name": "Euler a", "scheduler": "Automatic"}),
    ({"sample_method": "heun", "scheduler": "exponential"}, {"sampler_name": "Heun", "scheduler": "exponential"}),
])
def test_same_pixels_through_both_doors(tmp_path, tiny, openai, a1111_fields):
    from app import create_app
    client = create_app({"data_dir": str(tmp_path / "d"), "api_key": None}, model=tiny).test_client()
    common = {"prompt": "a red circle", "negative_prompt": "blue", "steps": 3, "cfg_scale": 6.0, "seed": 77}
    ours = client.post("/v1/images/generations", json={**common, **openai, "n": 2, "size": "64x72",
                                                       "response_format": "b64_json"}).get_json()
    theirs = client.post(T2I, json={**common, **a1111_fields, "batch_size": 2, "width": 64, "height": 72}).get_json()
    for item, b64 in zip(ours["data"], theirs["images"]):
        a = Image.open(io.BytesIO(base64.b64decode(item["b64_json"])))
        b = Image.open(io.BytesIO(base64.b64decode(b64)))
        assert a.size == (64, 72) and a.tobytes() == b.tobytes()
        assert a.text["parameters"] == b.text["parameters"]
    assert json.loads(theirs["info"])["all_seeds"] == [item["seed"] for item in ours["data"]] == [77, 78]
