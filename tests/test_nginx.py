"""gunicorn behind deploy/nginx.conf (ports substituted) on loopback: generate through nginx and
download the image through the URL the server returned (built from X-Forwarded-Host/Proto).
Skips only when the nginx binary is not installed (.ci/run installs Debian's nginx)."""
import io
import os
import re
import shutil
import subprocess
import time

import pytest
import requests
from PIL import Image

from server_helpers import API_KEY, ROOT, Gunicorn, free_port, require_pipeline

NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx")
                                       if os.path.exists(p)), None)
pytestmark = pytest.mark.skipif(NGINX is None, reason="nginx is not installed (apt-get install nginx)")


def render_site(gunicorn_port: int, nginx_port: int) -> str:
    """deploy/nginx.conf with the gunicorn upstream and the listen port substituted."""
    site = (ROOT / "deploy" / "nginx.conf").read_text()
    site, n_up = re.subn(r"server 127\.0\.0\.1:8080;", f"server 127.0.0.1:{gunicorn_port};", site)
    site, n_v4 = re.subn(r"listen 80;", f"listen 127.0.0.1:{nginx_port};", site)
    site, n_v6 = re.subn(r"listen \[::\]:80;\n", "", site)
    assert (n_up, n_v4, n_v6) == (1, 1, 1), "deploy/nginx.conf changed: update render_site()"
    return site


def nginx_conf(prefix, site_path) -> str:
    user = "user root root;\n" if os.geteuid() == 0 else ""
    return (f"{user}daemon off;\nworker_processes 1;\npid {prefix}/nginx.pid;\n"
            f"error_log {prefix}/error.log info;\nevents {{ worker_connections 64; }}\n"
            f"http {{\n  access_log {prefix}/access.log;\n"
            f"  client_body_temp_path {prefix}/body;\n  proxy_temp_path {prefix}/proxy;\n"
            f"  fastcgi_temp_path {prefix}/fcgi;\n  uwsgi_temp_path {prefix}/uwsgi;\n"
            f"  scgi_temp_path {prefix}/scgi;\n  include {site_path};\n}}\n")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    require_pipeline()
    tmp = tmp_path_factory.mktemp("nginx")
    srv = Gunicorn(tmp / "data", tmp / "gunicorn.log")
    nginx = None
    try:
        srv.wait_healthy()
        port = free_port()
        site = tmp / "site.conf"
        site.write_text(render_site(srv.port, port))
        conf = tmp / "nginx.conf"
        conf.write_text(nginx_conf(tmp, site))
        subprocess.run([NGINX, "-t", "-p", str(tmp), "-c", str(conf), "-e", str(tmp / "error.log")],
                       check=True, capture_output=True)
        nginx = subprocess.Popen([NGINX, "-p", str(tmp), "-c", str(conf), "-e", str(tmp / "error.log")],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                if requests.get(base + "/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                time.sleep(0.1)
        else:
            pytest.fail("nginx did not come up: " + (tmp / "error.log").read_text()[-3000:], pytrace=False)
        yield base, srv, tmp
    finally:
        if nginx is not None:
            nginx.terminate()
            nginx.wait(20)
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
