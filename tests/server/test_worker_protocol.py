"""The request-buffering worker (api/worker.py) speaks HTTP/1.1 as gunicorn's own workers do: pipelined
requests, Expect: 100-continue, bodies over the limit refused before they are read, malformed framing
and ambiguous framing refused, and the worker survives all of it."""
import json
import socket
import time

import pytest

from bench.harness import API_KEY, read_response, server_fixture

GEN = b"/v1/images/generations"
BODY = json.dumps({"prompt": "a red circle", "size": "64x64", "steps": 1, "response_format": "b64_json"}).encode()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = server_fixture(tmp_path_factory, "protocol", SD_MAX_UPLOAD_BYTES=str(1 << 20))
    srv.first_worker = srv.worker_pid()
    yield srv
    srv.stop()


def _connect(server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=30)


def _statuses(data: bytes) -> list[int]:
    """Status codes of the responses in ``data``, in order (bodies here are JSON, never "HTTP/1.1 ")."""
    return [int(part[:3]) for part in data.split(b"HTTP/1.1 ")[1:]]


def _read_until_closed(s: socket.socket) -> bytes:
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    return data


def test_pipelined_requests_are_answered_in_order(server):
    with _connect(server) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
                  b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"                       # no key: 401
                  b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert _statuses(_read_until_closed(s)) == [200, 401, 200]


def test_expect_100_continue_gets_one_interim_answer_then_the_response(server):
    with _connect(server) as s:
        s.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\nContent-Type: application/json\r\n"
                  b"Expect: 100-continue\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                  % (GEN, API_KEY.encode(), len(BODY)))
        assert s.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        s.sendall(BODY)
        data = _read_until_closed(s)
    assert _statuses(data) == [200], data[:200]
    assert json.loads(data.partition(b"\r\n\r\n")[2])["data"][0]["b64_json"]


def test_a_body_over_the_limit_is_refused_from_its_headers(server):
    """413 in the API's shape without the body being sent at all."""
    with _connect(server) as s:
        s.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % (GEN, API_KEY.encode(), 100 << 20))
        status, _, body = read_response(s)
    assert status == 413 and json.loads(body)["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("request_bytes, status", [
    (b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
    (b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", 400),
    (b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"0\r\n\r\n", 400),
    (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n", 431),
    (b"GET /health HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(120)) + b"\r\n", 431),
])
def test_malformed_or_ambiguous_framing_is_refused(server, request_bytes, status):
    """Oversized headers: gunicorn's parser; a bad chunk size, two lengths, or a length and a transfer
    coding (how requests are smuggled past a proxy): the worker itself, before the app sees them."""
    with _connect(server) as s:
        s.sendall(request_bytes)
        data = _read_until_closed(s)
    assert _statuses(data) == [status], data[:200]


def test_the_worker_survived(server):
    time.sleep(0.5)
    assert server.worker_pid() == server.first_worker
    assert "Traceback" not in server.log_text()
