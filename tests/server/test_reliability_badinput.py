"""Every kind of bad input against a real gunicorn (gunicorn.conf.py, wsgi:app, the tiny
default model): each gets its 4xx in the OpenAI error shape with the expected type and param,
and /health answers after each one (the worker is the same process at the end).

The requests are sent as raw HTTP over a socket, so that nothing (requests/urllib3 normalise
``..`` in paths, refuse NaN in JSON, add boundaries) cleans them up on the way."""
import base64
import io
import json
import socket
import struct
import threading
import time
import zlib

import pytest
from PIL import Image

from bench.harness import API_KEY, raw_http, read_response, server_fixture

GEN = "/v1/images/generations"
EDIT = "/v1/images/edits"
UPLOAD_LIMIT = 2 * 1024 * 1024          # SD_MAX_UPLOAD_BYTES of this server
SECRET_FILE = "wsgi.py"                 # a file outside the data directory, by its first line
SECRET_MARK = b"gunicorn entry point"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = server_fixture(tmp_path_factory, "badinput", SD_MAX_UPLOAD_BYTES=str(UPLOAD_LIMIT))
    srv.first_worker = srv.worker_pid()
    try:
        yield srv
    finally:
        srv.stop()


# --- building raw requests ----------------------------------------------------------------------
def http(method: str, path: str, body: bytes = b"", content_type: str | None = None,
         headers: dict | None = None, key: bool = True) -> bytes:
    h = {"Host": "127.0.0.1", "Connection": "close"}
    if key:
        h["Authorization"] = f"Bearer {API_KEY}"
    if content_type is not None:
        h["Content-Type"] = content_type
    if body or method in ("POST", "PUT"):
        h["Content-Length"] = str(len(body))
    h.update(headers or {})
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in h.items())
    return head.encode("latin-1") + b"\r\n" + body


def json_raw(text, path=GEN) -> bytes:
    body = text if isinstance(text, bytes) else text.encode("utf-8")
    return http("POST", path, body, "application/json")


def json_body(obj, path=GEN) -> bytes:
    return json_raw(json.dumps(obj), path)


def multipart(fields, files, path=EDIT, boundary="sdtestboundary7") -> bytes:
    """fields and files: dicts, or lists of pairs (to repeat a name)."""
    out = io.BytesIO()
    for k, v in (fields.items() if isinstance(fields, dict) else fields):
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n'.encode())
        out.write(str(v).encode("utf-8") + b"\r\n")
    for k, (name, data) in (files.items() if isinstance(files, dict) else files):
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"; '
                  f'filename="{name}"\r\nContent-Type: application/octet-stream\r\n\r\n'.encode())
        out.write(data + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return http("POST", path, out.getvalue(), f"multipart/form-data; boundary={boundary}")


def edit(fields: dict | None = None, **files) -> bytes:
    f = {"prompt": "a cat", "size": "64x64", "steps": "1"}
    f.update(fields or {})
    if "image" not in files:
        files["image"] = ("in.png", png((64, 64)))
    return multipart(f, {k: v for k, v in files.items() if v is not None})


# --- images -------------------------------------------------------------------------------------
def encode(im: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def png(size, mode="RGB") -> bytes:
    return encode(Image.new(mode, size, (200, 100, 50) if mode == "RGB" else (200, 100, 50, 255)),
                  "PNG")


def png_claiming(width: int, height: int) -> bytes:
    """A few hundred bytes of PNG whose header says width x height: a decompression bomb."""
    raw = bytearray(png((1, 1)))
    ihdr = struct.pack(">II", width, height) + bytes(raw[24:29])
    raw[16:29] = ihdr
    raw[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return bytes(raw)


GOOD_PNG = png((64, 64))
SVG = (b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64">'
       b'<rect width="64" height="64"/></svg>')


# --- the table ----------------------------------------------------------------------------------
# (id, raw request, status, error type, param)
INVALID = "invalid_request_error"
CASES = []


def case(cid, raw, status=400, etype=INVALID, param=None):
    CASES.append(pytest.param(raw, status, etype, param, id=cid))


# malformed JSON and non-object bodies
for cid, text in [("truncated", '{"prompt": "p"'), ("not-json", "not json"), ("empty", ""),
                  ("trailing-comma", '{"prompt": "p",}'), ("array", '[{"prompt": "p"}]'),
                  ("string", '"prompt"'), ("number", "42"), ("null", "null"),
                  ("deep-nesting", "[" * 100000 + "]" * 100000),
                  ("single-quotes", "{'prompt': 'p'}")]:
    case(f"json-{cid}", json_raw(text))
case("json-invalid-utf8", json_raw(b'{"prompt": "\xff\xfe"}'))
case("json-lone-surrogate", json_raw('{"prompt": "\\ud800 cat", "size": "64x64"}'), param="prompt")

# wrong types for every field
INT_FIELDS = ["n", "steps", "seed", "width", "height"]
NUM_FIELDS = ["cfg_scale", "control_strength"]
STR_FIELDS = ["prompt", "negative_prompt", "sample_method", "scheduler", "response_format",
              "size", "model"]
WRONG = {"string": "5", "float": 5.5, "float-integral": 5.0, "true": True, "null": None,
         "array": [5], "object": {"v": 5}}
for field in INT_FIELDS + NUM_FIELDS + STR_FIELDS:
    for label, value in WRONG.items():
        if field in NUM_FIELDS and label in ("float", "float-integral"):
            continue                      # numbers may be floats
        if field in STR_FIELDS and label == "string":
            continue
        if field == "model" and label == "null":
            continue                      # null model: the default model (as OpenAI's client)
        body = {"prompt": "p", "size": "64x64", "steps": 1}
        body[field] = value
        case(f"type-{field}-{label}", json_body(body), param=field)

# NaN, Infinity and out-of-range numbers written as JSON literals
for field in ["cfg_scale", "control_strength", "n", "steps", "seed"]:
    for lit in ["NaN", "Infinity", "-Infinity", "1e400"]:
        case(f"literal-{field}-{lit}",
             json_raw(f'{{"prompt": "p", "size": "64x64", "{field}": {lit}}}'), param=field)

# prompts
for cid, prompt in [("empty", ""), ("space", " "), ("whitespace", " \t\n\r ")]:
    case(f"prompt-{cid}", json_body({"prompt": prompt, "size": "64x64"}), param="prompt")
case("prompt-1MB", json_body({"prompt": "a cat " * 174763, "size": "64x64"}), param="prompt")
case("negative-prompt-1MB", json_body({"prompt": "p", "negative_prompt": "x" * 1048576}),
     param="negative_prompt")
case("prompt-missing", json_body({"size": "64x64"}), param="prompt")

# unknown names
for field in ["sample_method", "scheduler", "response_format"]:
    case(f"unknown-{field}", json_body({"prompt": "p", field: "nope"}), param=field)
case("response_format-png", json_body({"prompt": "p", "response_format": "png"}),
     param="response_format")
case("model-not-a-string", json_body({"prompt": "p", "model": ["no-such-model"]}), 400,
     INVALID, "model")                   # (an unknown name gets the default model: tests/api/test_model_names.py)

# sizes
for size in ["512", "x512", "512x", "abcxdef", "0x0", "-512x512", "513x512", "100000x100000",
             "512x512x512", "512*512", "", " ", "8x8", "1e3x512", "５１２x512"]:
    case(f"size-{size!r}", json_body({"prompt": "p", "size": size}), param="size")
for field, value in [("width", 100), ("width", 0), ("height", -64), ("height", 8),
                     ("width", 2 ** 31)]:
    case(f"{field}-{value}", json_body({"prompt": "p", field: value}), param=field)
case("width-times-height", json_body({"prompt": "p", "width": 2048, "height": 1024}),
     param="width")

# ranges
for value in [0, -1, 11, 10 ** 9]:
    case(f"n-{value}", json_body({"prompt": "p", "size": "64x64", "n": value}), param="n")
for value in [0, -1, 151, 10 ** 6]:
    case(f"steps-{value}", json_body({"prompt": "p", "size": "64x64", "steps": value}),
         param="steps")
for value in [-1, -0.001, 30.5, 1e308]:
    case(f"cfg_scale-{value}", json_body({"prompt": "p", "size": "64x64", "cfg_scale": value}),
         param="cfg_scale")
for value in [-0.1, 2.5]:
    case(f"control_strength-{value}",
         json_body({"prompt": "p", "size": "64x64", "control_strength": value}),
         param="control_strength")
for value in [2 ** 64, -(2 ** 63) - 1, 10 ** 30, -(10 ** 30)]:
    case(f"seed-{value}", json_body({"prompt": "p", "size": "64x64", "seed": value}),
         param="seed")
case("seed-plus-n-overflow", json_body({"prompt": "p", "size": "64x64", "seed": 2 ** 64 - 1,
                                        "n": 2}), param="seed")

# form values (multipart: every value is text)
for field, value in [("n", "abc"), ("n", "1.5"), ("n", ""), ("steps", " "), ("seed", "1e3"),
                     ("cfg_scale", "nan"), ("cfg_scale", "inf"), ("cfg_scale", "7,5"),
                     ("strength", "1.5"), ("strength", "-0.1"), ("strength", "x"),
                     ("strength", "nan")]:
    case(f"form-{field}-{value!r}", edit({field: value}), param=field)
case("form-duplicate-field", multipart([("prompt", "p"), ("prompt", "q")],
                                       {"image": ("a.png", GOOD_PNG)}), param="prompt")


# uploaded images
def _tiff():
    return encode(Image.new("RGB", (64, 64)), "TIFF")


def _gif():
    return encode(Image.new("P", (64, 64)), "GIF")


for cid, data in [("not-an-image", b"hello, I am text"), ("truncated-png", GOOD_PNG[:60]),
                  ("png-signature-only", b"\x89PNG\r\n\x1a\n"), ("gif", _gif()), ("tiff", _tiff()),
                  ("svg", SVG), ("empty", b""), ("1x1", png((1, 1))),
                  ("20000x20000-bomb", png_claiming(20000, 20000)),
                  ("2^31-bomb", png_claiming(2 ** 31 - 1, 2 ** 31 - 1))]:
    for field in ["image", "mask", "control_image"]:
        files = {field: (f"{field}.bin", data)}
        case(f"{field}-{cid}", edit(**files), param=field)
case("mask-other-size", edit(mask=("m.png", png((128, 64), "RGBA"))), param="mask")
case("mask-no-alpha", edit(mask=("m.png", png((64, 64)))), param="mask")
case("image-missing", edit(image=None), param="image")
case("image-as-text", multipart({"prompt": "p", "image": "not a file"}, {}), param="image")
case("second-image-garbage", multipart({"prompt": "p"}, [("image", ("a.png", GOOD_PNG)),
                                                         ("image[]", ("b.png", b"junk"))]), param="image")
case("generation-control-image-garbage",
     multipart({"prompt": "p", "size": "64x64"}, {"control_image": ("c.png", b"junk")}, path=GEN),
     param="control_image")
case("generation-control-image-as-json-text",
     json_body({"prompt": "p", "control_image": "aGVsbG8="}), param="control_image")

# content types and multipart framing
for path in (GEN, EDIT):
    short = path.rsplit("/", 1)[1]
    case(f"{short}-multipart-without-boundary",
         http("POST", path, b"--x\r\n\r\n", "multipart/form-data"))
    case(f"{short}-multipart-empty-boundary",
         http("POST", path, b"--x\r\n\r\n", "multipart/form-data; boundary="))
    case(f"{short}-text-plain", http("POST", path, b'{"prompt": "p"}', "text/plain"), 415)
    case(f"{short}-xml", http("POST", path, b"<prompt>p</prompt>", "application/xml"), 415)
    case(f"{short}-no-content-type", http("POST", path, b'{"prompt": "p"}'), 415)
    case(f"{short}-image-png", http("POST", path, GOOD_PNG, "image/png"), 415)
case("edits-json", json_body({"prompt": "p"}, EDIT), 415)
case("multipart-garbage-body", http("POST", EDIT, b"\x00\x01garbage",
                                    "multipart/form-data; boundary=zz"), param="prompt")

# unknown paths and wrong methods
for path in ["/nope", "/v1", "/v1/images", "/v1/images/generations/x", "/v1/images/variations",
             "/v1/files/file-0/content/x", "/%00", "/v1/models/no-such-model"]:
    model = path.startswith("/v1/models/")
    case(f"404-{path}", http("GET", path), 404, INVALID if model else "not_found_error",
         "model" if model else None)
for method, path in [("GET", GEN), ("PUT", EDIT), ("DELETE", "/v1/models"), ("POST", "/health"),
                     ("POST", "/v1/files"), ("PATCH", "/v1/files/file-" + "0" * 32),
                     ("DELETE", GEN)]:
    case(f"405-{method}-{path}", http(method, path), 405)


ANY_OF = type("AnyOf", (tuple,), {})


def check_error(status, headers, body, want_status, want_type, want_param):
    assert status == want_status, (status, body[:300])
    assert headers.get("content-type", "").startswith("application/json"), headers
    assert b"Traceback" not in body and b'File "' not in body
    doc = json.loads(body)
    assert list(doc) == ["error"]
    err = doc["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert err["type"] == want_type, err
    if isinstance(want_param, ANY_OF):
        assert err["param"] in want_param, err
    else:
        assert err["param"] == want_param, err
    return err


@pytest.mark.parametrize("raw,status,etype,param", CASES)
def test_bad_input(server, raw, status, etype, param):
    got = raw_http(server.port, raw)
    err = check_error(*got, status, etype, param)
    if status == 405:
        assert got[1].get("allow"), got[1]
    assert raw_http(server.port, http("GET", "/health", key=False))[0] == 200, err


# --- traversal ------------------------------------------------------------------------------------
TRAVERSAL = [
    "/v1/files/download/../../../etc/passwd", "/v1/files/download/../../" + SECRET_FILE,
    "/v1/files/download/file-x/../../../" + SECRET_FILE,
    "/v1/files/download/..%2F..%2F" + SECRET_FILE,
    "/v1/files/download/%2e%2e/%2e%2e/" + SECRET_FILE,
    "/v1/files/download/%2e%2e%2f%2e%2e%2f" + SECRET_FILE,
    "/v1/files/download/%252e%252e%252f/" + SECRET_FILE,
    "/v1/files/download/..%5c..%5c" + SECRET_FILE, "/v1/files/download/..\\..\\" + SECRET_FILE,
    "/v1/files/download/%c0%ae%c0%ae/" + SECRET_FILE,
    "/v1/files/download/file-{id}/..%2F..%2F..%2F" + SECRET_FILE,
    "/v1/files/download/file-{id}/..;/" + SECRET_FILE, "/v1/files/download/file-{id}/%00",
    "/v1/files/download/file-{id}/.%2e/.%2e/" + SECRET_FILE,
    "/v1/files/download/file-{id}/%2fetc%2fpasswd", "/v1/files/download/file-{id}//etc/passwd",
    "/v1/files/..%2F..%2F" + SECRET_FILE + "/content", "/v1/files/%2e%2e/content",
    "//" + SECRET_FILE, "/../" + SECRET_FILE, "/v1/files/download/{id}/../../image.png",
]


@pytest.fixture(scope="module")
def stored(server):
    """One stored image: (file id, file name)."""
    st, _, body = raw_http(server.port, json_body({"prompt": "a stored image", "size": "64x64",
                                                   "steps": 1, "response_format": "url"}))
    assert st == 200, body
    url = json.loads(body)["data"][0]["url"]
    file_id, name = url.split("/")[-2:]
    return file_id, name


@pytest.mark.parametrize("template", TRAVERSAL)
def test_download_traversal(server, stored, template):
    path = template.replace("file-{id}", stored[0]).replace("{id}", stored[0])
    status, headers, body = raw_http(server.port, http("GET", path))
    check_error(status, headers, body, 404, "not_found_error", ANY_OF((None, "file_id")))
    assert SECRET_MARK not in body and b"root:" not in body
    assert raw_http(server.port, http("GET", "/health", key=False))[0] == 200


def test_download_of_the_stored_file_works(server, stored):
    status, headers, body = raw_http(server.port, http("GET", "/v1/files/download/%s/%s" % stored))
    assert status == 200 and headers["content-type"] == "image/png"
    assert body.startswith(b"\x89PNG")


# --- bodies over the upload limit -----------------------------------------------------------------
def test_declared_huge_body_refused_before_reading_it(server):
    """Content-Length 1 GiB, 64 KiB sent: 413 comes at once, and the server then closes the
    connection instead of waiting for (or reading) the rest."""
    head = http("POST", GEN, b"", "application/json",
                headers={"Content-Length": str(1 << 30), "Connection": "keep-alive"})
    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as s:
        t0 = time.monotonic()
        s.sendall(head + b'{"prompt": "' + b"x" * 65536)
        status, headers, body = read_response(s)
        answered = time.monotonic() - t0
        check_error(status, headers, body, 413, INVALID, None)
        assert answered < 5, answered
        s.settimeout(15)
        rest = b""
        try:
            while chunk := s.recv(65536):
                rest += chunk
        except ConnectionResetError:
            pass
        closed = time.monotonic() - t0
    assert rest == b"" and closed < 12, (rest[:100], closed)   # closed, not waiting for 1 GiB
    print(f"\n413 after {answered * 1000:.0f} ms with 64 KiB of a declared 1 GiB sent; "
          f"connection closed after {closed:.1f} s")
    assert raw_http(server.port, http("GET", "/health", key=False))[0] == 200


def test_chunked_body_over_limit_stops_at_the_limit(server):
    """No Content-Length (chunked): the server reads up to the limit, then answers 413 while the
    client is still sending; it never consumes the 64 MiB the client would send."""
    total = 64 << 20
    head = http("POST", GEN, b"", "application/json", headers={"Transfer-Encoding": "chunked"})
    head = head.replace(b"Content-Length: 0\r\n", b"")
    sent = [0]
    stop = threading.Event()
    chunk = b"%x\r\n%s\r\n" % (65536, b"x" * 65536)

    def sender(s):
        try:
            s.sendall(head + b"5\r\n{\"a\":\r\n")
            while sent[0] < total and not stop.is_set():
                s.sendall(chunk)
                sent[0] += 65536
        except OSError:
            pass

    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        t = threading.Thread(target=sender, args=(s,), daemon=True)
        t.start()
        status, headers, body = read_response(s)
        stop.set()
        t.join(30)
    check_error(status, headers, body, 413, INVALID, None)
    assert sent[0] < total, sent[0]
    print(f"\nchunked upload: 413 after the client had sent {sent[0] >> 20} MiB "
          f"(limit {UPLOAD_LIMIT >> 20} MiB, would have sent {total >> 20} MiB)")
    assert raw_http(server.port, http("GET", "/health", key=False))[0] == 200


def test_chunked_body_under_limit_accepted(server):
    body = json.dumps({"prompt": "chunked", "size": "64x64", "steps": 1,
                       "response_format": "b64_json"}).encode()
    head = http("POST", GEN, b"", "application/json", headers={"Transfer-Encoding": "chunked"})
    head = head.replace(b"Content-Length: 0\r\n", b"")
    status, _, resp = raw_http(server.port, head + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
    assert status == 200 and json.loads(resp)["data"][0]["b64_json"]


# --- AUTOMATIC1111's routes: the same, in its error shapes ------------------------------------------
T2I, I2I, OPTIONS = "/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/sdapi/v1/options"
BASIC = {"Authorization": "Basic " + base64.b64encode(f"anyone:{API_KEY}".encode()).decode()}   # the key, as Basic
A1111_CASES = []


def a1111_case(cid, path, obj, status, field=None, method="POST", **kw):
    raw = http(method, path, obj if isinstance(obj, bytes) else json.dumps(obj).encode(), kw.pop("ctype", "application/json"),
               headers=kw.pop("headers", BASIC), key=False)
    A1111_CASES.append(pytest.param(raw, status, field, id=cid))


GOOD_B64 = base64.b64encode(GOOD_PNG).decode()
for field, value in [("prompt", 1), ("negative_prompt", {}), ("seed", "7"), ("seed", 2 ** 64), ("steps", 1.5),
                     ("steps", 0), ("steps", 10 ** 6), ("cfg_scale", "7"), ("cfg_scale", -1), ("width", 65), ("height", []),
                     ("width", 10 ** 6), ("batch_size", 0), ("n_iter", "2"), ("sampler_name", 7), ("sampler_index", []),
                     ("scheduler", {}), ("clip_skip", 0), ("override_settings", [1]), ("send_images", "yes"),
                     ("save_images", 3), ("model", 1)]:
    a1111_case(f"txt2img-{field}-{value!r}", T2I, {"prompt": "p", field: value}, 422, field)
a1111_case("txt2img-batch-times-iter", T2I, {"prompt": "p", "batch_size": 10, "n_iter": 10}, 422, "batch_size")
a1111_case("txt2img-override-checkpoint", T2I, {"override_settings": {"sd_model_checkpoint": "x.ckpt"}}, 422,
           "override_settings")
for cid, images in [("missing", None), ("string", GOOD_B64), ("empty", []), ("text", [base64.b64encode(b"hi").decode()]),
                    ("bad-base64", ["%%%"]), ("number", [1]), ("svg", [base64.b64encode(SVG).decode()])]:
    a1111_case(f"img2img-init-{cid}", I2I, {"prompt": "p", **({"init_images": images} if images is not None else {})},
               422, "init_images")
for field, value in [("denoising_strength", 2), ("mask", "bm9wZQ=="), ("mask_blur", -1), ("inpainting_fill", 9),
                     ("resize_mode", "crop"), ("inpainting_mask_invert", 5)]:
    a1111_case(f"img2img-{field}", I2I, {"init_images": [GOOD_B64], field: value}, 422, field)
a1111_case("sampler-unknown", T2I, {"sampler_name": "UniPC"}, 400)
a1111_case("scheduler-unknown", T2I, {"scheduler": "Beta"}, 400)
a1111_case("options-unknown-checkpoint", OPTIONS, {"sd_model_checkpoint": "sdxl.safetensors"}, 400)
a1111_case("options-clip-skip", OPTIONS, {"CLIP_stop_at_last_layers": "two"}, 422, "CLIP_stop_at_last_layers")
a1111_case("not-json", T2I, b"{nope", 400)
a1111_case("json-array", T2I, b"[1]", 400)
a1111_case("form-body", T2I, b"prompt=p", 415, ctype="application/x-www-form-urlencoded")
a1111_case("png-info-not-an-image", "/sdapi/v1/png-info", {"image": base64.b64encode(b"text").decode()}, 422, "image")
a1111_case("no-credentials", T2I, {"prompt": "p"}, 401, headers={})
a1111_case("wrong-credentials", OPTIONS, b"", 401, method="GET", headers={"Authorization": "Basic dTpw"})
a1111_case("wrong-method", T2I, b"", 405, method="GET")
a1111_case("unknown-route", "/sdapi/v1/extra-single-image", {}, 404)


@pytest.mark.parametrize("raw,status,field", A1111_CASES)
def test_bad_a1111_input(server, stored, raw, status, field):
    options_before = raw_http(server.port, http("GET", OPTIONS, headers=BASIC, key=False))
    got_status, headers, body = raw_http(server.port, raw)
    assert got_status == status, body
    assert headers.get("content-type", "").startswith("application/json") and b"Traceback" not in body
    doc = json.loads(body)
    if status == 422:       # FastAPI's validation shape, naming the field
        assert doc["detail"][0]["loc"] == ["body", field] and doc["detail"][0]["msg"], doc
    else:                   # A1111's exception-handler shape
        assert set(doc) == {"error", "detail", "body", "errors"} and doc["detail"], doc
    if status == 401:
        assert headers["www-authenticate"].startswith("Basic")
    assert raw_http(server.port, http("GET", "/health", key=False))[0] == 200
    assert raw_http(server.port, http("GET", OPTIONS, headers=BASIC, key=False))[2] == options_before[2]
    assert raw_http(server.port, http("GET", f"/v1/files/download/{stored[0]}/{stored[1]}"))[0] == 200


def test_worker_survived_everything(server):
    """Runs last in this module: the worker that started is the one still serving."""
    assert server.worker_pid() == server.first_worker
    assert "Traceback" not in server.log_text()
    print(f"\nbad-input table: {len(CASES)} cases + {len(A1111_CASES)} on /sdapi/v1 + {len(TRAVERSAL)} traversal "
          f"paths + 2 oversized bodies, all answered with their 4xx; one worker throughout")
