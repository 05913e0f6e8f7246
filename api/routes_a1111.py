"""AUTOMATIC1111's API (``/sdapi/v1``), the subset its clients call: thin views over ``api/a1111.py``. The
images come from the same queue and pipeline as the OpenAI routes': the same settings give the same pixels
through either door."""
from __future__ import annotations

import base64
import json
from importlib import metadata

from flask import Blueprint, g, jsonify, request

from . import a1111
from .disconnect import client_gone_probe
from .errors import SDAPI_PREFIX
from .state import state
from .storage import store_all

bp = Blueprint("a1111", __name__, url_prefix=SDAPI_PREFIX)


def _version() -> str:
    try:
        return f"sd-api-server {metadata.version('sd-api-server')}"
    except metadata.PackageNotFoundError:
        return "sd-api-server"


def _generate(parse):
    st = state()
    req = parse(a1111.read_body(request), st, g.request_id)
    params = req.image_request.params
    images = st.queue.run(req.image_request.model, params, request_id=g.request_id,
                          client_gone=client_gone_probe(request.environ))
    if req.save_images:
        store_all(st.store, [(img.png, f"image-{int(img.seed)}.png") for img in images], g.request_id)
    return jsonify({"images": [base64.b64encode(img.png).decode("ascii") for img in images] if req.send_images else [],
                    "parameters": req.parameters,
                    "info": json.dumps(a1111.info(req, images, _version()), ensure_ascii=False)})


@bp.post("/txt2img")
def txt2img():
    return _generate(a1111.parse_txt2img)


@bp.post("/img2img")
def img2img():
    return _generate(a1111.parse_img2img)


@bp.post("/png-info")
def png_info():
    return jsonify(a1111.png_info(a1111.read_body(request), state().limits))


def _current_checkpoint(st):
    chosen = st.options.get().get("sd_model_checkpoint")
    ckpt = a1111.find_checkpoint(st.models, st.hashes, chosen) if isinstance(chosen, str) else None
    return ckpt or a1111.find_checkpoint(st.models, st.hashes, st.models.default_id)


@bp.get("/options")
def get_options():
    st = state()
    return jsonify(a1111.options_view(st.options.get(), _current_checkpoint(st)))


@bp.post("/options")
def set_options():
    st = state()
    body = a1111.read_body(request)
    st.options.update(a1111.check_options(body, st.models, st.hashes))
    return jsonify(None)


@bp.get("/sd-models")
def sd_models():
    st = state()
    return jsonify([c.as_a1111() for c in a1111.checkpoints(st.models, st.hashes)])


@bp.post("/refresh-checkpoints")
def refresh_checkpoints():
    return jsonify(None)           # the served models are fixed at start


@bp.get("/samplers")
def list_samplers():
    return jsonify(a1111.samplers_list())


@bp.get("/schedulers")
def list_schedulers():
    return jsonify(a1111.schedulers_list())


@bp.get("/upscalers")
def upscalers():
    return jsonify([{"name": "None", "model_name": None, "model_path": None, "model_url": None, "scale": 4}])


@bp.get("/latent-upscale-modes")
def latent_upscale_modes():
    return jsonify([])             # no hires fix here


@bp.get("/sd-vae")
def sd_vae():
    return jsonify([])


@bp.get("/loras")
def loras():
    return jsonify(a1111.loras(state().models.lora_dir))


@bp.get("/prompt-styles")
def prompt_styles():
    return jsonify([])


@bp.get("/embeddings")
def embeddings():
    st = state()
    return jsonify(a1111.embeddings(st.models.models[_current_checkpoint(st).id]))


@bp.get("/progress")
def progress():
    st = state()
    skip_image = request.args.get("skip_current_image", "false").strip().lower() in ("true", "1")
    return jsonify(a1111.progress(st.queue.jobs, st.queue.waiting, want_image=not skip_image))


@bp.post("/interrupt")
def interrupt():
    """Every running generation (of any worker) stops at its next step; its current image is finished
    from there and returned, the request's later images are not drawn (A1111's interrupt)."""
    state().queue.jobs.stop("interrupt")
    return jsonify({})


@bp.post("/skip")
def skip():
    """Every running generation finishes its current image from the next step, then goes on with the next."""
    state().queue.jobs.stop("skip")
    return jsonify(None)


@bp.get("/cmd-flags")
def cmd_flags():
    st = state()
    return jsonify({"api": True, "nowebui": True, "listen": st.settings.host not in ("127.0.0.1", "localhost"),
                    "port": st.settings.port, "api_auth": None, "ckpt": _current_checkpoint(st).as_a1111()["filename"]})
