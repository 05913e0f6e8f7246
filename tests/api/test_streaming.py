"""OpenAI's streamed image responses (api/streaming.py) and A1111's progress, interrupt and skip, on the Flask
app with the stub generation (tests/api_helpers.py: its "latent" at step k is k + 1 in every cell, and its
preview a grey picture of that level, so a preview tells which step it was made at)."""
from __future__ import annotations

import base64
import io
import json
import threading

import pytest
from PIL import Image

from api.streaming import partial_steps
from api_helpers import StubGenerate, error_of, make_app, png_bytes
from sdcore.pipeline import PipelineError

GEN, EDIT = "/v1/images/generations", "/v1/images/edits"


def events(resp) -> list[tuple[str, dict]]:
    """The server-sent events of a response, parsed as the SSE format defines them."""
    out = []
    for block in resp.get_data(as_text=True).split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if line and not line.startswith(":"))
        if fields:
            out.append((fields["event"], json.loads(fields["data"])))
    return out


def level(b64: str) -> int:
    return Image.open(io.BytesIO(base64.b64decode(b64))).convert("L").getpixel((0, 0))


@pytest.mark.parametrize("k,total,want", [(2, 6, [1, 3]), (3, 20, [4, 9, 14]), (1, 20, [9]), (3, 2, [0, 1]),
                                          (0, 20, []), (3, 1, [0])])
def test_partial_steps_are_evenly_spread_before_the_end(k, total, want):
    # the formula: preview j (1..k) after step round(j * total / (k + 1)), 1-based; none before the first step
    assert sorted(partial_steps(k, total)) == want
    assert sorted(partial_steps(k, total)) == sorted({round(j * total / (k + 1)) - 1 for j in range(1, k + 1)} - {-1})


def test_a_streamed_generation_sends_previews_then_the_same_image_as_without_stream(tmp_path):
    app, _ = make_app(tmp_path)
    c = app.test_client()
    body = {"prompt": "p", "size": "64x64", "steps": 6, "seed": 5}
    plain = c.post(GEN, json={**body, "response_format": "b64_json"}).get_json()
    r = c.post(GEN, json={**body, "stream": True, "partial_images": 2})
    assert r.status_code == 200 and r.mimetype == "text/event-stream"
    assert r.headers["Cache-Control"] == "no-cache" and r.headers["X-Accel-Buffering"] == "no"
    got = events(r)
    assert [e for e, _ in got] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    partials, (_, done) = [d for _, d in got[:2]], got[2]
    assert [p["partial_image_index"] for p in partials] == [0, 1]
    assert [level(p["b64_json"]) for p in partials] == [s + 1 for s in sorted(partial_steps(2, 6))]
    for event, d in got:
        assert (d["size"], d["output_format"], d["background"], d["quality"]) == ("64x64", "png", "opaque", "auto")
        assert isinstance(d["created_at"], int) and d["type"] == event
    assert done["b64_json"] == plain["data"][0]["b64_json"]
    usage = done["usage"]
    assert usage["output_tokens"] == 8 * 8 and usage["input_tokens_details"]["image_tokens"] == 0
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]


def test_a_streamed_edit_sends_image_edit_events_in_the_asked_format(tmp_path):
    app, _ = make_app(tmp_path)
    data = {"prompt": "p", "size": "64x64", "steps": "4", "stream": "true", "partial_images": "1",
            "output_format": "jpeg", "image": (io.BytesIO(png_bytes()), "i.png")}
    r = app.test_client().post(EDIT, data=data, content_type="multipart/form-data")
    got = events(r)
    assert [e for e, _ in got] == ["image_edit.partial_image", "image_edit.completed"]
    for _, d in got:
        assert base64.b64decode(d["b64_json"])[:3] == b"\xff\xd8\xff" and d["output_format"] == "jpeg"
    assert got[1][1]["usage"]["input_tokens_details"]["image_tokens"] == 8 * 8


def test_no_partial_images_means_only_the_completed_event(tmp_path):
    app, _ = make_app(tmp_path)
    got = events(app.test_client().post(GEN, json={"prompt": "p", "size": "64x64", "stream": True}))
    assert [e for e, _ in got] == ["image_generation.completed"]


@pytest.mark.parametrize("body,param,words", [
    ({"stream": True, "partial_images": 7}, "partial_images", "between 0 and 3"),
    ({"stream": True, "partial_images": -1}, "partial_images", "between 0 and 3"),
    ({"stream": "yes"}, "stream", "boolean"),
    ({"stream": True, "n": 2}, "n", "n=1"),
    ({"stream": True, "response_format": "url"}, "response_format", "b64_json"),
])
def test_bad_stream_requests_are_400s_before_any_event(tmp_path, body, param, words):
    app, stub = make_app(tmp_path)
    c = app.test_client()
    err = error_of(c.post(GEN, json={"prompt": "p", "size": "64x64", **body}), 400)
    assert err["param"] == param and words in err["message"], err
    assert not stub.calls
    assert c.post(GEN, json={"prompt": "p", "size": "64x64", "stream": True}).status_code == 200


def test_an_error_after_the_stream_started_is_an_error_event(tmp_path):
    app, _ = make_app(tmp_path, stub=StubGenerate(error=PipelineError("the lcm schedule allows at most 50 steps",
                                                                      "steps")))
    r = app.test_client().post(GEN, json={"prompt": "p", "size": "64x64", "stream": True})
    assert r.status_code == 200
    (event, data), = events(r)
    assert event == "error" and set(data) == {"error"}
    assert data["error"]["param"] == "steps" and "at most 50" in data["error"]["message"]


def test_a_full_queue_is_a_plain_503_not_a_stream(tmp_path):
    gate = threading.Event()
    stub = StubGenerate(gate=gate)
    app, _ = make_app(tmp_path, stub=stub, max_queue=0)
    c = app.test_client()
    busy = threading.Thread(target=lambda: c.post(GEN, json={"prompt": "busy", "size": "64x64"}))
    busy.start()
    try:
        assert stub.started.wait(5)
        err = error_of(c.post(GEN, json={"prompt": "p", "size": "64x64", "stream": True}), 503)
        assert err["code"] == "server_busy"
    finally:
        gate.set()
        busy.join(10)


# --- A1111's progress, interrupt and skip -------------------------------------------------------------------
class Paused(StubGenerate):
    """Stops after step ``at`` of the first image until ``go`` is set."""

    def __init__(self, at=2):
        super().__init__()
        self.at, self.reached, self.go = at, threading.Event(), threading.Event()
        self.seen = []            # (image, step index) of the steps run

    def __call__(self, model, params, progress=None):
        def paused(step):
            self.seen.append((step.image, step.index))
            progress(step)
            if (step.image, step.index) == (0, self.at):
                self.reached.set()
                self.go.wait(10)
        return super().__call__(model, params, paused)


def _background(fn):
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("r", fn()))
    t.start()
    return t, out


def test_progress_fraction_preview_and_interrupt(tmp_path):
    stub = Paused(at=3)
    app, _ = make_app(tmp_path, stub=stub)
    c = app.test_client()
    c.get("/sdapi/v1/progress")                  # someone watches: the steps make previews
    body = {"prompt": "p", "width": 64, "height": 64, "steps": 10, "n_iter": 2}
    t, out = _background(lambda: c.post("/sdapi/v1/txt2img", json=body))
    try:
        assert stub.reached.wait(10)
        p = c.get("/sdapi/v1/progress").get_json()
        assert p["state"]["sampling_step"] == 4 and p["state"]["sampling_steps"] == 10
        assert (p["state"]["job_count"], p["state"]["job_no"], p["state"]["job"]) == (2, 0, "Batch 1 out of 2")
        assert p["progress"] == pytest.approx((0 + 4 / 10) / 2) and p["eta_relative"] >= 0
        assert level(p["current_image"]) == 4            # the preview of step 4 (the stub's latent level)
        skipped = c.get("/sdapi/v1/progress?skip_current_image=true").get_json()
        assert skipped["current_image"] is None and skipped["state"]["sampling_step"] == 4
        health = c.get("/health").get_json()
        assert health["queue"] == {"waiting": 0, "running": True}
        assert [(j["step"], j["steps"], j["images"]) for j in health["jobs"]] == [(4, 10, 2)]
        assert c.post("/sdapi/v1/interrupt").get_json() == {}
    finally:
        stub.go.set()
        t.join(10)
    r = out["r"]
    assert r.status_code == 200 and len(r.get_json()["images"]) == 1          # the second image was not drawn
    assert stub.seen == [(0, k) for k in range(5)]                             # stopped at the next step
    assert c.get("/sdapi/v1/progress").get_json()["state"]["job_count"] == 0
    assert c.get("/health").get_json()["jobs"] == []


def test_skip_goes_on_with_the_next_image(tmp_path):
    stub = Paused(at=1)
    app, _ = make_app(tmp_path, stub=stub)
    c = app.test_client()
    body = {"prompt": "p", "width": 64, "height": 64, "steps": 4, "n_iter": 2}
    t, out = _background(lambda: c.post("/sdapi/v1/txt2img", json=body))
    try:
        assert stub.reached.wait(10)
        c.post("/sdapi/v1/skip")
    finally:
        stub.go.set()
        t.join(10)
    assert len(out["r"].get_json()["images"]) == 2
    # the stop is obeyed at the step after the pause: image 0 ends there, image 1 runs all its steps
    assert stub.seen == [(0, 0), (0, 1), (0, 2)] + [(1, k) for k in range(4)]


def test_interrupt_with_nothing_running_and_many_polls(tmp_path):
    app, stub = make_app(tmp_path)
    c = app.test_client()
    assert c.post("/sdapi/v1/interrupt").get_json() == {}
    assert c.post("/sdapi/v1/skip").status_code == 200
    # a stop asked while idle does not linger to stop the next generation
    r = c.post("/sdapi/v1/txt2img", json={"prompt": "p", "width": 64, "height": 64, "n_iter": 2, "steps": 3})
    assert len(r.get_json()["images"]) == 2
    results = []
    threads = [threading.Thread(target=lambda: results.append(c.get("/sdapi/v1/progress").status_code))
               for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert results == [200] * 50


def test_a_full_disk_costs_the_progress_report_not_the_generation(tmp_path, monkeypatch, caplog):
    import errno
    import os
    from pathlib import Path

    def full(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    app, _ = make_app(tmp_path)
    monkeypatch.setattr(Path, "write_bytes", full)
    r = app.test_client().post(GEN, json={"prompt": "p", "size": "64x64", "response_format": "b64_json"})
    assert r.status_code == 200 and len(r.get_json()["data"]) == 1
    assert "No space left on device" in caplog.text
