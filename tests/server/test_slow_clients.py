"""Slow, idle and half-open clients cannot starve the server (api/worker.py): 200 connections that trickle
their headers, announce a body and never send it, stay silent, or sit idle after a keep-alive request,
while /health and a 1-step generation are served normally; then every one of them is cut off at its limit.
The same through the shipped nginx site. And a 10 MB upload that is merely slow still works."""
import io
import os
import json
import re
import socket
import time

import pytest
import requests
from PIL import Image

from bench.harness import (API_KEY, NGINX, ROOT, SLOW_KINDS, Gunicorn, SlowClients, auth_headers, nginx_in_front,
                           open_slow, require_pipeline)

PER_KIND = 50
LIMIT_S = 6             # every read limit in these tests; the battery's checks run well within it


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    require_pipeline()
    tmp = tmp_path_factory.mktemp("slow")
    srv = Gunicorn(tmp / "data", tmp / "gunicorn.log", SD_HEADER_TIMEOUT=str(LIMIT_S),
                   SD_BODY_TIMEOUT=str(LIMIT_S), SD_KEEPALIVE=str(LIMIT_S), SD_LOG_LEVEL="info")
    srv.tmp = tmp
    srv.wait_healthy()
    yield srv
    srv.stop()


def _health_and_generation(base: str):
    h = requests.get(base + "/health", timeout=10)
    g = requests.post(base + "/v1/images/generations", headers=auth_headers(), timeout=30,
                      json={"prompt": "a red circle", "size": "64x64", "steps": 1, "response_format": "b64_json"})
    return h.status_code, g.status_code, g.json()


def test_200_slow_connections_do_not_starve_the_server_and_are_cut_at_their_limits(server):
    start = len(server.log_text())
    battery = SlowClients(server.port, PER_KIND)
    try:
        health, gen, body = _health_and_generation(server.base)
        open_meanwhile = battery.still_open()
        assert health == 200 and gen == 200 and body["data"][0]["b64_json"], body
        assert open_meanwhile == {kind: PER_KIND for kind in SLOW_KINDS}, open_meanwhile     # served *while* they held on
        closed = battery.wait_closed(timeout=4 * LIMIT_S)
    finally:
        battery.close()
    assert closed == {"trickle": (PER_KIND, PER_KIND), "no-body": (PER_KIND, PER_KIND),
                      "silent": (PER_KIND, 0), "idle": (PER_KIND, 0)}, closed
    # logged once per sweep with counts, not once per connection or per byte; the line is written after
    # the sockets close and reaches the log file through a copying thread, so it may lag the clients
    deadline = time.monotonic() + 10
    while True:
        lines = re.findall(r"closed (\d+) slow connection\(s\): (.*)", server.log_text()[start:])
        heads = sum(int(n) for _, what in lines for n in re.findall(r"(\d+) headers not complete", what))
        bodies = sum(int(n) for _, what in lines for n in re.findall(r"(\d+) body stalled", what))
        if (heads, bodies) == (2 * PER_KIND, PER_KIND) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert (heads, bodies) == (2 * PER_KIND, PER_KIND), lines
    assert len(lines) < 2 * PER_KIND, lines
    assert requests.get(server.base + "/health", timeout=10).status_code == 200


def _noise_png(target_bytes: int) -> bytes:
    side = int((target_bytes / 3) ** 0.5) + 1
    im = Image.frombytes("RGB", (side, side), os.urandom(side * side * 3))
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=0)
    return buf.getvalue()


def test_a_slow_10mb_upload_within_the_limits_works(server):
    """The body takes longer than every limit in all, but never stalls for one: it is served."""
    png = _noise_png(10 << 20)
    boundary = "sdslowupload"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in (("prompt", "a blue square"), ("size", "64x64"), ("steps", "1"),
                          ("response_format", "b64_json"))]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="big.png"\r\n'
                 f"Content-Type: image/png\r\n\r\n".encode() + png + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    head = (f"POST /v1/images/edits HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n\r\n").encode()
    step = len(body) // 40
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as s:
        s.sendall(head)
        for i in range(0, len(body), step):
            s.sendall(body[i:i + step])
            time.sleep(LIMIT_S * 2 / 40)            # in all twice the limit; each pause far below it
        took = time.monotonic() - t0
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    assert took > LIMIT_S, took
    assert reply.startswith(b"HTTP/1.1 200"), reply[:300]
    assert json.loads(reply.partition(b"\r\n\r\n")[2])["data"][0]["b64_json"]


@pytest.mark.skipif(NGINX is None, reason="nginx is not installed (.ci/run installs it)")
def test_the_same_through_the_shipped_nginx_site(server):
    """nginx's own limits (client_header_timeout, client_body_timeout, keepalive_timeout, set in
    deploy/nginx.conf) cut the slow clients; it hands gunicorn only whole requests."""
    site = {"client_header_timeout": f"{LIMIT_S}s", "client_body_timeout": f"{LIMIT_S}s",
            "keepalive_timeout": f"{LIMIT_S}s",
            "limit_conn": "sd_api_per_address 1000"}     # the battery comes from one address
    tmp = server.tmp / "nginx"
    tmp.mkdir(exist_ok=True)
    with nginx_in_front(server, tmp, site, worker_connections=1024) as (base, port):
        battery = SlowClients(port, PER_KIND)
        try:
            health, gen, body = _health_and_generation(base)
            open_meanwhile = battery.still_open()
            assert health == 200 and gen == 200 and body["data"][0]["b64_json"], body
            assert open_meanwhile == {kind: PER_KIND for kind in SLOW_KINDS}, open_meanwhile
            closed = battery.wait_closed(timeout=4 * LIMIT_S)
        finally:
            battery.close()
        assert {kind: n for kind, (n, _) in closed.items()} == {kind: PER_KIND for kind in SLOW_KINDS}, closed
        assert requests.get(base + "/health", timeout=10).status_code == 200


@pytest.mark.skipif(NGINX is None, reason="nginx is not installed (.ci/run installs it)")
def test_nginx_limits_requests_in_progress_per_address(server):
    """The shipped site's limit_conn: past 32 requests in progress from one address, a 429 in the API's
    error shape (requests whose body stalls count: their headers are in)."""
    tmp = server.tmp / "nginx-limit"
    tmp.mkdir(exist_ok=True)
    limit = int(re.search(r"(?m)^    limit_conn sd_api_per_address (\d+);", (ROOT / "deploy" / "nginx.conf")
                          .read_text()).group(1))
    with nginx_in_front(server, tmp, worker_connections=256) as (base, port):
        held = [open_slow(port, "no-body") for _ in range(limit)]
        try:
            r = requests.post(base + "/v1/images/generations", headers=auth_headers(), timeout=10,
                              json={"prompt": "x", "size": "64x64", "steps": 1})
            assert r.status_code == 429 and r.headers["Retry-After"], r.text
            assert r.json()["error"]["code"] == "too_many_connections"
        finally:
            for s in held:
                s.close()
        deadline = time.monotonic() + 10           # nginx notices the closed ones, then serves again
        while requests.get(base + "/health", timeout=10).status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.2)


def test_a_generation_longer_than_every_read_limit_is_served(tmp_path):
    """The limits are for reading a request and for idle time between requests: a generation that takes
    longer than all of them together, and the next request on the same kept-alive connection, are served."""
    require_pipeline()
    srv = Gunicorn(tmp_path / "data", tmp_path / "gunicorn.log", SD_HEADER_TIMEOUT="1", SD_BODY_TIMEOUT="1",
                   SD_KEEPALIVE="1")
    try:
        srv.wait_healthy()
        with requests.Session() as s:
            r = s.post(srv.base + "/v1/images/generations", headers={**auth_headers(), "X-Request-Id": "long"},
                       timeout=300, json={"prompt": "a red circle", "size": "256x256", "steps": 60,
                                          "sample_method": "euler", "response_format": "b64_json"})
            assert r.status_code == 200 and r.json()["data"][0]["b64_json"], r.text[:300]
            took = float(srv.wait_log(r"request long: done in ([0-9.]+) s").group(1))
            assert took > 3, f"the generation took {took} s: not longer than the three 1 s limits"
            assert s.get(srv.base + "/health", timeout=10).status_code == 200     # the same connection, at once
        assert "slow connection" not in srv.log_text()
    finally:
        srv.stop()
