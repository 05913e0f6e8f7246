"""The playground page at ``/`` (``api/static/``: one HTML page, its script and style; no build step, nothing
fetched from elsewhere). It calls the OpenAI routes with relative URLs, so it works behind a proxy prefix.
The page and its files hold no data: they are served without the API key, which the page asks for."""
from __future__ import annotations

from flask import Blueprint

bp = Blueprint("ui", __name__, static_folder="static", static_url_path="/ui")
PUBLIC_PREFIXES = ("/ui/",)          # with "/": what a browser loads before it has a key


@bp.get("/")
def playground():
    resp = bp.send_static_file("playground.html")
    resp.headers["Cache-Control"] = "no-cache"
    return resp
