"""sd-api-server: an OpenAI-compatible Stable Diffusion image server (Flask + gunicorn).

``create_app(config=None, model=None, generate=None)`` is the application factory:

* ``config``: None reads the settings from environment variables (see ``api/config.py``);
  a :class:`api.config.Settings`, or a mapping of Settings field names (defaults + mapping,
  the environment is not read, as in Flask's ``flaskr`` tutorial).
* ``model``: an already loaded model (or a dict id -> model, the first being the default);
  None loads every configured model with ``sdcore.load_model`` (once per worker process).
* ``generate``: the generation function, ``sdcore.pipeline.generate`` by default.
* ``preview``: the picture of a latent during sampling, ``sdcore.previews.preview`` by default.

The ``sd-api-server`` console script (``api.serve.main``) runs this factory in gunicorn.

Routes: the OpenAI ones and the server's own (``api/routes_openai.py``), AUTOMATIC1111's ``/sdapi/v1``
(``api/routes_a1111.py``), each answering errors in its own shape (``api/errors.py``), and the playground
page at ``/`` (``api/routes_ui.py``).

Hardening: the credentials (Bearer key, HTTP Basic pairs) and CORS (``api/security.py``); ``GET /openapi.json`` describes every
endpoint and field with this server's limits (``api/openapi.py``). Generations wait in a bounded
first-come-first-served queue (``api/queue.py``; 503 + Retry-After when full); a client whose
connection closes while it waits (or during its generation) is dropped
(``api.disconnect.client_gone_probe`` polls the request's socket). A url image that cannot be stored
answers 507 (disk full) or 500, and the images of that response are removed.
"""
from __future__ import annotations

import logging
import re
import sys
import uuid
from pathlib import Path

from flask import Flask, current_app, g, request
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.middleware.proxy_fix import ProxyFix

from api import routes_a1111, routes_openai, routes_ui
from api.config import Settings
from api.disconnect import ClientGone
from api.errors import APIError, error_response, is_sdapi, register_error_handlers
from api.jobs import JobBoard
from api.models import ModelRegistry, load_models
from api.queue import GenerationQueue
from api.security import add_cors_headers, preflight_headers
from api.state import State, state

log = logging.getLogger("sd_api_server")
_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")


# --- request hooks ----------------------------------------------------------------------------
def _before_request():
    rid = request.headers.get("X-Request-Id", "")
    g.request_id = rid if _REQUEST_ID_RE.fullmatch(rid) else uuid.uuid4().hex[:16]
    st = state()
    if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
        headers = preflight_headers(st.cors_origins, request.headers)
        if headers is not None:
            return current_app.response_class(status=204, headers=headers)
    # OPTIONS carries no data and answers none: clients ping routes with it before they hold a key
    public = request.path in ("/", "/health") or request.path.startswith(routes_ui.PUBLIC_PREFIXES)
    if st.credentials.required and not public and request.method != "OPTIONS":
        st.credentials.check(request.headers.get("Authorization", ""), "Basic" if is_sdapi() else "Bearer")
    if request.content_length is None and request.method in ("POST", "PUT", "PATCH"):
        # A chunked body: Werkzeug stops reading at MAX_CONTENT_LENGTH but then hands over the
        # truncated body as if it were whole; read it here (cached for the parsers) and refuse
        # it when it reached the limit.
        limit = current_app.config["MAX_CONTENT_LENGTH"]
        if limit and len(request.get_data(cache=True)) >= limit:
            raise RequestEntityTooLarge()


def _after_request(resp):
    resp.headers["X-Request-Id"] = getattr(g, "request_id", "")
    return add_cors_headers(resp, state().cors_origins, request.headers.get("Origin"))


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


def create_app(config=None, model=None, generate=None, preview=None) -> Flask:
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
        models = ModelRegistry(model, settings.aliases(), settings.strict_models, settings.lora_model_dir)
    else:  # one injected model: its id is --model-name / NAME=, else its own .name
        configured = settings.models or settings.model_name
        name = settings.model_specs()[0][0]
        if not configured and getattr(model, "name", None):
            name = model.name
        models = ModelRegistry({name: model}, settings.aliases(), settings.strict_models, settings.lora_model_dir)
    if settings.embd_dir:
        from sdcore.embeddings import EmbeddingDir
        for served in models.models.values():
            served.embeddings = EmbeddingDir(settings.embd_dir)
    if generate is None:
        from sdcore.pipeline import generate
    if preview is None:
        from sdcore.previews import preview
    if not settings.api_key and not settings.api_auth:
        log.warning("no API key configured (--api-key or API_KEY): the server accepts "
                    "requests from anyone who can reach it")
    if settings.cors_origin_list():
        log.info("CORS allowed for origins: %s", ", ".join(settings.cors_origin_list()))

    app = Flask(__name__)
    app.config.update(MAX_CONTENT_LENGTH=settings.max_upload_bytes)
    app.json.sort_keys = False
    jobs = JobBoard(settings.data_dir)
    app.extensions["sd_api_server"] = State(settings, models, GenerationQueue(generate, settings.max_queue, jobs=jobs,
                                                                              preview=preview))
    if settings.proxy_hops:
        h = settings.proxy_hops
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=h, x_proto=h, x_host=h, x_port=h,
                                x_prefix=h)
    app.before_request(_before_request)
    app.after_request(_after_request)
    register_error_handlers(app)
    app.register_error_handler(ClientGone, _client_gone)
    app.register_blueprint(routes_openai.bp)
    app.register_blueprint(routes_a1111.bp)
    app.register_blueprint(routes_ui.bp)
    log.info("sd-api-server ready: models %s (default %s), data dir %s",
             models.ids(), models.default_id, Path(settings.data_dir).resolve())
    return app
