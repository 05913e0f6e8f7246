"""gunicorn behind deploy/nginx.conf (ports substituted) on loopback: generate through nginx and
download the image through the URL the server returned (built from X-Forwarded-Host/Proto).
Skips only when the nginx binary is not installed (.ci/run installs Debian's nginx)."""
import io
import re
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from PIL import Image

from bench.harness import API_KEY, NGINX, Gunicorn, nginx_in_front, require_pipeline

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


def test_least_conn_passes_over_a_busy_instance(tmp_path):
    # deploy/nginx.conf's parallel setup: two single-worker instances on one data dir. While the first
    # instance generates a long request, the next two requests both go to the idle one (round robin
    # would queue one of them behind the busy instance), and each url image downloads through nginx
    # whichever instance wrote it.
    require_pipeline()
    data = tmp_path / "data"
    a = Gunicorn(data, tmp_path / "a.log", SD_THREADS="1", SD_DTYPE="bfloat16")
    b = Gunicorn(data, tmp_path / "b.log", SD_THREADS="1", SD_DTYPE="bfloat16")
    h = {"Authorization": f"Bearer {API_KEY}"}

    def post(base, size, steps, seed):
        return requests.post(base + "/v1/images/generations", headers=h, timeout=300,
                             json={"prompt": "a lighthouse", "size": f"{size}x{size}", "steps": steps, "seed": seed})

    def generations(srv):
        return re.findall(r"request \S+: generating", srv.log_text())

    try:
        a.wait_healthy()
        b.wait_healthy()
        with nginx_in_front([a, b], tmp_path) as (base, _), ThreadPoolExecutor(1) as pool:
            long = pool.submit(post, base, 256, 16, 1)
            deadline = time.monotonic() + 60
            while not (generations(a) or generations(b)) and time.monotonic() < deadline:
                time.sleep(0.05)
            busy, idle = (a, b) if generations(a) else (b, a)
            assert generations(busy), "the long request never started"
            short = [post(base, 64, 2, seed) for seed in (2, 3)]
            long_ended = long.done()
            assert [r.status_code for r in short] == [200, 200], [r.text for r in short]
            routed = len(generations(idle)), len(generations(busy))
            assert routed == (2, 1), (f"generations on the idle and the busy instance: {routed} (the long request had "
                                      f"{'' if long_ended else 'not '}ended when the short ones returned)")
            assert long.result().status_code == 200
            for r in short + [long.result()]:
                d = requests.get(r.json()["data"][0]["url"], headers=h, timeout=30)
                assert d.status_code == 200 and Image.open(io.BytesIO(d.content)).format == "PNG"
    finally:
        a.stop()
        b.stop()
