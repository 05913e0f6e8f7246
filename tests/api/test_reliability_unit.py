"""Reliability pieces in isolation (no gunicorn): the generation queue (first come first served,
bounded, clients that went away are dropped), the disconnect probe on real sockets, failures
inside a generation (500, memory freed), storage failures (507/500, all or nothing), chunked
bodies, and a property-based check of the retention sweep."""
import errno
import io
import os
import socket
import threading
import time
import weakref

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from api import storage
from api.disconnect import ClientGone, client_gone_probe
from api.queue import GenerationQueue
from api.storage import ImageStore, valid_id
from api_helpers import StubGenerate, error_of, make_app, png_bytes
from sdcore.pipeline import Step

GEN = "/v1/images/generations"


class P:
    """Minimal GenerationParams for GenerationQueue.run; ``tag`` tells the requests apart."""

    def __init__(self, tag, n=1):
        self.tag, self.n, self.width, self.height, self.steps = tag, n, 64, 64, 3
        self.sample_method, self.scheduler, self.seed = "euler", None, 1


# --- the queue ------------------------------------------------------------------------------------
def test_queue_is_first_come_first_served():
    order, gate = [], threading.Event()

    def generate(model, p, progress=None):
        if p.tag == "first":
            gate.wait(10)
        order.append(p.tag)
        return [object()] * p.n

    gen = GenerationQueue(generate, max_queue=10, poll_s=0.01)
    threads = [threading.Thread(target=gen.run, args=(None, P("first")))]
    threads[0].start()
    while not gen._running:
        time.sleep(0.001)
    for i in range(6):                       # arrive one after the other
        t = threading.Thread(target=gen.run, args=(None, P(f"r{i}")))
        t.start()
        threads.append(t)
        while gen.waiting < i + 1:
            time.sleep(0.001)
    gate.set()
    for t in threads:
        t.join(10)
    assert order == ["first"] + [f"r{i}" for i in range(6)]


def test_full_queue_is_503_at_once_and_gone_clients_free_their_place():
    gate, calls = threading.Event(), []

    def generate(model, p, progress=None):
        calls.append(p.tag)
        gate.wait(10)
        return [object()]

    gen = GenerationQueue(generate, max_queue=1, poll_s=0.01)
    gone = threading.Event()
    results = {}

    def run(rid, probe=None):
        try:
            results[rid] = gen.run(None, P(rid), request_id=rid, client_gone=probe)
        except Exception as e:      # noqa: BLE001
            results[rid] = e

    a = threading.Thread(target=run, args=("a",))
    a.start()
    while not calls:
        time.sleep(0.001)
    b = threading.Thread(target=run, args=("b", gone.is_set))
    b.start()
    while gen.waiting < 1:
        time.sleep(0.001)
    t0 = time.monotonic()
    with pytest.raises(Exception) as busy:
        gen.run(None, P("c"))
    assert busy.value.status == 503 and busy.value.headers["Retry-After"] == "10"
    assert time.monotonic() - t0 < 0.5
    gone.set()                               # b's client goes away while waiting
    b.join(5)
    assert isinstance(results["b"], ClientGone) and gen.waiting == 0
    d = threading.Thread(target=run, args=("d",))
    d.start()                                # b's place is free again
    while gen.waiting < 1:
        time.sleep(0.001)
    gate.set()
    a.join(5)
    d.join(5)
    assert calls == ["a", "d"]               # b never generated
    assert gen.last_duration is not None and int(gen._retry_after()) >= 1


def test_client_gone_stops_a_running_generation_between_steps():
    steps = []
    gone = threading.Event()

    def generate(model, p, progress=None):
        for i in range(100):
            steps.append(i)
            if i == 3:
                gone.set()
            progress(Step(i, 100, 0.0, 0, 1, None))
        return [object()]

    gen = GenerationQueue(generate)
    with pytest.raises(ClientGone):
        gen.run(None, P("x"), client_gone=gone.is_set)
    assert steps == [0, 1, 2, 3] and not gen._running


def test_client_gone_before_start_costs_nothing():
    stub = StubGenerate()
    with pytest.raises(ClientGone):
        GenerationQueue(stub).run(None, P("x"), client_gone=lambda: True)
    assert stub.calls == []


def test_client_gone_is_499_in_the_app(tmp_path, monkeypatch):
    from api import routes_openai
    app, stub = make_app(tmp_path)
    monkeypatch.setattr(routes_openai, "client_gone_probe", lambda environ: (lambda: True))
    err = error_of(app.test_client().post(GEN, json={"prompt": "p", "size": "64x64"}), 499)
    assert err["code"] == "client_closed_request" and stub.calls == []


# --- the disconnect probe on real sockets ---------------------------------------------------------
def test_probe_on_real_sockets():
    server, client = socket.socketpair()
    try:
        probe = client_gone_probe({"gunicorn.socket": server})
        assert probe() is False                      # connected, nothing to read
        client.sendall(b"GET / HTTP/1.1\r\n")        # a pipelined request: still there
        assert probe() is False
        assert server.recv(100).startswith(b"GET")   # the peek consumed nothing
        client.shutdown(socket.SHUT_WR)              # FIN
        assert probe() is True
    finally:
        server.close()
        client.close()
    assert probe() is True                           # a closed socket: gone


def test_probe_over_tcp_detects_close_and_reset():
    lsock = socket.create_server(("127.0.0.1", 0))
    try:
        for how in ("close", "reset"):
            c = socket.create_connection(lsock.getsockname())
            s, _ = lsock.accept()
            probe = client_gone_probe({"gunicorn.socket": s})
            assert probe() is False
            if how == "reset":
                c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
            c.close()
            deadline = time.monotonic() + 2
            while not probe() and time.monotonic() < deadline:
                time.sleep(0.01)
            assert probe() is True, how
            s.close()
    finally:
        lsock.close()


def test_no_probe_without_a_socket():
    assert client_gone_probe({}) is None


# --- failures inside a generation -----------------------------------------------------------------
class Big:
    """Stands for the tensors a failing generation holds."""


@pytest.mark.parametrize("exc,code", [
    (MemoryError(), "out_of_memory"),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate "
                  "memory: you tried to allocate 274877906944 bytes."), "out_of_memory"),
    (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), "out_of_memory"),
    (ZeroDivisionError("secret detail"), "generation_failed"),
])
def test_failed_generation_is_500_and_frees_its_memory(tmp_path, caplog, exc, code):
    refs = []

    class Failing(StubGenerate):
        def __call__(self, model, params, progress=None):
            held = Big()
            refs.append(weakref.ref(held))
            self_cycle = [held]
            self_cycle.append(self_cycle)        # a reference cycle, as tracebacks make
            raise exc

    app, _ = make_app(tmp_path, stub=Failing())
    c = app.test_client()
    r = c.post(GEN, json={"prompt": "p", "size": "64x64"}, headers={"X-Request-Id": "fail-1"})
    err = error_of(r, 500)
    assert (err["type"], err["code"]) == ("server_error", code) and "fail-1" in err["message"]
    text = r.get_data(as_text=True)
    assert "secret" not in text and "alloc" not in text and "Traceback" not in text
    assert refs[0]() is None, "the failed generation's objects are still alive"
    assert "request fail-1: generation failed" in caplog.text
    assert c.post(GEN, json={"prompt": "p", "size": "64x64"}).status_code == 500  # not stuck
    gen = app.extensions["sd_api_server"].queue
    assert not gen._running and gen.waiting == 0


# --- storage failures -----------------------------------------------------------------------------
@pytest.mark.parametrize("err,status,code", [(errno.ENOSPC, 507, "insufficient_storage"),
                                             (errno.EDQUOT, 507, "insufficient_storage"),
                                             (errno.EFBIG, 507, "insufficient_storage"),
                                             (errno.EIO, 500, "storage_error")])
def test_storage_failure(tmp_path, monkeypatch, err, status, code):
    app, _ = make_app(tmp_path)
    store = app.extensions["sd_api_server"].store
    real_save, saved = store.save, []

    def save(data, filename):               # the second image of n=2 fails
        if saved:
            raise OSError(err, os.strerror(err))
        saved.append(real_save(data, filename))
        return saved[-1]

    monkeypatch.setattr(store, "save", save)
    c = app.test_client()
    r = c.post(GEN, json={"prompt": "p", "size": "64x64", "n": 2})
    e = error_of(r, status)
    assert (e["type"], e["code"]) == ("server_error", code)
    assert saved and store.get(saved[0].id) is None          # the first one was undone
    assert [p.name for p in (tmp_path / "data").iterdir()] == [".jobs"]     # only the (empty) job board
    assert list((tmp_path / "data" / ".jobs").iterdir()) == []
    ok = c.post(GEN, json={"prompt": "p", "size": "64x64", "n": 2, "response_format": "b64_json"})
    assert ok.status_code == 200


def test_store_recreates_a_removed_root(tmp_path):
    st_ = ImageStore(tmp_path / "d", ttl=100)
    (tmp_path / "d").rmdir()
    assert st_.get(st_.save(b"x", "x.png").id) is not None


def test_ids_are_128_random_bits(monkeypatch):
    seen = []
    real = storage.secrets.token_hex
    monkeypatch.setattr(storage.secrets, "token_hex", lambda n: seen.append(n) or real(n))
    st_ = ImageStore(__import__("tempfile").mkdtemp(), ttl=100)
    ids = {st_.save(b"x", "x.png").id for _ in range(50)}
    assert seen == [16] * 50 and len(ids) == 50 and all(valid_id(i) for i in ids)


# --- retention: a property-based check ----------------------------------------------------------
@settings(max_examples=60, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(ttl=st.integers(1, 10 ** 6),
       ages=st.lists(st.tuples(st.floats(0, 2e6), st.floats(0, 2e6),
                               st.one_of(st.none(), st.floats(0, 2e6))), min_size=1, max_size=6))
def test_cleanup_never_deletes_younger_than_ttl(tmp_path_factory, ttl, ages):
    """Each entry: (age of the directory, age of the image, age of a temporary file or None).
    The sweep removes an entry exactly when everything in it is older than the TTL."""
    root = tmp_path_factory.mktemp("ret")
    now = 1.9e9
    st_ = ImageStore(root, ttl=ttl, clock=lambda: now)
    dirs = []
    for i, (dir_age, file_age, tmp_age) in enumerate(ages):
        d = root / ("file-%032x" % i)
        d.mkdir()
        (d / "x.png").write_bytes(b"png")
        os.utime(d / "x.png", (now - file_age,) * 2)
        if tmp_age is not None:
            (d / ".tmp-w").write_bytes(b"partial")
            os.utime(d / ".tmp-w", (now - tmp_age,) * 2)
        os.utime(d, (now - dir_age,) * 2)
        youngest = min(a for a in (dir_age, file_age, tmp_age) if a is not None)
        dirs.append((d, youngest))
    st_.cleanup()
    for d, youngest in dirs:
        if youngest <= ttl:
            assert d.exists() and (d / "x.png").exists(), (youngest, ttl)
        else:
            assert not d.exists(), (youngest, ttl)


# --- request bodies -------------------------------------------------------------------------------
def test_chunked_body_over_the_limit_is_413(tmp_path):
    app, stub = make_app(tmp_path, max_upload_bytes=1000)
    c = app.test_client()
    body = b'{"prompt": "' + b"x" * 2000 + b'"}'
    env = {"wsgi.input_terminated": True, "HTTP_TRANSFER_ENCODING": "chunked"}
    r = c.post(GEN, input_stream=io.BytesIO(body), content_type="application/json",
               environ_overrides=env)
    assert error_of(r, 413)["code"] == "payload_too_large" and stub.calls == []
    small = b'{"prompt": "p", "size": "64x64"}'
    r = c.post(GEN, input_stream=io.BytesIO(small), content_type="application/json",
               environ_overrides=env)
    assert r.status_code == 200, r.get_data(as_text=True)


def test_multipart_without_boundary(tmp_path):
    c = make_app(tmp_path)[0].test_client()
    for path in (GEN, "/v1/images/edits"):
        r = c.post(path, data=b"--x\r\n", content_type="multipart/form-data")
        assert error_of(r, 400)["code"] == "invalid_multipart"


def test_tiny_images_and_long_prompts_refused(tmp_path):
    c = make_app(tmp_path, max_prompt_chars=50)[0].test_client()
    data = {"prompt": "p", "image": (io.BytesIO(png_bytes((1, 1))), "i.png")}
    err = error_of(c.post("/v1/images/edits", data=data, content_type="multipart/form-data"), 400)
    assert (err["param"], err["code"]) == ("image", "image_too_small")
    data = {"prompt": "p", "size": "64x64", "image": (io.BytesIO(png_bytes((8, 8))), "i.png")}
    assert c.post("/v1/images/edits", data=data, content_type="multipart/form-data"
                  ).status_code == 200
    err = error_of(c.post(GEN, json={"prompt": "x" * 51}), 400)
    assert (err["param"], err["code"]) == ("prompt", "string_too_long")
    err = error_of(c.post(GEN, json={"prompt": "p", "negative_prompt": "x" * 51}), 400)
    assert err["param"] == "negative_prompt"
    assert c.post(GEN, json={"prompt": "x" * 50, "size": "64x64"}).status_code == 200


@pytest.mark.parametrize("field", ["user", "quality", "style", "moderation", "input_fidelity"])
def test_openai_only_fields_type_checked_then_ignored(tmp_path, field):
    c = make_app(tmp_path)[0].test_client()
    for ok in ("anything", None):
        assert c.post(GEN, json={"prompt": "p", "size": "64x64", field: ok}).status_code == 200
    assert error_of(c.post(GEN, json={"prompt": "p", field: {}}), 400)["param"] == field
