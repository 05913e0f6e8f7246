"""sd-api-server: an OpenAI-compatible Stable Diffusion image server (Flask + gunicorn).

``create_app(config=None, model=None, generate=None)`` is the application factory:

* ``config``: None reads the settings from environment variables (see ``api/config.py``);
  a :class:`api.config.Settings`, or a mapping of Settings field names (defaults + mapping,
  the environment is not read, as in Flask's ``flaskr`` tutorial).
* ``model``: an already loaded model (or a dict id -> model, the first being the default);
  None loads every configured model with ``sdcore.load_model`` (once per worker process).
* ``generate``: the generation function, ``sdcore.pipeline.generate`` by default.

The ``sd-api-server`` console script (``api.serve.main``) runs this factory in gunicorn.

Hardening: the Bearer key and CORS (``api/security.py``); ``GET /openapi.json`` describes every
endpoint and field with this server's limits (``api/openapi.py``). Generations wait in a bounded
first-come-first-served queue (``api/queue.py``; 503 + Retry-After when full); a client whose
connection closes while it waits (or during its generation) is dropped
(``api.disconnect.client_gone_probe`` polls the request's socket). A url image that cannot be stored
answers 507 (disk full) or 500, and the images of that response are removed.
"""
from __future__ import annotations

import errno
import logging
import mimetypes
import re
import sys
import time
import uuid
from pathlib import Path

from flask import Blueprint, Flask, current_app, g, jsonify, request, send_file, url_for
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.middleware.proxy_fix import ProxyFix

from api.config import Settings
from api.disconnect import ClientGone, client_gone_probe
from api.errors import APIError, error_response, register_error_handlers
from api.models import ModelRegistry, load_models
from api.openapi import build_openapi
from api.params import Limits, parse_edit, parse_generation
from api.queue import GenerationQueue
from api.responses import image_item
from api.security import add_cors_headers, check_api_key, key_digest, preflight_headers
from api.storage import DISK_FULL, ImageStore, SaveLog

log = logging.getLogger("sd_api_server")
bp = Blueprint("api", __name__)
_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")


class _State:
    def __init__(self, settings, models, queue, store):
        self.settings = settings
        self.models = models
        self.queue = queue
        self.store = store
        self.limits = Limits.from_settings(settings)
        self.cors_origins = settings.cors_origin_list()
        self.key_digest = key_digest(settings.api_key)


def _state() -> _State:
    return current_app.extensions["sd_api_server"]


# --- views ------------------------------------------------------------------------------------
def _file_url(stored) -> str:
    """--download-url-prefix + path, else the request's own (proxy-corrected) base URL."""
    prefix = _state().settings.download_url_prefix
    if prefix:
        return f"{prefix.rstrip('/')}/v1/files/download/{stored.id}/{stored.filename}"
    return url_for("api.download", file_id=stored.id, name=stored.filename, _external=True)


def _respond(parse):
    st = _state()
    image_request = parse(request, st.limits, st.models.resolve)
    params = image_request.params
    images = st.queue.run(image_request.model, params, request_id=g.request_id,
                          client_gone=client_gone_probe(request.environ))
    saves = SaveLog(st.store)
    try:
        data = [image_item(img, params.prompt, image_request.response_format, saves, _file_url,
                           image_request.output_format, image_request.output_compression) for img in images]
    except OSError as e:
        for file_id in saves.saved:          # all or nothing: no orphans of a failed response
            st.store.delete(file_id)
        if e.errno in DISK_FULL:
            log.error("request %s: cannot store the image: %s", g.request_id,
                      errno.errorcode.get(e.errno, e.errno))
            raise APIError("The server cannot store the image: its disk is full. Retry later, "
                           "or ask for response_format=b64_json.", status=507,
                           type="server_error", code="insufficient_storage") from None
        log.exception("request %s: cannot store the image", g.request_id)
        raise APIError(f"The server could not store the image (request id {g.request_id}); "
                       "response_format=b64_json does not need storage.", status=500,
                       type="server_error", code="storage_error") from None
    # the fields OpenAI's GPT image responses carry, which clients written for them read
    body = {"created": int(time.time()), "data": data, "background": "opaque",
            "output_format": image_request.output_format, "size": f"{params.width}x{params.height}"}
    if image_request.quality is not None:
        body["quality"] = image_request.quality
    return jsonify(body)


@bp.post("/v1/images/generations")
def generations():
    return _respond(parse_generation)


@bp.post("/v1/images/edits")
def edits():
    return _respond(parse_edit)


@bp.get("/v1/models")
def list_models():
    reg = _state().models
    return jsonify({"object": "list", "data": [reg.as_openai(i) for i in reg.ids()]})


@bp.get("/v1/models/<path:model_id>")
def get_model(model_id):
    reg = _state().models
    reg.lookup(model_id)
    return jsonify(reg.as_openai(model_id))


def _file_or_404(file_id):
    stored = _state().store.get(file_id)
    if stored is None:
        raise APIError(f"No such file: {file_id!r}.", status=404, type="not_found_error",
                       param="file_id", code="file_not_found")
    return stored


@bp.get("/v1/files")
def list_files():
    files = _state().store.list()
    return jsonify({"object": "list", "data": [f.as_openai() for f in files], "has_more": False})


@bp.get("/v1/files/<file_id>")
def get_file(file_id):
    return jsonify(_file_or_404(file_id).as_openai())


@bp.delete("/v1/files/<file_id>")
def delete_file(file_id):
    _file_or_404(file_id)
    _state().store.delete(file_id)
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
    path = _state().store.open_path(file_id, name)
    if path is None:
        raise APIError("No such file (it may have expired).", status=404,
                       type="not_found_error", param=None, code="file_not_found")
    return _send(path)


@bp.get("/health")
def health():
    return jsonify({"status": "ok", "models": _state().models.ids()})


@bp.get("/echo")
def echo():
    return "echo test", 200, {"Content-Type": "text/plain; charset=utf-8"}


@bp.get("/openapi.json")
def openapi():
    st = _state()
    # built per request: it lists the samplers registered now
    return jsonify(build_openapi(st.limits, st.models.ids(), auth=bool(st.settings.api_key),
                                 max_upload_bytes=st.settings.max_upload_bytes))


# --- request hooks ----------------------------------------------------------------------------
def _before_request():
    rid = request.headers.get("X-Request-Id", "")
    g.request_id = rid if _REQUEST_ID_RE.fullmatch(rid) else uuid.uuid4().hex[:16]
    st = _state()
    if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
        headers = preflight_headers(st.cors_origins, request.headers)
        if headers is not None:
            return current_app.response_class(status=204, headers=headers)
    # OPTIONS carries no data and answers none: clients ping routes with it before they hold a key
    if st.key_digest is not None and request.path != "/health" and request.method != "OPTIONS":
        check_api_key(request.headers.get("Authorization", ""), st.key_digest)
    if request.content_length is None and request.method in ("POST", "PUT", "PATCH"):
        # A chunked body: Werkzeug stops reading at MAX_CONTENT_LENGTH but then hands over the
        # truncated body as if it were whole; read it here (cached for the parsers) and refuse
        # it when it reached the limit.
        limit = current_app.config["MAX_CONTENT_LENGTH"]
        if limit and len(request.get_data(cache=True)) >= limit:
            raise RequestEntityTooLarge()


def _after_request(resp):
    resp.headers["X-Request-Id"] = getattr(g, "request_id", "")
    return add_cors_headers(resp, _state().cors_origins, request.headers.get("Origin"))


def _client_gone(_exc):
    # nobody reads this answer; 499 (nginx's "client closed request") marks it in the access log
    return error_response(APIError("The client closed the connection.", status=499,
                                   type="invalid_request_error", code="client_closed_request"))


# --- factory ----------------------------------------------------------------------------------
def _setup_logging(level: str) -> None:
    for logger in (log, logging.getLogger("sdcore")):     # the core's messages (e.g. the weights cache) too
        logger.setLevel(getattr(logging, level.upper(), logging.INFO))
        if not logger.handlers:
            h = logging.StreamHandler(sys.stderr)
            h.setFormatter(logging.Formatter("%(asctime)s [%(process)d] %(levelname)s %(name)s: "
                                             "%(message)s"))
            logger.addHandler(h)
            logger.propagate = False


def create_app(config=None, model=None, generate=None) -> Flask:
    if config is None:
        settings = Settings.from_env()
    elif isinstance(config, Settings):
        settings = config
    else:
        settings = Settings.from_mapping(dict(config))
    _setup_logging(settings.log_level)

    if model is None:
        models = load_models(settings)
    elif isinstance(model, dict):
        models = ModelRegistry(model, settings.aliases(), settings.strict_models)
    else:  # one injected model: its id is --model-name / NAME=, else its own .name
        configured = settings.models or settings.model_name
        name = settings.model_specs()[0][0]
        if not configured and getattr(model, "name", None):
            name = model.name
        models = ModelRegistry({name: model}, settings.aliases(), settings.strict_models)
    if generate is None:
        from sdcore.pipeline import generate
    if not settings.api_key:
        log.warning("no API key configured (--api-key or API_KEY): the server accepts "
                    "requests from anyone who can reach it")
    if settings.cors_origin_list():
        log.info("CORS allowed for origins: %s", ", ".join(settings.cors_origin_list()))

    app = Flask(__name__)
    app.config.update(MAX_CONTENT_LENGTH=settings.max_upload_bytes)
    app.json.sort_keys = False
    app.extensions["sd_api_server"] = _State(
        settings, models, GenerationQueue(generate, settings.max_queue),
        ImageStore(settings.data_dir, ttl=settings.file_ttl))
    if settings.proxy_hops:
        h = settings.proxy_hops
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=h, x_proto=h, x_host=h, x_port=h,
                                x_prefix=h)
    app.before_request(_before_request)
    app.after_request(_after_request)
    register_error_handlers(app)
    app.register_error_handler(ClientGone, _client_gone)
    app.register_blueprint(bp)
    log.info("sd-api-server ready: models %s (default %s), data dir %s",
             models.ids(), models.default_id, Path(settings.data_dir).resolve())
    return app
