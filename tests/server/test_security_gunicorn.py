"""Security against a real gunicorn with an API key and CORS origins configured: the Bearer key
is required on every documented endpoint but /health and the playground page with its files (the list
comes from /openapi.json), the key (right or wrong) never reaches the log, CORS answers only the
configured origins, and image ids are unguessable."""
import re

import pytest
import requests

from bench.harness import auth_headers, server_fixture

KEY = "sk-sec-5f0c1e9a7b3d4e2f8a6c"
WRONG = "sk-wrong-91d3b7e2c4a6f8e0"
ORIGINS = "https://app.example.com, http://localhost:3000"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = server_fixture(tmp_path_factory, "security", API_KEY=KEY, SD_CORS_ORIGINS=ORIGINS)
    try:
        yield srv
    finally:
        srv.stop()


def ok_headers():
    return auth_headers(KEY)


@pytest.fixture(scope="module")
def operations(server):
    doc = requests.get(server.base + "/openapi.json", headers=ok_headers(), timeout=30).json()
    ops = []
    for path, methods in doc["paths"].items():
        concrete = (path.replace("{file_id}", "file-" + "0" * 32).replace("{name}", "image.png")
                    .replace("{model_id}", "tiny-sd1").replace("{filename}", "playground.js"))
        for method, op in methods.items():
            ops.append((method.upper(), concrete, op.get("security", doc["security"])))
    assert len(ops) >= 12
    return ops


BAD_AUTH = [{}, {"Authorization": ""}, {"Authorization": "Bearer"}, {"Authorization": "Bearer "},
            {"Authorization": f"Bearer {WRONG}"}, {"Authorization": KEY},
            {"Authorization": f"Basic {KEY}"}, {"Authorization": f"Bearer {KEY[:-1]}"},
            {"Authorization": f"Bearer {KEY}x"}, {"X-Api-Key": KEY},
            {"Authorization": f"Bearer {KEY.upper()}"}]


def test_key_required_on_every_endpoint_but_health_and_the_page(server, operations):
    open_ops = []
    for method, path, security in operations:
        for headers in BAD_AUTH:
            r = requests.request(method, server.base + path, headers=headers, timeout=30,
                                 json={"prompt": "p"} if method == "POST" else None)
            if security == []:
                assert r.status_code == 200, (method, path)
                open_ops.append(path)
                continue
            assert r.status_code == 401, (method, path, headers, r.status_code)
            if path.startswith("/sdapi/"):        # AUTOMATIC1111's routes: its shape, a Basic challenge
                assert r.json()["detail"] and r.headers["WWW-Authenticate"].startswith("Basic")
                continue
            err = r.json()["error"]
            assert err["type"] == "authentication_error"
            assert r.headers["WWW-Authenticate"] == "Bearer"
        good = requests.request(method, server.base + path, headers=ok_headers(), timeout=60,
                                json={"prompt": "p", "size": "64x64", "steps": 1,
                                      "response_format": "b64_json"} if method == "POST" else None)
        assert good.status_code != 401, (method, path)
    assert set(open_ops) == {"/health", "/", "/ui/playground.js"}      # no data: the page asks for the key
    for path in ("/nope", "/v1/nope", "/.env"):          # unknown paths do not tell either
        assert requests.get(server.base + path, timeout=30).status_code == 401


def test_key_never_logged(server):
    for h in ({"Authorization": f"Bearer {WRONG}"}, ok_headers(), {"Authorization": KEY}):
        requests.get(server.base + "/v1/models", headers=h, timeout=30)
        requests.post(server.base + "/v1/images/generations", headers=h, timeout=60,
                      json={"prompt": "p", "size": "64x64", "steps": 1, "n": 11})
    log = server.log_text()
    assert "/v1/models" in log                          # the access log is on
    assert KEY not in log and WRONG not in log and KEY[:12] not in log
    assert "no API key configured" not in log


def test_cors_configured_origins_only(server):
    allowed = "https://app.example.com"
    r = requests.get(server.base + "/v1/models", timeout=30,
                     headers={**ok_headers(), "Origin": allowed})
    assert r.headers["Access-Control-Allow-Origin"] == allowed and "Origin" in r.headers["Vary"]
    assert "Retry-After" in r.headers["Access-Control-Expose-Headers"]
    r = requests.get(server.base + "/v1/models", timeout=30,
                     headers={**ok_headers(), "Origin": "http://localhost:3000"})
    assert r.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
    # errors reach the allowed page too (it can read the 401's JSON)
    r = requests.get(server.base + "/v1/models", timeout=30, headers={"Origin": allowed})
    assert r.status_code == 401 and r.headers["Access-Control-Allow-Origin"] == allowed
    # a preflight from an allowed origin is answered without the key
    pre = requests.options(server.base + "/v1/images/generations", timeout=30, headers={
        "Origin": allowed, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os"})
    assert pre.status_code == 204 and pre.headers["Access-Control-Allow-Origin"] == allowed
    assert "POST" in pre.headers["Access-Control-Allow-Methods"]
    assert "authorization" in pre.headers["Access-Control-Allow-Headers"].lower()
    for other in ("https://evil.example", "https://app.example.com.evil.example",
                  "http://app.example.com", "null"):
        r = requests.get(server.base + "/v1/models", timeout=30,
                         headers={**ok_headers(), "Origin": other})
        assert "Access-Control-Allow-Origin" not in r.headers, other
        pre = requests.options(server.base + "/v1/images/generations", timeout=30, headers={
            "Origin": other, "Access-Control-Request-Method": "POST"})
        # answered as any OPTIONS ping (no key needed, nothing in it), but without the CORS grant
        assert pre.status_code == 200 and not pre.content and "Access-Control-Allow-Origin" not in pre.headers


def test_image_ids_unguessable_and_downloads_confined(server):
    r = requests.post(server.base + "/v1/images/generations", headers=ok_headers(), timeout=60,
                      json={"prompt": "ids", "size": "64x64", "steps": 1, "n": 4})
    ids = [item["url"].split("/")[-2] for item in r.json()["data"]]
    assert len(set(ids)) == 4 and all(re.fullmatch(r"file-[0-9a-f]{32}", i) for i in ids)
    # neighbouring ids (one bit off) are not files
    for i in ids:
        flipped = i[:-1] + format(int(i[-1], 16) ^ 1, "x")
        assert requests.get(f"{server.base}/v1/files/{flipped}", headers=ok_headers(),
                            timeout=30).status_code == 404
