"""Who may ask: the credentials check and CORS, as functions of the request and the settings.

Every endpoint but /health needs credentials when a key or --api-auth pairs are configured. CORS is
off unless origins are listed; preflights from those origins are answered before authentication
(browsers send preflights without credentials)."""
from __future__ import annotations

import base64
import hashlib
import hmac
import re

from .errors import APIError

CORS_METHODS = "GET, POST, DELETE, OPTIONS"
CORS_EXPOSED = "Retry-After, X-Request-Id"


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).digest()


class Credentials:
    """Who may call: the API key, sent as ``Bearer <key>`` (or as the password of HTTP Basic, for clients
    that only speak Basic), and the ``user:password`` pairs of --api-auth, sent as HTTP Basic (as to
    AUTOMATIC1111 started with --api-auth). Nothing configured: everybody.

    Secrets are compared as fixed-length digests in constant time, every pair tried: neither their bytes
    nor their lengths leak through timing."""

    def __init__(self, api_key: str | None, pairs: list[tuple[str, str]]):
        self.key = _digest(api_key) if api_key else None
        self.pairs = [(_digest(user), _digest(password)) for user, password in pairs]

    @property
    def required(self) -> bool:
        return self.key is not None or bool(self.pairs)

    def _basic_ok(self, token: str) -> bool:
        try:
            user, sep, password = base64.b64decode(token, validate=True).decode("utf-8").partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        user_d, password_d = _digest(user), _digest(password)
        ok = bool(sep) and self.key is not None and hmac.compare_digest(password_d, self.key)
        for pair_user, pair_password in self.pairs:
            ok |= hmac.compare_digest(user_d, pair_user) & hmac.compare_digest(password_d, pair_password)
        return bool(sep) and ok

    def check(self, authorization: str, challenge: str = "Bearer") -> None:
        """Raises a 401 APIError unless ``authorization`` carries a key or pair this server accepts;
        ``challenge`` is the scheme the 401 asks for (WWW-Authenticate)."""
        headers = {"WWW-Authenticate": challenge if challenge == "Bearer" else f'{challenge} realm="sd-api-server"'}
        if not authorization:
            raise APIError("Missing credentials: send 'Authorization: Bearer <key>'"
                           + (" or HTTP Basic credentials." if self.pairs else "."), status=401,
                           type="authentication_error", code="missing_api_key", headers=headers)
        scheme, _, token = authorization.partition(" ")
        scheme, token = scheme.lower(), token.strip()
        if scheme == "bearer" and self.key is not None:
            ok = hmac.compare_digest(_digest(token), self.key)
        else:
            ok = scheme == "basic" and self._basic_ok(token)
        if not ok:
            raise APIError("Incorrect API key or credentials.", status=401, type="authentication_error",
                           code="invalid_api_key", headers=headers)


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
