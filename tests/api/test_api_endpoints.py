"""Endpoints, responses, auth, error shapes, files and URLs, through the Flask test client with a
stub generate function (no model)."""
import base64
import io
import logging
import os
import threading
import time

import pytest
from PIL import Image

from api_helpers import StubGenerate, StubModel, error_of, make_app, png_bytes, stub_png

GEN = "/v1/images/generations"
EDIT = "/v1/images/edits"
KEY = "s3cret-key-value"


@pytest.fixture
def app_stub(tmp_path):
    return make_app(tmp_path)


@pytest.fixture
def client(app_stub):
    return app_stub[0].test_client()


def _png(data: bytes) -> Image.Image:
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


# --- responses --------------------------------------------------------------------------------
def test_b64_response_shape(client):
    t0 = int(time.time())
    r = client.post(GEN, json={"prompt": "a cat", "n": 3, "size": "64x64", "seed": 5,
                               "response_format": "b64_json"})
    assert r.status_code == 200 and r.mimetype == "application/json"
    body = r.get_json()
    assert set(body) == {"created", "data", "output_format", "size", "background"}
    assert t0 <= body["created"] <= time.time() + 1 and (body["output_format"], body["size"]) == ("png", "64x64")
    assert len(body["data"]) == 3
    for i, item in enumerate(body["data"]):
        assert set(item) == {"b64_json", "prompt", "seed"}
        assert not item["b64_json"].startswith("data:")
        raw = base64.b64decode(item["b64_json"], validate=True)
        assert raw == stub_png(64, 64, 5 + i, "a cat")[1]  # the pipeline's PNG, untouched
        im = _png(raw)
        assert im.size == (64, 64) and "Seed: %d" % (5 + i) in im.text["parameters"]
        assert (item["prompt"], item["seed"]) == ("a cat", 5 + i)


def test_url_response_and_download(client):
    r = client.post(GEN, json={"prompt": "p", "n": 2, "size": "64x128", "seed": 9})
    data = r.get_json()["data"]
    assert len(data) == 2
    for i, item in enumerate(data):
        assert set(item) == {"url", "prompt", "seed"} and item["seed"] == 9 + i
        assert item["url"].startswith("http://localhost/v1/files/download/file-")
        path = item["url"][len("http://localhost"):]
        d = client.get(path)
        assert d.status_code == 200 and d.mimetype == "image/png"
        assert d.data == stub_png(64, 128, 9 + i, "p")[1]
        assert _png(d.data).size == (64, 128)


def test_exactly_n_items(client):
    for n in (1, 4, 10):
        r = client.post(GEN, json={"prompt": "p", "n": n, "size": "64x64", "response_format": "b64_json"})
        assert len(r.get_json()["data"]) == n


def test_pipeline_returning_wrong_count_is_500(tmp_path):
    class Short(StubGenerate):
        def __call__(self, model, params, progress=None):
            return super().__call__(model, params, progress)[:-1]
    app, _ = make_app(tmp_path, stub=Short())
    err = error_of(app.test_client().post(GEN, json={"prompt": "p", "n": 2, "size": "64x64"}), 500)
    assert err["type"] == "server_error"


def test_edit_response(client):
    data = {"prompt": "p", "n": "2", "size": "64x64", "response_format": "b64_json",
            "image": (io.BytesIO(png_bytes()), "i.png")}
    r = client.post(EDIT, data=data, content_type="multipart/form-data")
    assert r.status_code == 200
    assert [d["seed"] for d in r.get_json()["data"]] == [42, 43]


def test_forwarded_headers_build_the_url(client):
    r = client.post(GEN, json={"prompt": "p", "size": "64x64"},
                    headers={"X-Forwarded-Proto": "https", "X-Forwarded-Host": "img.example.com"})
    assert r.get_json()["data"][0]["url"].startswith("https://img.example.com/v1/files/download/file-")
    r = client.post(GEN, json={"prompt": "p", "size": "64x64"},
                    headers={"X-Forwarded-Proto": "https", "X-Forwarded-Host": "h:8443",
                             "X-Forwarded-Prefix": "/sd"})
    assert r.get_json()["data"][0]["url"].startswith("https://h:8443/sd/v1/files/download/file-")


def test_forwarded_headers_ignored_without_trusted_proxy(tmp_path):
    app, _ = make_app(tmp_path, proxy_hops=0)
    r = app.test_client().post(GEN, json={"prompt": "p", "size": "64x64"},
                               headers={"X-Forwarded-Proto": "https", "X-Forwarded-Host": "evil.example"})
    assert r.get_json()["data"][0]["url"].startswith("http://localhost/v1/files/download/")


def test_download_url_prefix(tmp_path):
    app, _ = make_app(tmp_path, download_url_prefix="https://cdn.example.com/base/")
    c = app.test_client()
    url = c.post(GEN, json={"prompt": "p", "size": "64x64"},
                 headers={"X-Forwarded-Host": "ignored"}).get_json()["data"][0]["url"]
    assert url.startswith("https://cdn.example.com/base/v1/files/download/file-")
    assert c.get(url[len("https://cdn.example.com/base"):]).status_code == 200


def test_progress_logged_with_request_id(client, caplog):
    caplog.set_level(logging.INFO, logger="sd_api_server")
    r = client.post(GEN, json={"prompt": "p", "size": "64x64", "steps": 3}, headers={"X-Request-Id": "req-abc.1"})
    assert r.headers["X-Request-Id"] == "req-abc.1"
    msgs = [rec.getMessage() for rec in caplog.records]
    assert any("req-abc.1" in m and "step 3/3" in m and "s/step" in m for m in msgs)
    # an unsafe client request id is replaced
    r = client.get("/health", headers={"X-Request-Id": "bad id <script>"})
    assert r.headers["X-Request-Id"] != "bad id <script>" and len(r.headers["X-Request-Id"]) == 16


# --- errors -----------------------------------------------------------------------------------
def test_unknown_path_404_json(client):
    err = error_of(client.get("/v1/nope"), 404)
    assert err["type"] == "not_found_error"
    error_of(client.post("/v1/images/variations", json={}), 404)


@pytest.mark.parametrize("method,path", [("get", GEN), ("put", EDIT), ("post", "/v1/models"),
                                         ("post", "/health"), ("patch", "/v1/files")])
def test_wrong_method_405_json(client, method, path):
    r = getattr(client, method)(path)
    err = error_of(r, 405)
    assert err["code"] == "method_not_allowed" and "Allow" in r.headers


def test_unexpected_exception_500_without_traceback(tmp_path, caplog):
    app, _ = make_app(tmp_path, stub=StubGenerate(error=RuntimeError("secret internal detail")))
    r = app.test_client().post(GEN, json={"prompt": "p", "size": "64x64"})
    err = error_of(r, 500)
    text = r.get_data(as_text=True)
    assert err["type"] == "server_error" and "secret" not in text and "Traceback" not in text
    assert r.headers["X-Request-Id"] in err["message"]
    assert "secret internal detail" in caplog.text   # but it is logged


def test_pipeline_error_is_400_with_param(tmp_path):
    from sdcore.pipeline import PipelineError
    app, _ = make_app(tmp_path, stub=StubGenerate(error=PipelineError("no ControlNet loaded", "control_image")))
    err = error_of(app.test_client().post(GEN, json={"prompt": "p", "size": "64x64"}), 400)
    assert (err["param"], err["type"]) == ("control_image", "invalid_request_error")
    assert "ControlNet" in err["message"]


def test_busy_worker_returns_503(tmp_path):
    gate = threading.Event()
    stub = StubGenerate(gate=gate)
    app, _ = make_app(tmp_path, stub=stub, max_queue=0)
    c = app.test_client()
    results = []
    t = threading.Thread(target=lambda: results.append(c.post(GEN, json={"prompt": "p", "size": "64x64"})))
    t.start()
    try:
        assert stub.started.wait(5)
        r = c.post(GEN, json={"prompt": "q", "size": "64x64"})
        err = error_of(r, 503)
        assert err["code"] == "server_busy" and int(r.headers["Retry-After"]) >= 1
        assert c.get("/health").status_code == 200   # other endpoints still answer
    finally:
        gate.set()
        t.join(10)
    assert results[0].status_code == 200
    assert c.post(GEN, json={"prompt": "q", "size": "64x64"}).status_code == 200


def test_one_generation_at_a_time(tmp_path):
    active, peak = [0], [0]
    lock = threading.Lock()

    class Counting(StubGenerate):
        def __call__(self, model, params, progress=None):
            with lock:
                active[0] += 1
                peak[0] = max(peak[0], active[0])
            time.sleep(0.05)
            with lock:
                active[0] -= 1
            return super().__call__(model, params, progress)

    app, _ = make_app(tmp_path, stub=Counting(), max_queue=8)
    c = app.test_client()
    codes = []
    threads = [threading.Thread(target=lambda: codes.append(
        c.post(GEN, json={"prompt": "p", "size": "64x64"}).status_code)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert codes == [200] * 4 and peak[0] == 1


# --- auth -------------------------------------------------------------------------------------
@pytest.fixture
def keyed(tmp_path):
    app, _ = make_app(tmp_path, api_key=KEY)
    return app.test_client()


@pytest.mark.parametrize("headers", [{}, {"Authorization": ""}, {"Authorization": "Bearer"},
                                     {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                                     {"Authorization": "Basic " + KEY}, {"Authorization": f"Bearer {KEY}x"},
                                     {"X-Api-Key": KEY}])
@pytest.mark.parametrize("method,path", [("post", GEN), ("post", EDIT), ("get", "/v1/models"),
                                         ("get", "/v1/files"), ("get", "/echo"), ("get", "/nope"),
                                         ("get", "/v1/files/download/file-" + "0" * 32 + "/image.png")])
def test_key_required_everywhere(keyed, headers, method, path):
    err = error_of(getattr(keyed, method)(path, headers=headers), 401)
    assert err["type"] == "authentication_error"


def test_key_accepted(keyed):
    h = {"Authorization": f"Bearer {KEY}"}
    assert keyed.get("/v1/models", headers=h).status_code == 200
    assert keyed.get("/v1/models", headers={"Authorization": f"bearer {KEY}"}).status_code == 200
    r = keyed.post(GEN, json={"prompt": "p", "size": "64x64"}, headers=h)
    assert r.status_code == 200
    url = r.get_json()["data"][0]["url"]
    assert keyed.get(url[len("http://localhost"):]).status_code == 401
    assert keyed.get(url[len("http://localhost"):], headers=h).status_code == 200
    assert keyed.get("/health").status_code == 200   # the only open endpoint


def test_key_never_logged_and_warning_without_key(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    app, _ = make_app(tmp_path, api_key=KEY)
    c = app.test_client()
    c.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    c.get("/v1/models", headers={"Authorization": "Bearer wrong-one"})
    assert KEY not in caplog.text and "wrong-one" not in caplog.text
    assert KEY not in repr(app.extensions["sd_api_server"].settings)
    assert "no API key" not in caplog.text
    make_app(tmp_path)
    assert "no API key" in caplog.text


# --- models, health ---------------------------------------------------------------------------
def test_models_list(client):
    body = client.get("/v1/models").get_json()
    assert body["object"] == "list" and len(body["data"]) == 1
    m = body["data"][0]
    assert m["id"] == "stub-sd" and m["object"] == "model" and isinstance(m["created"], int) and m["owned_by"]
    assert client.get("/v1/models/stub-sd").get_json()["id"] == "stub-sd"
    assert error_of(client.get("/v1/models/other"), 404)["code"] == "model_not_found"


def test_model_name_setting(tmp_path):
    app, _ = make_app(tmp_path, model_name="sd")
    c = app.test_client()
    assert [m["id"] for m in c.get("/v1/models").get_json()["data"]] == ["sd"]
    assert c.post(GEN, json={"model": "sd", "prompt": "p", "size": "64x64"}).status_code == 200


def test_several_models_listed(tmp_path):
    app, _ = make_app(tmp_path, model={"one": StubModel("one"), "two": StubModel("two")})
    ids = [m["id"] for m in app.test_client().get("/v1/models").get_json()["data"]]
    assert ids == ["one", "two"]


def test_health_and_echo(client):
    r = client.get("/health")
    assert r.status_code == 200 and r.get_json() == {"status": "ok", "models": ["stub-sd"],
                                                     "queue": {"waiting": 0, "running": False}, "jobs": []}
    assert client.get("/echo").get_data(as_text=True) == "echo test"


# --- files ------------------------------------------------------------------------------------
def _make_files(client, n=2):
    data = client.post(GEN, json={"prompt": "p", "n": n, "size": "64x64"}).get_json()["data"]
    return [d["url"].split("/")[-2] for d in data], data


def test_files_endpoints(client):
    ids, data = _make_files(client, 2)
    listing = client.get("/v1/files").get_json()
    assert listing["object"] == "list" and sorted(f["id"] for f in listing["data"]) == sorted(ids)
    f = client.get(f"/v1/files/{ids[0]}").get_json()
    assert f["object"] == "file" and f["id"] == ids[0] and f["filename"] == "image-42.png"
    assert f["bytes"] == len(stub_png(64, 64, 42, "p")[1]) and f["expires_at"] == f["created_at"] + 3600
    assert client.get(f"/v1/files/{ids[0]}/content").data == stub_png(64, 64, 42, "p")[1]
    r = client.delete(f"/v1/files/{ids[0]}")
    assert r.get_json() == {"id": ids[0], "object": "file", "deleted": True}
    assert error_of(client.get(f"/v1/files/{ids[0]}"), 404)["type"] == "not_found_error"
    error_of(client.delete(f"/v1/files/{ids[0]}"), 404)
    error_of(client.get(data[0]["url"][len("http://localhost"):]), 404)
    assert [f["id"] for f in client.get("/v1/files").get_json()["data"]] == [ids[1]]


@pytest.mark.parametrize("path", [
    "/v1/files/download/../../etc/passwd", "/v1/files/download/..%2F..%2Fetc/passwd",
    "/v1/files/download/%2e%2e/%2e%2e%2fetc%2fpasswd", "/v1/files/download/file-x/../../app.py",
    "/v1/files/download/..%252F..%252Fapp.py/x", "/v1/files/..%2F..%2Fapp.py",
    "/v1/files/download/file-" + "0" * 32 + "/..%2F..%2F..%2Fapp.py",
    "/v1/files/download/file-" + "0" * 32 + "/image.png", "/v1/files/download/FILE-" + "A" * 32 + "/x.png",
    "/v1/files/%2e%2e", "/v1/files/..%5C..%5Capp.py",
])
def test_traversal_impossible(client, path):
    _make_files(client, 1)
    r = client.get(path)
    assert r.status_code in (400, 404)
    assert r.mimetype == "application/json" and b"import" not in r.data and b"root:" not in r.data


def test_wrong_name_for_existing_id(client):
    ids, data = _make_files(client, 1)
    error_of(client.get(f"/v1/files/download/{ids[0]}/other.png"), 404)
    error_of(client.get(f"/v1/files/download/{ids[0]}/..%2Fimage-42.png"), 404)


def test_expired_files_disappear(tmp_path):
    app, _ = make_app(tmp_path, file_ttl=60)
    c = app.test_client()
    ids, data = _make_files(c, 2)
    old = time.time() - 120
    d = tmp_path / "data" / ids[0]
    for p in [d / "image-42.png", d]:
        os.utime(p, (old, old))
    error_of(c.get(data[0]["url"][len("http://localhost"):]), 404)   # expired: gone at once
    assert [f["id"] for f in c.get("/v1/files").get_json()["data"]] == [ids[1]]
    assert not d.exists() and (tmp_path / "data" / ids[1]).exists()   # swept by the listing
