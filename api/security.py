"""Who may ask: the Bearer key check and CORS, as functions of the request and the settings.

Every endpoint but /health needs ``Authorization: Bearer <API_KEY>`` when a key is configured. CORS is
off unless origins are listed; preflights from those origins are answered before authentication
(browsers send preflights without credentials)."""
from __future__ import annotations

import hashlib
import hmac
import re

from .errors import APIError

CORS_METHODS = "GET, POST, DELETE, OPTIONS"
CORS_EXPOSED = "Retry-After, X-Request-Id"


def key_digest(api_key: str | None) -> bytes | None:
    return hashlib.sha256(api_key.encode("utf-8")).digest() if api_key else None


def check_api_key(authorization: str, digest: bytes) -> None:
    """Raises a 401 APIError unless ``authorization`` is ``Bearer <the key>``."""
    scheme, _, token = authorization.partition(" ")
    if not authorization:
        raise APIError("Missing API key: send 'Authorization: Bearer <key>'.", status=401,
                       type="authentication_error", code="missing_api_key",
                       headers={"WWW-Authenticate": "Bearer"})
    # fixed-length digests compared in constant time: neither the key's bytes nor its
    # length leak through timing
    given = hashlib.sha256(token.strip().encode("utf-8", "surrogateescape")).digest()
    if not hmac.compare_digest(given, digest) or scheme.lower() != "bearer":
        raise APIError("Incorrect API key.", status=401, type="authentication_error",
                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def cors_origin(allowed: list[str], origin: str | None) -> str | None:
    """The value of Access-Control-Allow-Origin for a request from ``origin``, or None (CORS off,
    no Origin header, or an origin that is not allowed)."""
    if not allowed or not origin:
        return None
    if allowed == ["*"]:
        return "*"
    return origin if origin.rstrip("/") in allowed else None


def preflight_headers(allowed: list[str], headers) -> dict | None:
    """Headers of the 204 answering a CORS preflight from an allowed origin, else None."""
    if cors_origin(allowed, headers.get("Origin")) is None:
        return None
    out = {"Access-Control-Allow-Methods": CORS_METHODS, "Access-Control-Max-Age": "600"}
    requested = headers.get("Access-Control-Request-Headers", "")
    if requested and re.fullmatch(r"[A-Za-z0-9_, -]{1,1024}", requested):
        out["Access-Control-Allow-Headers"] = requested
    return out


def add_cors_headers(resp, allowed: list[str], origin: str | None):
    if allowed and allowed != ["*"]:
        resp.headers.add("Vary", "Origin")      # the answer depends on the Origin header
    value = cors_origin(allowed, origin)
    if value is not None:
        resp.headers["Access-Control-Allow-Origin"] = value
        resp.headers["Access-Control-Expose-Headers"] = CORS_EXPOSED
    return resp
