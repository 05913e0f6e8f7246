"""sd-api-server: an OpenAI-compatible Stable Diffusion image server (Flask + gunicorn).

``create_app(config=None, model=None, generate=None)`` is the application factory:

* ``config``: None reads the settings from environment variables (see ``api/config.py``);
  a :class:`api.config.Settings`, or a mapping of Settings field names (defaults + mapping,
  the environment is not read, as in Flask's ``flaskr`` tutorial).
* ``model``: an already loaded model (or a dict id -> model, the first being the default);
  None loads every configured model with ``sdcore.load_model`` (once per worker process).
* ``generate``: the generation function, ``sdcore.pipeline.generate`` by default.

``main()`` is the ``sd-api-server`` console script: it parses the command line and runs gunicorn
with ``gunicorn.conf.py`` (or Flask's development server with ``--dev``).
"""
from __future__ import annotations

import hmac
import logging
import mimetypes
import re
import sys
import time
import uuid
from pathlib import Path

from flask import Blueprint, Flask, current_app, g, jsonify, request, send_file, url_for
from werkzeug.middleware.proxy_fix import ProxyFix

from api.config import Settings, parse_args
from api.errors import APIError, register_error_handlers
from api.params import Limits, parse_edit, parse_generation
from api.runtime import Generator, ModelRegistry, image_item, load_models
from api.storage import ImageStore

log = logging.getLogger("sd_api_server")
bp = Blueprint("api", __name__)
_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")


class _State:
    def __init__(self, settings, models, generator, store):
        self.settings = settings
        self.models = models
        self.generator = generator
        self.store = store
        self.limits = Limits.from_settings(settings)


def _state() -> _State:
    return current_app.extensions["sd_api_server"]


# --- views ------------------------------------------------------------------------------------
def _file_url(stored) -> str:
    """--download-url-prefix + path, else the request's own (proxy-corrected) base URL."""
    prefix = _state().settings.download_url_prefix
    if prefix:
        return f"{prefix.rstrip('/')}/v1/files/download/{stored.id}/{stored.filename}"
    return url_for("api.download", file_id=stored.id, name=stored.filename, _external=True)


def _respond(image_request):
    st = _state()
    model = st.models.resolve(image_request.model)
    images = st.generator.run(model, image_request.params)
    data = [image_item(img, image_request.params.prompt, image_request.response_format,
                       st.store, _file_url) for img in images]
    return jsonify({"created": int(time.time()), "data": data})


@bp.post("/v1/images/generations")
def generations():
    return _respond(parse_generation(request, _state().limits, g.request_id))


@bp.post("/v1/images/edits")
def edits():
    return _respond(parse_edit(request, _state().limits, g.request_id))


@bp.get("/v1/models")
def list_models():
    reg = _state().models
    return jsonify({"object": "list", "data": [reg.as_openai(i) for i in reg.ids()]})


@bp.get("/v1/models/<path:model_id>")
def get_model(model_id):
    reg = _state().models
    reg.resolve(model_id)
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


# --- request hooks ----------------------------------------------------------------------------
def _before_request():
    rid = request.headers.get("X-Request-Id", "")
    g.request_id = rid if _REQUEST_ID_RE.fullmatch(rid) else uuid.uuid4().hex[:16]
    key = _state().settings.api_key
    if key and request.path != "/health":
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if not header:
            raise APIError("Missing API key: send 'Authorization: Bearer <key>'.", status=401,
                           type="authentication_error", code="missing_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
        if scheme.lower() != "bearer" or not hmac.compare_digest(
                token.strip().encode("utf-8", "surrogateescape"), key.encode("utf-8")):
            raise APIError("Incorrect API key.", status=401, type="authentication_error",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def _after_request(resp):
    resp.headers["X-Request-Id"] = getattr(g, "request_id", "")
    return resp


# --- factory ----------------------------------------------------------------------------------
def _setup_logging(level: str) -> None:
    log.setLevel(getattr(logging, level.upper(), logging.INFO))
    if not log.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(asctime)s [%(process)d] %(levelname)s %(name)s: "
                                         "%(message)s"))
        log.addHandler(h)
        log.propagate = False


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
        models = ModelRegistry(model)
    else:  # one injected model: its id is --model-name / NAME=, else its own .name
        configured = settings.models or settings.model_name
        name = settings.model_specs()[0][0]
        if not configured and getattr(model, "name", None):
            name = model.name
        models = ModelRegistry({name: model})
    if generate is None:
        from sdcore.pipeline import generate
    if not settings.api_key:
        log.warning("no API key configured (--api-key or API_KEY): the server accepts "
                    "requests from anyone who can reach it")

    app = Flask(__name__)
    app.config.update(MAX_CONTENT_LENGTH=settings.max_upload_bytes)
    app.json.sort_keys = False
    app.extensions["sd_api_server"] = _State(
        settings, models, Generator(generate, settings.max_queue),
        ImageStore(settings.data_dir, ttl=settings.file_ttl))
    if settings.proxy_hops:
        h = settings.proxy_hops
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=h, x_proto=h, x_host=h, x_port=h,
                                x_prefix=h)
    app.before_request(_before_request)
    app.after_request(_after_request)
    register_error_handlers(app)
    app.register_blueprint(bp)
    log.info("sd-api-server ready: models %s (default %s), data dir %s",
             models.ids(), models.default_id, Path(settings.data_dir).resolve())
    return app


# --- console script ---------------------------------------------------------------------------
GUNICORN_CONF = Path(__file__).resolve().parent / "gunicorn.conf.py"


def main(argv=None) -> int:
    settings, ns = parse_args(argv)
    if ns.dev:
        app = create_app(settings)
        app.run(host=settings.host, port=settings.port, threaded=True, use_reloader=False)
        return 0

    from gunicorn.app.base import Application

    class _Server(Application):
        def init(self, parser, opts, args):  # no gunicorn command line: ours was parsed above
            return None

        def load_config(self):
            if GUNICORN_CONF.exists():
                self.load_config_from_file(str(GUNICORN_CONF))
            else:  # installed without the repository: the same essentials
                self.cfg.set("worker_class", "gthread")
                self.cfg.set("preload_app", False)
            # command-line options win over gunicorn.conf.py's environment variables
            self.cfg.set("bind", [f"{settings.host}:{settings.port}"])
            self.cfg.set("workers", settings.workers)
            self.cfg.set("threads", settings.http_threads)
            self.cfg.set("timeout", settings.timeout)
            self.cfg.set("graceful_timeout", settings.timeout)

        def load(self):  # runs in each worker after fork (preload_app is False)
            return create_app(settings)

    _Server().run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
