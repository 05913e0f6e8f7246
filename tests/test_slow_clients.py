"""Slow, idle and half-open clients cannot starve the server (api/worker.py): 200 connections that trickle
their headers, announce a body and never send it, stay silent, or sit idle after a keep-alive request,
while /health and a 1-step generation are served normally; then every one of them is cut off at its limit.
The same through the shipped nginx site. And a 10 MB upload that is merely slow still works."""
import io
import json
import re
import socket
import threading
import time

import pytest
import requests
from PIL import Image

from server_helpers import API_KEY, NGINX, ROOT, Gunicorn, auth_headers, nginx_in_front, require_pipeline

PER_KIND = 50
LIMIT_S = 6             # every read limit in these tests; the battery's checks run well within it
KINDS = ("trickle", "no-body", "silent", "idle")


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


def _open(port: int, kind: str) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    if kind == "trickle":
        s.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\n")
    elif kind == "no-body":
        s.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n{\"prompt\": ")
    elif kind == "idle":
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            head += s.recv(4096)
        assert head.startswith(b"HTTP/1.1 200"), head[:100]
        length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))
        body = head.partition(b"\r\n\r\n")[2]
        while len(body) < length:
            body += s.recv(4096)
    return s


class Battery:
    """PER_KIND connections of each kind; the trickling ones send a header byte every second."""

    def __init__(self, port: int):
        self.socks = {kind: [_open(port, kind) for _ in range(PER_KIND)] for kind in KINDS}
        self.stop = threading.Event()
        self.trickler = threading.Thread(target=self._trickle, daemon=True)
        self.trickler.start()

    def _trickle(self):
        while not self.stop.wait(1.0):
            for s in self.socks["trickle"]:
                try:
                    s.send(b"X")
                except OSError:
                    pass

    def still_open(self) -> dict:
        """Per kind, how many connections the server has not closed (nothing to read, no EOF)."""
        out = {}
        for kind, socks in self.socks.items():
            n = 0
            for s in socks:
                s.setblocking(False)
                try:
                    s.recv(1, socket.MSG_PEEK)          # b"" (closed) or bytes (an answer): not waiting
                except BlockingIOError:
                    n += 1
                except OSError:
                    pass
            out[kind] = n
        return out

    def wait_closed(self, timeout: float) -> dict:
        """Per kind: (connections the server closed, of which with a 408 answer first)."""
        out = {}
        for kind, socks in self.socks.items():
            closed = answered = 0
            for s in socks:
                s.settimeout(timeout)
                got = b""
                try:
                    while chunk := s.recv(65536):
                        got += chunk
                    closed += 1
                except ConnectionResetError:
                    closed += 1
                except (socket.timeout, OSError):
                    pass
                answered += got.startswith(b"HTTP/1.1 408")
            out[kind] = (closed, answered)
        return out

    def close(self):
        self.stop.set()
        self.trickler.join(5)
        for socks in self.socks.values():
            for s in socks:
                s.close()


def _health_and_generation(base: str):
    h = requests.get(base + "/health", timeout=10)
    g = requests.post(base + "/v1/images/generations", headers=auth_headers(), timeout=30,
                      json={"prompt": "a red circle", "size": "64x64", "steps": 1, "response_format": "b64_json"})
    return h.status_code, g.status_code, g.json()


def test_200_slow_connections_do_not_starve_the_server_and_are_cut_at_their_limits(server):
    start = len(server.log_text())
    battery = Battery(server.port)
    try:
        health, gen, body = _health_and_generation(server.base)
        open_meanwhile = battery.still_open()
        assert health == 200 and gen == 200 and body["data"][0]["b64_json"], body
        assert open_meanwhile == {kind: PER_KIND for kind in KINDS}, open_meanwhile     # served *while* they held on
        closed = battery.wait_closed(timeout=4 * LIMIT_S)
    finally:
        battery.close()
    assert closed == {"trickle": (PER_KIND, PER_KIND), "no-body": (PER_KIND, PER_KIND),
                      "silent": (PER_KIND, 0), "idle": (PER_KIND, 0)}, closed
    # logged once per sweep with counts, not once per connection or per byte
    log = server.log_text()[start:]
    lines = re.findall(r"closed (\d+) slow connection\(s\): (.*)", log)
    heads = sum(int(n) for _, what in lines for n in re.findall(r"(\d+) headers not complete", what))
    bodies = sum(int(n) for _, what in lines for n in re.findall(r"(\d+) body stalled", what))
    assert (heads, bodies) == (2 * PER_KIND, PER_KIND), lines
    assert len(lines) < 2 * PER_KIND, lines
    assert requests.get(server.base + "/health", timeout=10).status_code == 200


def _noise_png(target_bytes: int) -> bytes:
    side = int((target_bytes / 3) ** 0.5) + 1
    im = Image.frombytes("RGB", (side, side), __import__("os").urandom(side * side * 3))
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
        battery = Battery(port)
        try:
            health, gen, body = _health_and_generation(base)
            open_meanwhile = battery.still_open()
            assert health == 200 and gen == 200 and body["data"][0]["b64_json"], body
            assert open_meanwhile == {kind: PER_KIND for kind in KINDS}, open_meanwhile
            closed = battery.wait_closed(timeout=4 * LIMIT_S)
        finally:
            battery.close()
        assert {kind: n for kind, (n, _) in closed.items()} == {kind: PER_KIND for kind in KINDS}, closed
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
        held = [_open(port, "no-body") for _ in range(limit)]
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
