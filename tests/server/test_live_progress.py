"""Watching and stopping generations through a real gunicorn (two workers) and the shipped nginx site: the
official ``openai`` client reading streamed generations and edits, errors inside a stream, a client that
leaves mid-stream, and A1111's progress and interrupt answered by whichever worker. The app is
``tests/fault_wsgi.py`` (the real app and tiny model; a "FAULT:slow" prompt makes each step 0.4 s longer, so
that a poll or a stop lands in the middle of a generation)."""
from __future__ import annotations

import base64
import io
import json
import re
import socket
import threading
import time

import openai
import pytest
import requests
from openai import OpenAI
from PIL import Image

from bench.harness import API_KEY, NGINX, auth_headers, nginx_in_front, server_fixture

BODY = {"steps": 6, "seed": 11, "sample_method": "euler"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    srv = server_fixture(tmp_path_factory, "live", app="fault_wsgi:app", SD_WORKERS="2", SD_THREADS="1",
                         SD_HTTP_THREADS="8")
    try:
        while srv.log_text().count("Balancing load in slot") < 2:       # both workers up
            time.sleep(0.2)
        if NGINX is None:
            yield srv, None
        else:
            with nginx_in_front(srv, srv.tmp) as (base, _):
                yield srv, base
    finally:
        srv.stop()


def bases(stack):
    srv, nginx = stack
    return [srv.base] + ([nginx] if nginx else [])


def client(base) -> OpenAI:
    return OpenAI(base_url=f"{base}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def png(size=(64, 64), colour=(200, 40, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def test_the_openai_client_reads_streamed_generations_and_edits(stack):
    for base in bases(stack):
        c = client(base)
        plain = c.images.generate(prompt="a red circle", size="64x64", response_format="b64_json", extra_body=BODY)
        got = list(c.images.generate(prompt="a red circle", size="64x64", stream=True, partial_images=2,
                                     extra_body=BODY))
        assert [e.type for e in got] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
        assert [e.partial_image_index for e in got[:2]] == [0, 1]
        for e in got[:2]:
            assert Image.open(io.BytesIO(base64.b64decode(e.b64_json))).size == (64, 64)
        assert got[-1].b64_json == plain.data[0].b64_json                 # the same pixels and infotext
        assert got[-1].usage.output_tokens == 64 and got[-1].size == "64x64"

        edits = list(c.images.edit(image=("in.png", png(), "image/png"), prompt="a blue square", size="64x64",
                                   stream=True, partial_images=1, extra_body={**BODY, "strength": 1.0}))
        assert [e.type for e in edits] == ["image_edit.partial_image", "image_edit.completed"]
        plain_edit = c.images.edit(image=("in.png", png(), "image/png"), prompt="a blue square", size="64x64",
                                   response_format="b64_json", extra_body={**BODY, "strength": 1.0})
        assert edits[-1].b64_json == plain_edit.data[0].b64_json


def test_an_error_inside_the_stream_is_raised_by_the_client(stack):
    for base in bases(stack):
        stream = client(base).images.generate(prompt="p", size="64x64", stream=True,
                                              extra_body={"scheduler": "lcm", "steps": 51})
        with pytest.raises(openai.APIError, match="at most 50 steps"):
            list(stream)
        # the server goes on
        assert client(base).images.generate(prompt="p", size="64x64", response_format="b64_json",
                                            extra_body=BODY).data[0].b64_json


@pytest.mark.skipif(NGINX is None, reason="nginx is not installed")
def test_nginx_passes_each_event_on_at_once(stack):
    srv, base = stack
    start = len(srv.log_text())
    stream = client(base).images.generate(prompt="FAULT:slow a green triangle", size="64x64", stream=True,
                                          partial_images=1, extra_body={**BODY, "steps": 8})
    first = next(iter(stream))
    assert first.type == "image_generation.partial_image"
    # the preview came while the generation still ran: nginx did not hold it back until the end
    log = srv.log_text()[start:]
    assert "step 4/8" in log and "done in" not in log, log[-2000:]
    assert [e.type for e in stream] == ["image_generation.completed"]


def steps_logged(log: str, rid: str) -> list[int]:
    return [int(m) for m in re.findall(rf"request {re.escape(rid)}: step (\d+)/", log)]


def test_a_client_leaving_a_stream_stops_its_generation_within_a_step(stack):
    srv, _ = stack
    body = json.dumps({"prompt": "FAULT:slow leaving", "size": "64x64", "steps": 20, "stream": True,
                       "partial_images": 3, "sample_method": "euler"}).encode()
    head = (f"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"X-Request-Id: leaving\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=60)
    s.sendall(head.encode() + body)
    seen = b""
    while b"partial_image" not in seen:
        seen += s.recv(65536)
    assert seen.startswith(b"HTTP/1.1 200") and b"text/event-stream" in seen
    at_close = max(steps_logged(srv.log_text(), "leaving"))
    s.close()
    t0 = time.monotonic()
    srv.wait_log(r"request leaving: client disconnected during the generation", timeout=20)
    freed = time.monotonic() - t0
    after = [k for k in steps_logged(srv.log_text(), "leaving") if k > at_close]
    assert len(after) <= 1, after          # at most the step that was running when it left
    assert max(steps_logged(srv.log_text(), "leaving")) < 20
    r = requests.post(srv.base + "/v1/images/generations", headers=auth_headers(), timeout=60,
                      json={"prompt": "next", "size": "64x64", "response_format": "b64_json", **BODY})
    assert r.status_code == 200
    print(f"\nstream left at step {at_close}/20; generation stopped after {len(after)} more step(s), "
          f"{freed:.2f} s after the close")


def test_progress_and_interrupt_from_either_worker(stack):
    srv, _ = stack
    auth = auth_headers()
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("r", requests.post(
        srv.base + "/sdapi/v1/txt2img", headers=auth, timeout=120,
        json={"prompt": "FAULT:slow interrupted", "width": 64, "height": 64, "steps": 20, "n_iter": 2,
              "sampler_name": "Euler"})))
    start = len(srv.log_text())
    t.start()
    srv.wait_log(r"step 3/20", start=start, timeout=30)
    # the other worker answers these (the busy one has a request in flight): it sees the job all the same
    health = requests.get(srv.base + "/health", timeout=10).json()
    assert health["queue"]["running"] is False and len(health["jobs"]) == 1, health
    p = requests.get(srv.base + "/sdapi/v1/progress", headers=auth, timeout=10).json()
    assert 3 <= p["state"]["sampling_step"] <= 20 and p["state"]["job_count"] == 2 and 0 < p["progress"] < 0.5
    rid = re.search(r"request (\S+): step 3/20", srv.log_text()[start:]).group(1)
    at_stop = max(steps_logged(srv.log_text(), rid))
    assert requests.post(srv.base + "/sdapi/v1/interrupt", headers=auth, timeout=10).json() == {}
    t.join(120)
    r = out["r"]
    assert r.status_code == 200 and len(r.json()["images"]) == 1      # finished early, no second image
    after = [k for k in steps_logged(srv.log_text(), rid) if k > at_stop]
    assert len(after) <= 1, after
    assert "interrupt asked" in srv.log_text()[start:]
    polls = []
    threads = [threading.Thread(target=lambda: polls.append(
        requests.get(srv.base + "/sdapi/v1/progress", headers=auth, timeout=30).status_code)) for _ in range(50)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert polls == [200] * 50
    idle = requests.get(srv.base + "/sdapi/v1/progress", headers=auth, timeout=10).json()
    assert idle["state"]["job_count"] == 0
    r = requests.post(srv.base + "/sdapi/v1/txt2img", headers=auth, timeout=60,
                      json={"prompt": "after", "width": 64, "height": 64, "steps": 2, "n_iter": 2})
    assert len(r.json()["images"]) == 2
