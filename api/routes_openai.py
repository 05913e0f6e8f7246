"""The OpenAI routes (``/v1/images``, ``/v1/models``, ``/v1/files``) and the server's own (``/health``, ``/echo``,
``/openapi.json``): thin views over the request parsers (``api/params.py``), the queue and the image store."""
from __future__ import annotations

import base64
import mimetypes
import time
from pathlib import Path

from flask import Blueprint, current_app, g, jsonify, request, send_file, url_for

from . import streaming
from .disconnect import client_gone_probe
from .errors import APIError
from .openapi import build_openapi
from .params import parse_edit, parse_generation
from .responses import image_items
from .state import state
from .storage import store_all

bp = Blueprint("openai", __name__)


def _file_url(stored) -> str:
    """--download-url-prefix + path, else the request's own (proxy-corrected) base URL."""
    prefix = state().settings.download_url_prefix
    if prefix:
        return f"{prefix.rstrip('/')}/v1/files/download/{stored.id}/{stored.filename}"
    return url_for("openai.download", file_id=stored.id, name=stored.filename, _external=True)


def _respond(parse, kind):
    st = state()
    image_request = parse(request, st.limits, st.models)
    if image_request.stream:
        return _stream(st, image_request, kind)
    params = image_request.params
    images = st.queue.run(image_request.model, params, request_id=g.request_id,
                          client_gone=client_gone_probe(request.environ))
    fmt = image_request.output_format
    encoded = [img.encoded(fmt, image_request.output_compression) for img in images]
    urls = None
    if image_request.response_format == "url":
        stored = store_all(st.store, [(data, f"image-{int(img.seed)}.{fmt}") for img, data in zip(images, encoded)],
                           g.request_id)
        urls = [_file_url(s) for s in stored]
    # the fields OpenAI's GPT image responses carry, which clients written for them read
    body = {"created": int(time.time()), "data": image_items(images, params.prompt, encoded, urls, image_request.revised_prompt),
            "background": "opaque", "output_format": fmt, "size": f"{params.width}x{params.height}"}
    if image_request.quality is not None:
        body["quality"] = image_request.quality
    return jsonify(body)


def _stream(st, image_request, kind):
    """OpenAI's streamed answer (api.streaming): previews, then the image, as server-sent events."""
    params, model, rid = image_request.params, image_request.model, g.request_id
    fmt, quality = image_request.output_format, image_request.output_compression
    ticket = st.queue.enter(rid)          # a full queue is still a plain 503, before the stream starts
    fields = {"size": f"{params.width}x{params.height}", "output_format": fmt, "background": "opaque",
              "quality": image_request.quality or "auto", "partial_images": image_request.partial_images}

    def run(client_gone, on_step):
        return st.queue.run(model, params, request_id=rid, client_gone=client_gone, on_step=on_step, ticket=ticket)

    def encode_preview(step):
        return st.queue.preview(model, step, (params.width, params.height), fmt, quality)

    def finish(images):
        return {"b64_json": base64.b64encode(images[0].encoded(fmt, quality)).decode("ascii"),
                "usage": streaming.usage(model, params.prompt, params.width, params.height,
                                         int(params.init_image is not None))}

    events = streaming.stream(run, kind, fields, encode_preview, finish, client_gone_probe(request.environ))
    return current_app.response_class(events, mimetype="text/event-stream", headers=streaming.HEADERS)


@bp.post("/v1/images/generations")
def generations():
    return _respond(parse_generation, "image_generation")


@bp.post("/v1/images/edits")
def edits():
    return _respond(parse_edit, "image_edit")


@bp.get("/v1/models")
def list_models():
    reg = state().models
    return jsonify({"object": "list", "data": [reg.as_openai(i) for i in reg.ids()]})


@bp.get("/v1/models/<path:model_id>")
def get_model(model_id):
    reg = state().models
    reg.lookup(model_id)
    return jsonify(reg.as_openai(model_id))


def _file_or_404(file_id):
    stored = state().store.get(file_id)
    if stored is None:
        raise APIError(f"No such file: {file_id!r}.", status=404, type="not_found_error",
                       param="file_id", code="file_not_found")
    return stored


@bp.get("/v1/files")
def list_files():
    files = state().store.list()
    return jsonify({"object": "list", "data": [f.as_openai() for f in files], "has_more": False})


@bp.get("/v1/files/<file_id>")
def get_file(file_id):
    return jsonify(_file_or_404(file_id).as_openai())


@bp.delete("/v1/files/<file_id>")
def delete_file(file_id):
    _file_or_404(file_id)
    state().store.delete(file_id)
    return jsonify({"id": file_id, "object": "file", "deleted": True})


def _send(path: Path):
    mimetype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return send_file(path, mimetype=mimetype, conditional=True, etag=True)


@bp.get("/v1/files/<file_id>/content")
def file_content(file_id):
    stored = _file_or_404(file_id)
    return download(stored.id, stored.filename)


@bp.get("/v1/files/download/<file_id>/<name>")
def download(file_id, name):
    path = state().store.open_path(file_id, name)
    if path is None:
        raise APIError("No such file (it may have expired).", status=404,
                       type="not_found_error", param=None, code="file_not_found")
    return _send(path)


@bp.get("/health")
def health():
    st = state()
    running = [{k: job[k] for k in ("request_id", "pid", "image", "images", "step", "steps", "width", "height")}
               for job in st.queue.jobs.running()]
    return jsonify({"status": "ok", "models": st.models.ids(),
                    "queue": {"waiting": st.queue.waiting, "running": st.queue.busy}, "jobs": running})


@bp.get("/echo")
def echo():
    return "echo test", 200, {"Content-Type": "text/plain; charset=utf-8"}


@bp.get("/openapi.json")
def openapi():
    st = state()
    # built per request: it lists the samplers registered now
    return jsonify(build_openapi(st.limits, st.models.ids(), auth=st.credentials.required,
                                 max_upload_bytes=st.settings.max_upload_bytes))
