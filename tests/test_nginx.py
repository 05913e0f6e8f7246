"""gunicorn behind deploy/nginx.conf (ports substituted) on loopback: generate through nginx and
download the image through the URL the server returned (built from X-Forwarded-Host/Proto).
Skips only when the nginx binary is not installed (.ci/run installs Debian's nginx)."""
import io
import re

import pytest
import requests
from PIL import Image

from server_helpers import API_KEY, NGINX, Gunicorn, nginx_in_front, require_pipeline

pytestmark = pytest.mark.skipif(NGINX is None, reason="nginx is not installed (apt-get install nginx)")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    require_pipeline()
    tmp = tmp_path_factory.mktemp("nginx")
    srv = Gunicorn(tmp / "data", tmp / "gunicorn.log")
    try:
        srv.wait_healthy()
        with nginx_in_front(srv, tmp) as (base, _):
            yield base, srv, tmp
    finally:
        srv.stop()


def test_generate_and_download_through_nginx(stack):
    base, srv, _ = stack
    h = {"Authorization": f"Bearer {API_KEY}"}
    r = requests.post(base + "/v1/images/generations", headers=h, timeout=300,
                      json={"prompt": "a lighthouse", "n": 2, "size": "64x64", "steps": 2, "seed": 3})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert len(data) == 2
    for i, item in enumerate(data):
        # the URL points at nginx (X-Forwarded-Host with its port), not at gunicorn
        assert item["url"].startswith(base + "/v1/files/download/file-"), item["url"]
        d = requests.get(item["url"], headers=h, timeout=30)
        assert d.status_code == 200 and d.headers["Content-Type"] == "image/png"
        im = Image.open(io.BytesIO(d.content))
        assert im.size == (64, 64) and f"Seed: {3 + i}" in im.text["parameters"]


def test_forwarded_proto_and_host_through_nginx(stack):
    base, _, _ = stack
    r = requests.post(base + "/v1/images/generations", timeout=300,
                      headers={"Authorization": f"Bearer {API_KEY}", "Host": "img.example.com"},
                      json={"prompt": "p", "size": "64x64", "steps": 2})
    assert r.json()["data"][0]["url"].startswith("http://img.example.com/v1/files/download/")


def test_errors_and_auth_through_nginx(stack):
    base, _, _ = stack
    assert requests.get(base + "/v1/models", timeout=30).status_code == 401
    r = requests.get(base + "/nope", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_nginx_body_limit_matches_app(stack):
    base, _, tmp = stack
    site = (tmp / "site.conf").read_text()
    assert re.search(r"client_max_body_size 20m;", site)
    from api.config import Settings
    assert Settings().max_upload_bytes == 20 * 1024 * 1024
    r = requests.post(base + "/v1/images/edits", timeout=60, headers={"Authorization": f"Bearer {API_KEY}"},
                      files={"image": ("big.png", b"\0" * (21 * 1024 * 1024), "image/png")}, data={"prompt": "p"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
