"""Three real chat front-ends, replayed against a real gunicorn (the tiny default model, no API key):
each test sends the exact request shapes a client sends, with its headers, and reads the response the
way that client's code reads it. The shapes come from the clients' sources, at these commits:

- Open WebUI, ``backend/open_webui/routers/images.py`` at open-webui/open-webui@02530d501461ce58ab06231d7c2ef2024a141ddf
  (OpenAI engine, image edit, AUTOMATIC1111 engine; its older ~0.5/0.6 router adds cfg_scale/sampler_name/scheduler);
- SillyTavern, ``public/scripts/extensions/stable-diffusion/index.js`` (the front end builds the payload) and
  ``src/endpoints/stable-diffusion.js`` (the server-side proxy that talks to us) at
  SillyTavern/SillyTavern@691f0ce604ea496a0ec428c5507d41257d482fe1 (1.18.0): the "sdcpp" and "auto" sources;
- LibreChat, ``api/app/clients/tools/structured/StableDiffusion.js`` at
  danny-avila/LibreChat@7cacd8a44034967122985bda64e6f81ad201f63e, ``OpenAIImageTools.js`` at
  @8731432f64aaaf70633b0a60922ee8182baa630d and ``DALLE3.js`` at @37d31ec25f2aac6a4e9a4eb3fc05e3c824250861.

Sizes are scaled down for CI time: the clients ask for 512x512 (SillyTavern, Open WebUI) or 1024x1024
(LibreChat, DALL-E 3); here they ask for the tiny model's native 64x64 (on 2 CPU cores one 1024x1024
image takes over 30 s at a single step; 64x64 at 22 steps about 1.5 s). Steps, samplers, guidance and
every other field are sent as the clients send them.

The server serves the tiny model twice (``tiny-sd1``, the default, and ``tiny-alt``) so that the clients'
model switches (Open WebUI's and SillyTavern's POST /sdapi/v1/options, stable-diffusion.cpp's ``model``
field) change something that can be checked."""
import base64
import io
import json
import time

import pytest
import requests
from openai import OpenAI
from PIL import Image

from bench.harness import WEIGHTS, server_fixture

DEFAULT, ALT = "tiny-sd1", "tiny-alt"
SIZE = 64                           # the tiny model's native size; the clients' 512/1024, scaled down
TIMEOUT = 120
PROMPT = "a lighthouse on a cliff at dusk, oil painting"
NEGATIVE = "blurry, lowres"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # API_KEY="": no key, as an operator runs it behind these clients (LibreChat's SD tool and SillyTavern's
    # sdcpp source send no Authorization header at all)
    srv = server_fixture(tmp_path_factory, "clients", API_KEY="",
                         SD_MODEL=f"{DEFAULT}={WEIGHTS},{ALT}={WEIGHTS}")
    try:
        yield srv
    finally:
        srv.stop()


# --- reading images as the clients do ------------------------------------------------------------------
def decode_image(data: bytes, fmt: str, size=(SIZE, SIZE)) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    assert im.format == fmt and im.size == size, (im.format, im.size)
    return im


def raw_b64_png(text: str, size=(SIZE, SIZE)) -> Image.Image:
    """A raw base64 PNG (no ``data:`` prefix): SillyTavern saves it as a .png, Open WebUI's get_image_data
    takes a string without a comma as image/png."""
    assert isinstance(text, str) and "," not in text and not text.startswith("data:"), text[:40]
    data = base64.b64decode(text, validate=True)
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    return decode_image(data, "PNG", size)


def owui_image_bytes(item: dict, headers: dict, base: str) -> tuple[bytes, str]:
    """Open WebUI's loop over ``res['data']``: ``url`` first (fetched with the same headers, its content-type
    must start with ``image``), else ``b64_json`` (no comma: image/png)."""
    if url := item.get("url", None):
        r = requests.get(url, headers=headers, timeout=TIMEOUT)
        r.raise_for_status()
        assert r.headers["content-type"].startswith("image")
        return r.content, r.headers["content-type"]
    b64 = item["b64_json"]
    assert "," not in b64
    return base64.b64decode(b64, validate=True), "image/png"


def png_file(color, size=(SIZE, SIZE), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, fmt)
    return buf.getvalue()


def a1111_titles(base: str, headers: dict) -> dict:
    """model_name -> title, from GET /sdapi/v1/sd-models."""
    r = requests.get(base + "/sdapi/v1/sd-models", headers=headers, timeout=TIMEOUT)
    assert r.status_code == 200
    return {m["model_name"]: m["title"] for m in r.json()}


# --- 1. Open WebUI, OpenAI engine ---------------------------------------------------------------------
def test_open_webui_openai_generations(server):
    """routers/images.py: ``Authorization: Bearer <IMAGES_OPENAI_API_KEY>``; model IMAGE_GENERATION_MODEL or
    'dall-e-2'; ``response_format: b64_json`` unless the model matches IMAGE_URL_RESPONSE_MODELS_REGEX_PATTERN
    (``^gpt-image``); the reply is read url first, else b64_json."""
    headers = {"Authorization": "Bearer sk-anything", "Content-Type": "application/json"}
    url = f"{server.base}/v1/images/generations"
    body = {"model": "dall-e-2", "prompt": PROMPT, "n": 1, "size": f"{SIZE}x{SIZE}", "response_format": "b64_json"}
    r = requests.post(url, data=json.dumps(body), headers=headers, timeout=TIMEOUT)
    r.raise_for_status()
    res = r.json()
    assert len(res["data"]) == 1 and "url" not in res["data"][0]
    fetch_headers = {k: v for k, v in headers.items() if k != "Content-Type"}
    data, ctype = owui_image_bytes(res["data"][0], fetch_headers, server.base)
    assert ctype == "image/png"
    decode_image(data, "PNG")

    # gpt-image-*: no response_format; size "auto" (IMAGE_AUTO_SIZE_MODELS_REGEX_PATTERN); every item b64_json
    body = {"model": "gpt-image-1", "prompt": PROMPT, "n": 2, "size": "auto"}
    r = requests.post(url, data=json.dumps(body), headers=headers, timeout=TIMEOUT)
    r.raise_for_status()
    res = r.json()
    assert len(res["data"]) == 2
    for item in res["data"]:
        assert "url" not in item and item["b64_json"]
        data, _ = owui_image_bytes(item, fetch_headers, server.base)
        decode_image(data, "PNG")           # "auto": the model's own size
    assert res["size"] == f"{SIZE}x{SIZE}"
    assert res["data"][0]["b64_json"] != res["data"][1]["b64_json"]


def test_open_webui_openai_edit(server):
    """routers/images.py image edit: multipart, the form's strings (model, prompt, n, size, response_format)
    then several images as repeated ``image[]`` files named ``<uuid4>.<ext>`` with the data URL's mime."""
    files = [("model", (None, "dall-e-2")), ("prompt", (None, PROMPT)), ("n", (None, "1")),
             ("size", (None, f"{SIZE}x{SIZE}")), ("response_format", (None, "b64_json")),
             ("image[]", ("0b4c1f6e-5d2a-4c1e-9f3b-7a8d6e5c4b3a.png", png_file((200, 40, 40)), "image/png")),
             ("image[]", ("9e8d7c6b-5a4f-4e3d-8c2b-1a0f9e8d7c6b.webp", png_file((40, 40, 200), fmt="WEBP"),
                          "image/webp"))]
    r = requests.post(f"{server.base}/v1/images/edits", files=files,
                      headers={"Authorization": "Bearer sk-anything"}, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    res = r.json()
    assert len(res["data"]) == 1 and "url" not in res["data"][0]
    data, _ = owui_image_bytes(res["data"][0], {"Authorization": "Bearer sk-anything"}, server.base)
    decode_image(data, "PNG")


# --- 2. Open WebUI, AUTOMATIC1111 engine --------------------------------------------------------------
def test_open_webui_automatic1111(server):
    """routers/images.py, AUTOMATIC1111 engine: every call carries the lower-case header
    ``authorization: Basic `` (AUTOMATIC1111_API_AUTH empty, its default); set-model POSTs back the whole
    options object it just read; txt2img reads ``res['images']`` and ``res['info']`` (no raise_for_status)."""
    auth = {"authorization": "Basic "}
    base = server.base
    # get_automatic1111_api_auth() answers '' when the setting is None: that header must pass too
    r = requests.get(base + "/sdapi/v1/options", headers={"authorization": ""}, timeout=TIMEOUT)
    assert r.status_code == 200 and "sd_model_checkpoint" in r.json()
    # get_image_model(): GET /sdapi/v1/options -> options['sd_model_checkpoint']
    r = requests.get(base + "/sdapi/v1/options", headers=auth, timeout=TIMEOUT)
    assert r.status_code == 200
    options = r.json()
    models = [{"id": m["title"], "name": m["model_name"]}
              for m in requests.get(base + "/sdapi/v1/sd-models", headers=auth, timeout=TIMEOUT).json()]
    assert sorted(m["name"] for m in models) == [ALT, DEFAULT]
    titles = {m["name"]: m["id"] for m in models}
    assert options["sd_model_checkpoint"] in titles.values()
    try:
        # set model: the whole GET payload, only sd_model_checkpoint replaced
        model = titles[ALT]
        if model != options["sd_model_checkpoint"]:
            options["sd_model_checkpoint"] = model
            r = requests.post(base + "/sdapi/v1/options", json=options, headers=auth, timeout=TIMEOUT)
            assert 200 <= r.status_code < 300, r.text
        r = requests.get(base + "/sdapi/v1/options", headers=auth, timeout=TIMEOUT)
        assert r.json()["sd_model_checkpoint"] == titles[ALT]

        # txt2img as the older router sends it (AUTOMATIC1111_CFG_SCALE/SAMPLER/SCHEDULER set); IMAGE_STEPS 50
        data = {"prompt": PROMPT, "batch_size": 1, "width": SIZE, "height": SIZE, "steps": 50,
                "negative_prompt": NEGATIVE, "cfg_scale": 6.5, "sampler_name": "Euler a", "scheduler": "Karras"}
        r = requests.post(base + "/sdapi/v1/txt2img", json=data, headers=auth, timeout=TIMEOUT)
        res = r.json()
        assert len(res["images"]) == 1
        for image in res["images"]:
            raw_b64_png(image)
        assert isinstance(res["info"], str)           # stored as opaque metadata
        info = json.loads(res["info"])
        assert info["sd_model_name"] == ALT and info["steps"] == 50 and info["cfg_scale"] == 6.5
        assert "Sampler: Euler a, Schedule type: Karras" in info["infotexts"][0]
    finally:
        requests.post(base + "/sdapi/v1/options", json={"sd_model_checkpoint": titles[DEFAULT]}, headers=auth,
                      timeout=TIMEOUT).raise_for_status()


# --- 3. SillyTavern, "sdcpp" source (stable-diffusion.cpp server) ----------------------------------------
def test_sillytavern_sdcpp(server):
    """src/endpoints/stable-diffusion.js, sdcpp routes (node-fetch, no auth, no Origin): ping is a plain
    ``OPTIONS {url}/v1/images/generations`` that must be ok; models are ``GET {url}/v1/models`` read as
    ``data.data[].id``; generate posts to /sdapi/v1/txt2img the proxy's payload with undefined/null/''
    values deleted (no seed at -1, clip_skip only when > 1); the front end reads ``data.images?.[0]``."""
    base = server.base
    r = requests.options(base + "/v1/images/generations", timeout=TIMEOUT)
    assert r.ok, r.status_code
    r = requests.get(base + "/v1/models", timeout=TIMEOUT)
    assert r.ok
    ids = [m["id"] for m in r.json()["data"]]
    assert sorted(ids) == [ALT, DEFAULT]
    # sampler and scheduler are the front end's hard-coded stable-diffusion.cpp names
    payload = {"model": ALT, "prompt": PROMPT, "negative_prompt": NEGATIVE, "width": SIZE, "height": SIZE,
               "steps": 20, "cfg_scale": 7, "batch_size": 1, "sampler_name": "euler_a", "scheduler": "karras",
               "clip_skip": 2}
    r = requests.post(base + "/sdapi/v1/txt2img", data=json.dumps(payload),
                      headers={"Content-Type": "application/json"}, timeout=TIMEOUT)
    assert r.ok, r.text
    data = r.json()
    im = raw_b64_png(data["images"][0])
    info = json.loads(data["info"])
    assert info["sd_model_name"] == ALT and info["clip_skip"] == 2
    assert im.text["parameters"] == info["infotexts"][0]
    last = info["infotexts"][0].split("\n")[-1]
    assert "Steps: 20, Sampler: Euler a, Schedule type: Karras, CFG scale: 7" in last and "Clip skip: 2" in last


# index.js loadSdcppSamplers()/loadSdcppSchedulers(): "The sdcpp server does not provide an API for samplers,
# so we return the known list." The names this server does not implement are refused (docs/api.md: an
# unknown sampler or schedule is a 400 that lists what there is, never a silent fallback).
SDCPP_SAMPLERS = ["euler", "euler_a", "heun", "dpm2", "dpm++2s_a", "dpm++2m", "dpm++2mv2", "ipndm", "ipndm_v", "lcm",
                  "ddim_trailing", "tcd"]
SDCPP_SCHEDULERS = ["discrete", "karras", "exponential", "ays", "gits", "smoothstep", "sgm_uniform", "simple",
                    "kl_optimal", "lcm"]
NOT_SERVED = {"ddim_trailing", "tcd", "ays", "gits", "smoothstep", "sgm_uniform", "simple", "kl_optimal"}


def test_sillytavern_sdcpp_listed_names(server):
    """Every name of the sdcpp source's hard-coded lists, and its defaults: the settings keep 'DDIM' and
    'normal' (defaultSettings) when the source is switched to sdcpp, as neither is emptied by loadSamplers()."""
    def post(sampler, scheduler):
        payload = {"prompt": PROMPT, "steps": 2, "cfg_scale": 7, "width": SIZE, "height": SIZE, "batch_size": 1,
                   "sampler_name": sampler, "scheduler": scheduler}
        return requests.post(server.base + "/sdapi/v1/txt2img", json=payload, timeout=TIMEOUT)

    r = post("DDIM", "normal")
    assert r.status_code == 200, r.text
    raw_b64_png(r.json()["images"][0])
    refused = []
    for sampler, scheduler in [(s, "discrete") for s in SDCPP_SAMPLERS] + [("euler", s) for s in SDCPP_SCHEDULERS]:
        r = post(sampler, scheduler)
        if r.status_code == 200:
            raw_b64_png(r.json()["images"][0])
            continue
        assert r.status_code == 400 and repr(sampler if sampler in NOT_SERVED else scheduler) in r.json()["detail"]
        refused.append(sampler if sampler in NOT_SERVED else scheduler)
    assert set(refused) == NOT_SERVED


# --- 4. SillyTavern, "auto" source (AUTOMATIC1111 / Forge) ----------------------------------------------
def st_auth(auth: str = "") -> dict:
    """src/util.js getBasicAuthHeader: ``Basic ${Buffer.from(`${auth}`).toString('base64')}``."""
    return {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()}


def test_sillytavern_auto(server):
    """src/endpoints/stable-diffusion.js, the routes under /api/sd (url.pathname replaced, Basic auth from
    the ``auto_auth`` setting, '' by default); front end generateAutoImage() for the body."""
    base, auth = server.base, st_auth("")
    assert auth == {"Authorization": "Basic "}
    # /ping: result.ok only
    assert requests.get(base + "/sdapi/v1/options", headers=auth, timeout=TIMEOUT).ok
    # /models: value and text are the title
    r = requests.get(base + "/sdapi/v1/sd-models", headers=auth, timeout=TIMEOUT)
    assert r.ok
    values = [x["title"] for x in r.json()]
    titles = a1111_titles(base, auth)
    assert sorted(values) == sorted(titles.values())
    # /samplers, /schedulers: [].name; the defaults DDIM and normal must be among what the server takes
    samplers = [x["name"] for x in requests.get(base + "/sdapi/v1/samplers", headers=auth, timeout=TIMEOUT).json()]
    schedulers = [x["name"] for x in requests.get(base + "/sdapi/v1/schedulers", headers=auth, timeout=TIMEOUT).json()]
    assert "Euler a" in samplers and "DPM++ 2M" in samplers
    assert "karras" in schedulers and "automatic" in schedulers
    # /upscalers: both lookups must be ok, then [].name of each
    up = requests.get(base + "/sdapi/v1/upscalers", headers=auth, timeout=TIMEOUT)
    latent = requests.get(base + "/sdapi/v1/latent-upscale-modes", headers=auth, timeout=TIMEOUT)
    assert up.ok and latent.ok
    assert [x["name"] for x in up.json()] + [x["name"] for x in latent.json()] == ["None"]
    # /vaes: sd-vae (A1111) and sd-modules (Forge), the first ok wins, read as [].model_name
    vae = requests.get(base + "/sdapi/v1/sd-vae", headers=auth, timeout=TIMEOUT)
    assert vae.status_code == 200 and [x["model_name"] for x in vae.json()] == []

    # /set-model: POST {sd_model_checkpoint}, then poll progress (at most 10 times) until idle
    r = requests.post(base + "/sdapi/v1/options", json={"sd_model_checkpoint": titles[DEFAULT]},
                      headers={"Content-Type": "application/json", **auth}, timeout=TIMEOUT)
    assert r.ok, r.text
    for _ in range(10):
        progress_state = requests.get(base + "/sdapi/v1/progress", headers=auth, timeout=TIMEOUT).json()
        progress, job_count = progress_state["progress"], progress_state["state"]["job_count"]
        if progress == 0.0 and job_count == 0:
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"progress never idle: {progress_state}")
    # /get-model: data.sd_model_checkpoint preselects the model
    options = requests.get(base + "/sdapi/v1/options", headers=auth, timeout=TIMEOUT).json()
    assert options["sd_model_checkpoint"] == titles[DEFAULT]

    # /generate: the proxy first reads the options to tell Forge apart
    assert "forge_preset" not in options          # not Forge: 1.18's proxy unsets forge_additional_modules;
    # it is kept here (earlier proxies forwarded it, and it is what a Forge-bound body holds) to show the
    # server ignores it. The body is the front end's, url and auth included (the proxy forwards request.body);
    # defaults from index.js defaultSettings, the VAE as picked on a Forge server, ADetailer on.
    payload = {"url": base, "auth": "", "prompt": PROMPT, "negative_prompt": NEGATIVE,
               "sampler_name": "DDIM", "scheduler": "normal", "steps": 20, "cfg_scale": 7, "width": SIZE,
               "height": SIZE, "restore_faces": False, "enable_hr": False, "hr_upscaler": "Latent", "hr_scale": 1.0,
               "hr_additional_modules": [], "denoising_strength": 0.7, "hr_second_pass_steps": 0,
               "override_settings": {"CLIP_stop_at_last_layers": 1, "sd_vae": "ae.safetensors",
                                     "forge_additional_modules": ["ae.safetensors"]},
               "override_settings_restore_afterwards": True, "clip_skip": 1, "save_images": True,
               "send_images": True, "do_not_save_grid": False, "do_not_save_samples": False,
               "alwayson_scripts": {"ADetailer": {"args": [True, True, {"ad_model": "face_yolov8n.pt"}]}}}
    r = requests.post(base + "/sdapi/v1/txt2img", data=json.dumps(payload),
                      headers={"Content-Type": "application/json", **st_auth(payload["auth"])}, timeout=TIMEOUT)
    assert r.ok, r.text
    data = r.json()
    raw_b64_png(data["images"][0])                # saveBase64AsFile(data, ..., 'png')
    info = json.loads(data["info"])
    assert info["sd_model_name"] == DEFAULT and info["sampler_name"] == "Euler"      # DDIM is served as Euler
    assert "Schedule type: Uniform" in info["infotexts"][0]
    # save_images: true also stored the PNG
    files = requests.get(base + "/v1/files", timeout=TIMEOUT).json()["data"]
    assert f"image-{info['seed']}.png" in [f["filename"] for f in files]


# --- 5. LibreChat, StableDiffusion tool ---------------------------------------------------------------
def librechat_sd_read(data: dict) -> tuple[bytes, dict]:
    """StableDiffusion.js: ``info = JSON.parse(data.info)``; ``Buffer.from(image.split(',', 1)[0], 'base64')``
    (the text before the first comma); uploadImageBuffer reads info.width/height, the metadata info.seed and
    the last line of info.infotexts[0]."""
    image = data["images"][0]
    buffer = base64.b64decode(image.split(",", 1)[0], validate=True)
    info = json.loads(data["info"])
    return buffer, info


@pytest.mark.parametrize("variant", ["sampler_index", "newer"])
def test_librechat_stable_diffusion(server, variant):
    """No auth header; axios.post(`${url}/sdapi/v1/txt2img`, payload). The newer (agent-capable) tool drops
    sampler_index. 1024x1024 in the tool, 64x64 here."""
    payload = {"prompt": PROMPT, "negative_prompt": NEGATIVE, "sampler_index": "DPM++ 2M Karras", "cfg_scale": 4.5,
               "steps": 22, "width": SIZE, "height": SIZE}
    if variant == "newer":
        del payload["sampler_index"]
    r = requests.post(server.base + "/sdapi/v1/txt2img", json=payload, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    buffer, info = librechat_sd_read(r.json())
    im = decode_image(buffer, "PNG", (info["width"], info["height"]))
    assert (info["width"], info["height"]) == (SIZE, SIZE)
    assert isinstance(info["seed"], int) and info["seed"] >= 0
    infotext = info["infotexts"][0]
    assert infotext and im.text["parameters"] == infotext
    generation_info = infotext.split("\n").pop()
    sampler = "Sampler: DPM++ 2M, Schedule type: Karras" if variant == "sampler_index" else "Sampler: Euler,"
    assert sampler in generation_info, generation_info
    assert "Steps: 22" in generation_info and "CFG scale: 4.5" in generation_info
    assert f"Seed: {info['seed']}" in generation_info and f"Size: {SIZE}x{SIZE}" in generation_info
    assert infotext.startswith(PROMPT + "\nNegative prompt: " + NEGATIVE + "\n")

    if variant == "sampler_index":
        # the 2023 tool: POST /sdapi/v1/png-info {image: data URL} and reads response2.data.info
        r = requests.post(server.base + "/sdapi/v1/png-info",
                          json={"image": "data:image/png;base64," + base64.b64encode(buffer).decode()}, timeout=TIMEOUT)
        assert r.status_code == 200, r.text
        assert r.json()["info"] == infotext


# --- 6. LibreChat, OpenAI image tools ---------------------------------------------------------------------
def test_librechat_gpt_image_generate(server):
    """OpenAIImageTools.js: openai.images.generate({model, prompt, n, background, output_format,
    output_compression (webp/jpeg only), quality, size}), no response_format; reads resp.data[0].b64_json only,
    shown as ``data:image/${output_format};base64,...``."""
    body = {"model": "gpt-image-1", "prompt": PROMPT, "n": 1, "background": "auto", "output_format": "webp",
            "output_compression": 80, "quality": "auto", "size": "auto"}
    r = requests.post(server.base + "/v1/images/generations", json=body,
                      headers={"Authorization": "Bearer sk-librechat"}, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    res = r.json()
    base64_image = res["data"][0]["b64_json"]
    decode_image(base64.b64decode(base64_image, validate=True), "WEBP")
    assert res["output_format"] == "webp"


def test_librechat_gpt_image_edit(server):
    """OpenAIImageTools.js edit: axios + form-data: model, prompt, quality ('auto'), size ('auto'), then one
    ``image[]`` per referenced image; no n, no response_format; reads response.data.data[0].b64_json."""
    files = [("model", (None, "gpt-image-1")), ("prompt", (None, PROMPT)), ("quality", (None, "auto")),
             ("size", (None, "auto")),
             ("image[]", ("img-1.png", png_file((30, 160, 30)), "image/png")),
             ("image[]", ("img-2.jpg", png_file((160, 160, 30), fmt="JPEG"), "image/jpeg"))]
    r = requests.post(server.base + "/v1/images/edits", files=files,
                      headers={"Authorization": "Bearer sk-librechat"}, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    base64_image = r.json()["data"][0]["b64_json"]
    decode_image(base64.b64decode(base64_image, validate=True), "PNG")


def test_librechat_dalle3(server):
    """DALLE3.js: images.generate({model: 'dall-e-3', quality, style, size, prompt, n: 1}), no response_format;
    reads resp.data[0].url only, saves it as img-<uuid><extname of the URL's basename> after a plain GET
    (inferred: processFileURL downloads it without the API key). 1024x1024 in the tool, 64x64 here."""
    body = {"model": "dall-e-3", "quality": "standard", "style": "vivid", "size": f"{SIZE}x{SIZE}",
            "prompt": PROMPT, "n": 1}
    r = requests.post(server.base + "/v1/images/generations", json=body,
                      headers={"Authorization": "Bearer sk-librechat"}, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    item = r.json()["data"][0]
    the_image_url = item["url"]
    assert "b64_json" not in item
    assert the_image_url.startswith(server.base + "/") and the_image_url.endswith(".png")
    assert item["revised_prompt"] == PROMPT
    download = requests.get(the_image_url, timeout=TIMEOUT)
    assert download.status_code == 200 and download.headers["content-type"] == "image/png"
    decode_image(download.content, "PNG")


# --- 7. the official openai client, as LibreChat's gpt-image tool drives it ------------------------------
def test_openai_client_gpt_image(server):
    client = OpenAI(base_url=f"{server.base}/v1", api_key="sk-anything", max_retries=0, timeout=TIMEOUT)
    resp = client.images.generate(model="gpt-image-1", prompt=PROMPT, size="auto", quality="auto",
                                  background="auto", output_format="png")
    assert len(resp.data) == 1 and resp.data[0].url is None
    decode_image(base64.b64decode(resp.data[0].b64_json, validate=True), "PNG")
    assert (resp.output_format, resp.size, resp.quality, resp.background) == ("png", f"{SIZE}x{SIZE}", "auto", "opaque")
