"""Errors in each route's own shape. Under ``/sdapi/v1`` AUTOMATIC1111's: a field that fails validation is
FastAPI's ``422 {"detail": [{"loc", "msg", "type"}]}``, anything else the object of A1111's exception
handler, ``{"error", "detail", "body", "errors"}``. Everywhere else OpenAI's:
``{"error": {"message", "type", "param", "code"}}``.

Every error the server returns, including 404/405/413/415 raised by Flask/Werkzeug and any
unexpected exception (500, logged with its traceback but never sent to the client), goes through
the handlers registered by :func:`register_error_handlers`.
"""
from __future__ import annotations

import logging

from flask import Flask, g, has_request_context, jsonify, request
from werkzeug.exceptions import HTTPException

log = logging.getLogger("sd_api_server")
SDAPI_PREFIX = "/sdapi/v1"            # AUTOMATIC1111's API: its routes answer errors in its shape

# type and code used for Werkzeug's HTTP errors, by status
_HTTP_ERRORS = {
    400: ("invalid_request_error", "bad_request"),
    401: ("authentication_error", "invalid_api_key"),
    403: ("permission_error", "forbidden"),
    404: ("not_found_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    408: ("invalid_request_error", "request_timeout"),
    411: ("invalid_request_error", "length_required"),
    413: ("invalid_request_error", "payload_too_large"),
    414: ("invalid_request_error", "uri_too_long"),
    415: ("invalid_request_error", "unsupported_media_type"),
    431: ("invalid_request_error", "headers_too_large"),
    503: ("server_error", "server_busy"),
}


class APIError(Exception):
    """An error response in the OpenAI shape. Raise it anywhere inside a request."""

    def __init__(self, message: str, *, status: int = 400, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = "invalid_value",
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def invalid(param: str | None, message: str, code: str = "invalid_value") -> APIError:
    """A 400 invalid_request_error naming ``param``."""
    return APIError(message, status=400, param=param, code=code)


def a1111_body(err: APIError) -> tuple[int, dict]:
    if err.param is not None and err.status == 400:
        kind = "type_error" if err.code == "invalid_type" else "value_error"
        return 422, {"detail": [{"loc": ["body", err.param], "msg": err.message, "type": kind}]}
    name = "HTTPException" if err.status < 500 else "RuntimeError"
    return err.status, {"error": name, "detail": err.message, "body": "", "errors": f"{err.status}: {err.message}"}


def is_sdapi() -> bool:
    return has_request_context() and (request.path == SDAPI_PREFIX or request.path.startswith(SDAPI_PREFIX + "/"))


def error_response(err: APIError):
    status, body = a1111_body(err) if is_sdapi() else (err.status, err.body())
    resp = jsonify(body)
    resp.status_code = status
    for k, v in err.headers.items():
        resp.headers[k] = v
    return resp


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(APIError)
    def _api_error(err: APIError):
        return error_response(err)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        status = exc.code or 500
        default = ("invalid_request_error" if status < 500 else "server_error", None)
        etype, code = _HTTP_ERRORS.get(status, default)
        message = exc.description or exc.name
        if status == 404:
            message = "Not found: no such route or object."
        elif status == 413:
            limit = app.config.get("MAX_CONTENT_LENGTH")
            message = "Request body too large" + (f" (the limit is {limit} bytes)." if limit else ".")
        resp = exc.get_response()  # keeps headers such as Allow (405) or Retry-After
        err = APIError(message, status=status, type=etype, param=None, code=code)
        out = error_response(err)
        for k, v in resp.headers.items():
            if k.lower() not in ("content-type", "content-length"):
                out.headers[k] = v
        return out

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        rid = getattr(g, "request_id", "-")
        log.exception("request %s: unexpected error", rid)
        err = APIError(f"The server had an error while processing your request (request id {rid}).",
                       status=500, type="server_error", param=None, code="internal_error")
        return error_response(err)
