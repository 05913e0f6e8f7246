"""Overload behind deploy/nginx.conf (the production path): a client of nginx that disconnects
while its request waits in the queue costs no generation (nginx closes its upstream connection,
which the app sees), and the app's 503 with Retry-After reaches the client through nginx.
Skips only when nginx is not installed (.ci/run installs it)."""
import json
import socket
import threading

import pytest
import requests

from bench.harness import NGINX, auth_headers, nginx_in_front, server_fixture

pytestmark = pytest.mark.skipif(NGINX is None, reason="nginx is not installed")
GEN = "/v1/images/generations"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    srv = server_fixture(tmp_path_factory, "nginx-overload", app="fault_wsgi:app",
                         SD_MAX_QUEUE="1", SD_HTTP_THREADS="6")
    try:
        with nginx_in_front(srv, srv.tmp) as (base, port):
            yield base, port, srv
    finally:
        srv.stop()


def test_disconnect_and_busy_through_nginx(stack):
    base, port, srv = stack
    start = len(srv.log_text())
    out = {}

    def busy():
        out["r"] = requests.post(base + GEN, timeout=120, headers=auth_headers(), json={
            "prompt": "FAULT:slow busy", "size": "64x64", "steps": 8,
            "response_format": "b64_json"})

    t = threading.Thread(target=busy, daemon=True)
    t.start()
    m = srv.wait_log(r"request ([0-9a-f]{32}|[\w.-]+): generating", start=start)
    body = json.dumps({"prompt": "gone through nginx", "size": "64x64", "steps": 1}).encode()
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall((f"POST {GEN} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer test-key\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
              + body)
    queued = srv.wait_log(r"request ([\w.-]+): queued", start=m.end())
    rid = queued.group(1)                            # nginx's $request_id
    full = requests.post(base + GEN, timeout=30, headers=auth_headers(),
                         json={"prompt": "no room", "size": "64x64", "steps": 1})
    assert full.status_code == 503 and int(full.headers["Retry-After"]) >= 1
    assert full.json()["error"]["code"] == "server_busy"
    s.close()                                        # the client of nginx goes away
    srv.wait_log(rf"request {rid}: client disconnected while queued", start=start, timeout=10)
    t.join(120)
    assert out["r"].status_code == 200
    assert f"request {rid}: generating" not in srv.log_text()[start:]
