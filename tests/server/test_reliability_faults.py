"""Faults against a real gunicorn with the tiny model: clients that go away, a generation that
runs out of memory, a worker killed (SIGKILL) in the middle of a generation and in the middle of
writing an image. The application is ``tests/fault_wsgi.py``: the real app and model with the
generation function wrapped through ``create_app(generate=...)`` (see its docstring)."""
import hashlib
import json
import socket
import threading
import time

import pytest
import requests

from bench.harness import auth_headers, kill, rss_kb, server_fixture

GEN = "/v1/images/generations"
MAX_QUEUE = 2


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = server_fixture(tmp_path_factory, "faults", app="fault_wsgi:app",
                         SD_MAX_QUEUE=str(MAX_QUEUE), SD_HTTP_THREADS="8")
    try:
        yield srv
    finally:
        srv.stop()


def post(server, body, rid=None, timeout=120):
    h = auth_headers()
    if rid:
        h["X-Request-Id"] = rid
    return requests.post(server.base + GEN, json={"size": "64x64", "steps": 1, **body}, headers=h,
                         timeout=timeout)


def raw_request(server, body: dict, rid: str) -> socket.socket:
    """Send a generation request on a raw socket and leave it open (the caller closes it)."""
    data = json.dumps({"size": "64x64", "steps": 1, "response_format": "b64_json", **body}).encode()
    head = (f"POST {GEN} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer test-key\r\n"
            f"X-Request-Id: {rid}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode()
    s = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    s.sendall(head + data)
    return s


def in_background(fn, *args, **kw):
    out = {}

    def run():
        try:
            out["result"] = fn(*args, **kw)
        except Exception as e:      # noqa: BLE001 - reported to the test
            out["error"] = e
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def check_error(r, status, code):
    assert r.status_code == status, (r.status_code, r.text[:300])
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == code, err
    assert "Traceback" not in r.text and 'File "' not in r.text
    return err


def test_disconnected_clients_cost_no_generation(server):
    start = len(server.log_text())
    busy, busy_out = in_background(post, server, {"prompt": "FAULT:slow busy", "steps": 10,
                                                  "response_format": "b64_json"}, "busy-a")
    server.wait_log(r"request busy-a: generating", start=start)
    waiting = [raw_request(server, {"prompt": f"gone {i}"}, f"gone-{i}") for i in (1, 2)]
    for i in (1, 2):
        server.wait_log(rf"request gone-{i}: queued", start=start)

    # the queue (MAX_QUEUE = 2) is full: the next request is refused at once
    t0 = time.monotonic()
    full = post(server, {"prompt": "one too many"}, "full-1")
    refused_in = time.monotonic() - t0
    check_error(full, 503, "server_busy")
    assert int(full.headers["Retry-After"]) >= 1 and refused_in < 2, refused_in

    for s in waiting:               # both waiting clients give up
        s.close()
    for i in (1, 2):
        server.wait_log(rf"request gone-{i}: client disconnected while queued", start=start,
                        timeout=10)
    # their places are free again: two new requests are queued (not refused) and served
    stay = [in_background(post, server, {"prompt": f"stay {i}", "response_format": "b64_json"},
                          f"stay-{i}") for i in (1, 2)]
    for i in (1, 2):
        server.wait_log(rf"request stay-{i}: (queued|generating)", start=start)
    busy.join(120)
    assert busy_out["result"].status_code == 200
    for t, out in stay:
        t.join(120)
        assert out["result"].status_code == 200, out

    # a client that goes away in the middle of its generation stops it
    mid = raw_request(server, {"prompt": "FAULT:slow mid", "steps": 20}, "gone-mid")
    server.wait_log(r"request gone-mid: step 2/20", start=start)
    mid.close()
    server.wait_log(r"request gone-mid: client disconnected during the generation", start=start,
                    timeout=10)
    assert post(server, {"prompt": "after", "response_format": "b64_json"}).status_code == 200

    log = server.log_text()[start:]
    for rid in ("gone-1", "gone-2"):
        assert f"request {rid}: generating" not in log      # never started
    assert "request gone-mid: done" not in log and "request gone-mid: step 20/20" not in log
    print(f"\nqueue full -> 503 in {refused_in * 1000:.0f} ms (Retry-After "
          f"{full.headers['Retry-After']} s); 2 queued clients that disconnected started no "
          f"generation; one that disconnected at step 2/20 was stopped")


def test_generation_that_runs_out_of_memory(server):
    assert post(server, {"prompt": "warm up", "response_format": "b64_json"}).status_code == 200
    pid = server.worker_pid()
    before = rss_kb(pid)
    start = len(server.log_text())
    r = post(server, {"prompt": "FAULT:oom please"}, "oom-1")
    err = check_error(r, 500, "out_of_memory")
    assert err["type"] == "server_error" and "oom-1" in err["message"]
    assert "alloc" not in r.text and "enforce" not in r.text       # no internals in the body
    server.wait_log(r"fault_wsgi: holding 256 MiB", start=start)
    server.wait_log(r"request oom-1: generation failed \(out of memory\)", start=start)
    assert "Traceback" in server.log_text()[start:]                 # the log has the details
    after = rss_kb(pid)
    assert after < before + 64 * 1024, (before, after)              # the 256 MiB are freed
    ok = post(server, {"prompt": "next one", "response_format": "b64_json"})
    assert ok.status_code == 200 and server.worker_pid() == pid
    print(f"\nout of memory -> 500; worker RSS {before >> 10} MiB before, {after >> 10} MiB "
          f"after (256 MiB were held); the next request succeeded on the same worker")


def _store_images(server, n=3) -> dict:
    r = post(server, {"prompt": "keep me", "n": n, "seed": 5, "response_format": "url"})
    assert r.status_code == 200, r.text
    out = {}
    for item in r.json()["data"]:
        d = requests.get(item["url"], headers=auth_headers(), timeout=30)
        assert d.status_code == 200
        out[item["url"]] = hashlib.sha256(d.content).hexdigest()
    return out


def _check_images(server, stored: dict) -> None:
    listed = requests.get(server.base + "/v1/files", headers=auth_headers(), timeout=30)
    ids = {f["id"] for f in listed.json()["data"]}
    for url, digest in stored.items():
        assert url.split("/")[-2] in ids
        d = requests.get(url, headers=auth_headers(), timeout=30)
        assert d.status_code == 200 and hashlib.sha256(d.content).hexdigest() == digest
    for f in listed.json()["data"]:          # every listed file is whole (a PNG that ends)
        d = requests.get(f"{server.base}/v1/files/{f['id']}/content", headers=auth_headers(),
                         timeout=30)
        assert d.status_code == 200 and len(d.content) == f["bytes"]
        assert d.content.startswith(b"\x89PNG") and d.content.endswith(b"IEND\xaeB`\x82")


def _kill_and_wait_for_replacement(server, old_pid: int) -> int:
    kill(old_pid)
    deadline = time.monotonic() + 120
    while True:
        pids = server.worker_pids()
        if pids and old_pid not in pids:
            break
        assert time.monotonic() < deadline, "no replacement worker"
        time.sleep(0.1)
    server.wait_healthy()
    assert server.proc.poll() is None                 # the master is still there
    return server.worker_pid()


def test_worker_killed_mid_generation(server):
    stored = _store_images(server)
    start = len(server.log_text())
    t, out = in_background(post, server, {"prompt": "FAULT:slow killed", "steps": 30}, "kill-1")
    server.wait_log(r"request kill-1: step 2/30", start=start)
    old = server.worker_pid()
    t0 = time.monotonic()
    new = _kill_and_wait_for_replacement(server, old)
    replaced_in = time.monotonic() - t0
    t.join(60)
    assert "error" in out or out["result"].status_code >= 500     # that request is lost
    assert new != old
    r = post(server, {"prompt": "after the kill", "response_format": "b64_json"})
    assert r.status_code == 200
    _check_images(server, stored)
    print(f"\nworker {old} killed at step 2/30; worker {new} serving after "
          f"{replaced_in:.1f} s; the next request succeeded; stored images intact")


def test_worker_killed_mid_write(server):
    stored = _store_images(server)
    data_dir = server.tmp / "data"
    start = len(server.log_text())
    t, out = in_background(post, server, {"prompt": "FAULT:slowsave half written",
                                          "response_format": "url"}, "kill-2")
    server.wait_log(r"fault_wsgi: holding a write", start=start)
    partial = [p for p in data_dir.glob("file-*/.tmp-*")]
    assert partial and partial[0].stat().st_size > 0            # the bytes are on disk
    partial_id = partial[0].parent.name
    _kill_and_wait_for_replacement(server, server.worker_pid())
    t.join(60)
    assert "error" in out or out["result"].status_code >= 500
    assert partial[0].exists()                                  # left behind by the crash, but
    r = requests.get(f"{server.base}/v1/files/{partial_id}", headers=auth_headers(), timeout=30)
    assert r.status_code == 404                                 # invisible
    listed = requests.get(server.base + "/v1/files", headers=auth_headers(), timeout=30).json()
    assert partial_id not in {f["id"] for f in listed["data"]}
    _check_images(server, stored)
    assert post(server, {"prompt": "after", "response_format": "url"}).status_code == 200
    print(f"\nworker killed while writing {partial[0].name} ({partial[0].stat().st_size} bytes):"
          f" nothing visible, stored images intact, next url request succeeded")
