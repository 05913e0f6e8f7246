"""Request parsing and validation of /v1/images/generations and /v1/images/edits, through the
Flask test client with a stub generate function (no model)."""
import io
import json
import struct
import zlib

import pytest
from PIL import Image

from api_helpers import StubModel, encode, error_of, make_app, png_bytes

GEN = "/v1/images/generations"
EDIT = "/v1/images/edits"


@pytest.fixture
def app_stub(tmp_path):
    return make_app(tmp_path, max_pixels=1024 * 1024)


@pytest.fixture
def client(app_stub):
    return app_stub[0].test_client()


@pytest.fixture
def stub(app_stub):
    return app_stub[1]


def gen(client, body):
    return client.post(GEN, json=body)


def edit(client, data, image=True, image_field="image"):
    data = dict(data)
    if image is True:
        data[image_field] = (io.BytesIO(png_bytes((64, 64))), "in.png", "image/png")
    return client.post(EDIT, data=data, content_type="multipart/form-data")


# --- defaults and pass-through ----------------------------------------------------------------
def test_generation_defaults(client, stub):
    r = gen(client, {"prompt": "a cat"})
    assert r.status_code == 200, r.get_data(as_text=True)
    p = stub.params
    assert (p.prompt, p.negative_prompt, p.n, p.width, p.height, p.steps) == ("a cat", "", 1, 512, 512, 20)
    assert (p.cfg_scale, p.sample_method, p.scheduler, p.seed, p.control_strength) == (7.0, "euler_a", None, 42, 0.9)
    assert p.init_image is None and p.mask is None and p.control_image is None
    assert r.headers["X-Request-Id"]
    item = r.get_json()["data"][0]
    assert "url" in item and "b64_json" not in item  # response_format defaults to url


def test_generation_all_fields_json(client, stub):
    body = {"model": "stub-sd", "prompt": "p", "negative_prompt": "np", "n": 2, "cfg_scale": 4,
            "sample_method": "dpm++2m", "scheduler": "karras", "steps": 9, "width": 128,
            "height": 64, "control_strength": 0.5, "seed": 7, "response_format": "b64_json"}
    r = gen(client, body)
    assert r.status_code == 200, r.get_data(as_text=True)
    p = stub.params
    assert (p.prompt, p.negative_prompt, p.n, p.cfg_scale, p.sample_method, p.scheduler) == (
        "p", "np", 2, 4.0, "dpm++2m", "karras")
    assert isinstance(p.cfg_scale, float)
    assert (p.steps, p.width, p.height, p.control_strength, p.seed) == (9, 128, 64, 0.5, 7)
    assert [d["seed"] for d in r.get_json()["data"]] == [7, 8]


@pytest.mark.parametrize("name", ["euler", "euler_a", "heun", "dpm2", "dpm++2s_a", "dpm++2m",
                                  "dpm++2mv2", "ipndm", "ipndm_v", "lcm"])
def test_every_sampler_accepted(client, stub, name):
    assert gen(client, {"prompt": "p", "sample_method": name}).status_code == 200
    assert stub.params.sample_method == name


@pytest.mark.parametrize("name", ["discrete", "karras", "exponential", "lcm"])
def test_every_scheduler_accepted(client, stub, name):
    assert gen(client, {"prompt": "p", "scheduler": name}).status_code == 200
    assert stub.params.scheduler == name


def test_names_are_case_insensitive(client, stub):
    assert gen(client, {"prompt": "p", "sample_method": "Euler_A", "scheduler": "KARRAS",
                        "response_format": "B64_JSON"}).status_code == 200
    assert (stub.params.sample_method, stub.params.scheduler) == ("euler_a", "karras")


def test_size_overrides_width_height(client, stub):
    assert gen(client, {"prompt": "p", "size": "128x64", "width": 256, "height": 256}).status_code == 200
    assert (stub.params.width, stub.params.height) == (128, 64)   # WIDTHxHEIGHT, not HxW
    assert gen(client, {"prompt": "p", "width": 192, "height": 128}).status_code == 200
    assert (stub.params.width, stub.params.height) == (192, 128)
    assert gen(client, {"prompt": "p", "size": "auto", "width": 64}).status_code == 200
    assert (stub.params.width, stub.params.height) == (64, 512)


def test_unknown_and_openai_only_fields_ignored(client, stub):
    body = {"prompt": "p", "user": "u-1", "quality": "hd", "style": "vivid", "moderation": "low",
            "whatever": {"nested": [1, None]}, "output_format": "webp", "strength": "ignored here"}
    assert gen(client, body).status_code == 200
    assert stub.params.prompt == "p"


def test_model_selection(client, stub):
    assert gen(client, {"prompt": "p", "model": None}).status_code == 200
    assert gen(client, {"prompt": "p", "model": "stub-sd"}).status_code == 200
    assert gen(client, {"prompt": "p", "model": "dall-e-3"}).status_code == 200     # the default model draws it
    err = error_of(gen(client, {"prompt": "p", "model": 3}), 400)
    assert err["param"] == "model"


def test_several_models_selectable(tmp_path):
    a, b = StubModel("a"), StubModel("b")
    app, stub = make_app(tmp_path, model={"a": a, "b": b})
    c = app.test_client()
    assert c.post(GEN, json={"prompt": "p"}).status_code == 200
    assert stub.calls[-1][0] is a
    assert c.post(GEN, json={"prompt": "p", "model": "b"}).status_code == 200
    assert stub.calls[-1][0] is b


def test_negative_seed_is_random_and_reported(client, stub):
    r = gen(client, {"prompt": "p", "seed": -1, "n": 3, "response_format": "b64_json"})
    assert r.status_code == 200
    seeds = [d["seed"] for d in r.get_json()["data"]]
    assert stub.params.seed == -1
    assert seeds[0] >= 0 and seeds == [seeds[0], seeds[0] + 1, seeds[0] + 2]


def test_seed_extremes_accepted(client, stub):
    assert gen(client, {"prompt": "p", "seed": 2 ** 64 - 1}).status_code == 200
    assert stub.params.seed == 2 ** 64 - 1
    assert gen(client, {"prompt": "p", "seed": -(2 ** 63)}).status_code == 200


# --- bad values (JSON) ------------------------------------------------------------------------
BAD_JSON = [
    ("prompt", None), ("prompt", ""), ("prompt", "   \n\t"), ("prompt", 5), ("prompt", ["a"]),
    ("negative_prompt", None), ("negative_prompt", 1),
    ("n", "2"), ("n", 2.0), ("n", True), ("n", None), ("n", [1]), ("n", 0), ("n", 11), ("n", -1),
    ("steps", "20"), ("steps", 20.5), ("steps", 0), ("steps", 151), ("steps", None), ("steps", False),
    ("cfg_scale", "7"), ("cfg_scale", True), ("cfg_scale", None), ("cfg_scale", [7]),
    ("cfg_scale", -0.1), ("cfg_scale", 30.5), ("cfg_scale", {"v": 1}),
    ("control_strength", -1), ("control_strength", 2.5), ("control_strength", "x"),
    ("seed", "42"), ("seed", 42.0), ("seed", True), ("seed", None), ("seed", 2 ** 64),
    ("seed", -(2 ** 63) - 1), ("seed", 10 ** 30),
    ("sample_method", "foo"), ("sample_method", ""), ("sample_method", 1), ("sample_method", None),
    ("sample_method", "euler a"),
    ("scheduler", "linear"), ("scheduler", 3), ("scheduler", None),
    ("response_format", "png"), ("response_format", None), ("response_format", "url "[:0]),
    ("width", "512"), ("width", 512.0), ("width", 500), ("width", 0), ("width", -8), ("width", 8),
    ("height", None), ("height", 100), ("height", True),
    ("model", 5), ("model", ["a"]),
    ("control_image", "aGVsbG8="),
]


@pytest.mark.parametrize("field,value", BAD_JSON)
def test_bad_json_values(client, stub, field, value):
    body = {"prompt": "a cat", field: value}
    err = error_of(gen(client, body), 400)
    assert err["param"] == field
    assert err["type"] == "invalid_request_error"
    assert not stub.calls


@pytest.mark.parametrize("size", ["512", "x512", "512x", "abcxdef", "0x0", "-512x512", "512x-512",
                                  "512x512x512", "512*512", "", " ", "5 12x512", "1.5x512",
                                  "500x500", "512x100", "4096x4096", "2048x1024", "8x8"])
def test_bad_sizes(client, stub, size):
    err = error_of(gen(client, {"prompt": "p", "size": size}), 400)
    assert err["param"] == "size"
    assert not stub.calls


def test_size_errors_say_why(client):
    assert "multiple of 8" in error_of(gen(client, {"prompt": "p", "size": "500x512"}), 400)["message"]
    assert "multiple of 8" in error_of(gen(client, {"prompt": "p", "width": 100}), 400)["message"]
    msg = error_of(gen(client, {"prompt": "p", "size": "2048x2048"}), 400)["message"]
    assert "1048576" in msg and "pixels" in msg
    assert error_of(gen(client, {"prompt": "p", "size": 512}), 400)["param"] == "size"


def test_max_pixels_configurable(tmp_path):
    app, stub = make_app(tmp_path, max_pixels=128 * 128)
    c = app.test_client()
    assert c.post(GEN, json={"prompt": "p", "size": "128x128"}).status_code == 200
    assert error_of(c.post(GEN, json={"prompt": "p", "size": "136x128"}), 400)["param"] == "size"
    # the default size (512x512) is capped to the largest square within the limit
    assert c.post(GEN, json={"prompt": "p"}).status_code == 200
    assert (stub.params.width, stub.params.height) == (128, 128)


def test_max_n_and_steps_configurable(tmp_path):
    app, stub = make_app(tmp_path, max_n=3, max_steps=5)
    c = app.test_client()
    assert c.post(GEN, json={"prompt": "p", "n": 3, "steps": 5, "size": "64x64"}).status_code == 200
    assert error_of(c.post(GEN, json={"prompt": "p", "n": 4}), 400)["param"] == "n"
    assert error_of(c.post(GEN, json={"prompt": "p", "steps": 6}), 400)["param"] == "steps"
    assert c.post(GEN, json={"prompt": "p", "size": "64x64"}).status_code == 200
    assert stub.params.steps == 5          # the default (20) is capped to max_steps


def test_default_limits(client):
    assert gen(client, {"prompt": "p", "n": 10, "size": "64x64"}).status_code == 200
    assert gen(client, {"prompt": "p", "steps": 150, "size": "64x64"}).status_code == 200
    assert gen(client, {"prompt": "p", "cfg_scale": 0, "size": "64x64"}).status_code == 200
    assert gen(client, {"prompt": "p", "cfg_scale": 30, "size": "64x64"}).status_code == 200


def test_seed_plus_n_must_fit_64_bits(client):
    err = error_of(gen(client, {"prompt": "p", "seed": 2 ** 64 - 1, "n": 2}), 400)
    assert err["param"] == "seed"


def test_missing_prompt(client):
    err = error_of(gen(client, {"n": 1}), 400)
    assert (err["param"], err["code"]) == ("prompt", "missing_required_parameter")


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400", "-1e400"])
@pytest.mark.parametrize("field", ["cfg_scale", "control_strength"])
def test_non_finite_json_numbers(client, stub, field, literal):
    raw = '{"prompt": "p", "%s": %s}' % (field, literal)
    err = error_of(client.post(GEN, data=raw, content_type="application/json"), 400)
    assert err["param"] == field
    assert not stub.calls


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "1e3", "20.0"])
def test_non_integer_json_numbers(client, literal):
    raw = '{"prompt": "p", "steps": %s}' % literal
    err = error_of(client.post(GEN, data=raw, content_type="application/json"), 400)
    assert err["param"] == "steps"


# --- bodies and content types -----------------------------------------------------------------
@pytest.mark.parametrize("raw", ['{"prompt": "p"', "not json", "", '{"prompt": "p",}', "[1, 2]",
                                 '"prompt"', "null", "42", "[" * 100000])
def test_malformed_or_non_object_json(client, raw):
    err = error_of(client.post(GEN, data=raw, content_type="application/json"), 400)
    assert err["code"] == "invalid_json"


def test_invalid_utf8_json(client):
    err = error_of(client.post(GEN, data=b'{"prompt": "\xff\xfe"}', content_type="application/json"), 400)
    assert err["code"] == "invalid_json"


@pytest.mark.parametrize("ctype", ["text/plain", "application/xml", "image/png", None])
def test_wrong_content_type(client, ctype):
    kw = {"content_type": ctype} if ctype else {}
    err = error_of(client.post(GEN, data=json.dumps({"prompt": "p"}), **kw), 415)
    assert err["code"] == "unsupported_media_type"


def test_json_with_charset_accepted(client):
    r = client.post(GEN, data=json.dumps({"prompt": "p"}), content_type="application/json; charset=utf-8")
    assert r.status_code == 200


def test_body_over_limit_is_413(tmp_path):
    app, stub = make_app(tmp_path, max_upload_bytes=2000)
    c = app.test_client()
    err = error_of(c.post(GEN, json={"prompt": "x" * 5000}), 413)
    assert err["code"] == "payload_too_large" and "2000" in err["message"]
    data = {"prompt": "p", "image": (io.BytesIO(b"\0" * 5000), "a.png")}
    error_of(c.post(EDIT, data=data, content_type="multipart/form-data"), 413)
    assert not stub.calls
    assert app.config["MAX_CONTENT_LENGTH"] == 2000


# --- multipart forms: strings parsed strictly -------------------------------------------------
def form(client, data, url=GEN):
    return client.post(url, data=data, content_type="multipart/form-data")


def test_form_values_parsed(client, stub):
    r = form(client, {"prompt": "a person", "negative_prompt": "blurry", "n": "2", "cfg_scale": "7.5",
                      "sample_method": "heun", "steps": " 12 ", "size": "64x128", "seed": "-1",
                      "control_strength": "1", "scheduler": "exponential", "response_format": "b64_json",
                      "user": "ignored"})
    assert r.status_code == 200, r.get_data(as_text=True)
    p = stub.params
    # the original server let negative_prompt overwrite prompt in forms
    assert (p.prompt, p.negative_prompt) == ("a person", "blurry")
    assert (p.n, p.cfg_scale, p.sample_method, p.steps, p.width, p.height) == (2, 7.5, "heun", 12, 64, 128)
    assert (p.seed, p.control_strength, p.scheduler) == (-1, 1.0, "exponential")
    assert "b64_json" in r.get_json()["data"][0]


def test_urlencoded_form_accepted(client, stub):
    r = client.post(GEN, data={"prompt": "p", "steps": "3"})
    assert r.status_code == 200 and stub.params.steps == 3


BAD_FORM = [("n", "abc"), ("n", "1.5"), ("n", ""), ("n", " "), ("n", "1e1"), ("n", "0x2"), ("n", "٣"),
            ("steps", "20.0"), ("steps", "1_0"), ("steps", "true"), ("cfg_scale", "nan"),
            ("cfg_scale", "inf"), ("cfg_scale", "-Infinity"), ("cfg_scale", "abc"), ("cfg_scale", "1_0"),
            ("cfg_scale", "7,5"), ("cfg_scale", "1e999"), ("seed", "18446744073709551616"),
            ("seed", "4.2"), ("seed", "null"), ("sample_method", "euler_b"), ("scheduler", "cosine"),
            ("response_format", "json"), ("size", "512x"), ("width", "500"), ("height", "abc"),
            ("control_strength", "NaN"), ("prompt", "  "), ("control_image", "not a file")]


@pytest.mark.parametrize("field,value", BAD_FORM)
def test_bad_form_values(client, stub, field, value):
    data = {"prompt": "p", field: value}
    err = error_of(form(client, data), 400)
    assert err["param"] == field
    assert not stub.calls


def test_duplicate_form_field_rejected(client):
    from werkzeug.datastructures import MultiDict
    err = error_of(form(client, MultiDict([("prompt", "a"), ("prompt", "b")])), 400)
    assert err["param"] == "prompt"


def test_generation_with_control_image(client, stub):
    data = {"prompt": "p", "control_image": (io.BytesIO(png_bytes((96, 80), "RGBA")), "c.png")}
    assert form(client, data).status_code == 200
    ci = stub.params.control_image
    assert ci.mode == "RGB" and ci.size == (96, 80)


# --- edits ------------------------------------------------------------------------------------
def test_edit_defaults_and_image(client, stub):
    r = edit(client, {"prompt": "modern disney style"})
    assert r.status_code == 200, r.get_data(as_text=True)
    p = stub.params
    assert p.strength == 0.75 and p.init_image.size == (64, 64) and p.init_image.mode == "RGB"
    assert p.mask is None and (p.width, p.height, p.steps, p.seed) == (512, 512, 20, 42)


def test_edit_seed_document_example(client, stub):
    data = {"prompt": "modern disney style", "negative_prompt": "no animals", "n": "1", "height": "512",
            "width": "512", "cfg_scale": "7.0", "sample_method": "euler_a", "steps": "20",
            "control_strength": "0.9", "seed": "42", "strength": "0.75", "response_format": "url"}
    assert edit(client, data).status_code == 200
    p = stub.params
    assert (p.prompt, p.negative_prompt, p.strength, p.cfg_scale) == ("modern disney style", "no animals", 0.75, 7.0)


def test_edit_accepts_image_brackets(client, stub):
    r = edit(client, {"prompt": "p", "strength": "0.3"}, image_field="image[]")
    assert r.status_code == 200
    assert stub.params.init_image.size == (64, 64) and stub.params.strength == 0.3


def test_edit_requires_image(client):
    err = error_of(edit(client, {"prompt": "p"}, image=False), 400)
    assert (err["param"], err["code"]) == ("image", "missing_required_parameter")
    err = error_of(edit(client, {"prompt": "p", "image": "text not file"}, image=False), 400)
    assert err["param"] == "image"


def test_edit_of_several_images_edits_the_first(client, stub):
    from werkzeug.datastructures import MultiDict
    data = MultiDict([("prompt", "p"), ("image[]", (io.BytesIO(png_bytes(color=(200, 0, 0))), "a.png")),
                      ("image[]", (io.BytesIO(png_bytes(color=(0, 0, 200))), "b.png"))])
    assert client.post(EDIT, data=data, content_type="multipart/form-data").status_code == 200
    assert stub.params.init_image.getpixel((0, 0)) == (200, 0, 0)
    data = MultiDict([("prompt", "p"), ("image[]", (io.BytesIO(png_bytes()), "a.png")),
                      ("image[]", (io.BytesIO(b"not an image"), "b.png"))])      # the others are checked too
    assert error_of(client.post(EDIT, data=data, content_type="multipart/form-data"), 400)["param"] == "image"


def test_edit_requires_multipart(client):
    err = error_of(client.post(EDIT, json={"prompt": "p", "image": "aGk="}), 415)
    assert err["code"] == "unsupported_media_type"
    error_of(client.post(EDIT, data={"prompt": "p"}), 415)   # urlencoded cannot carry files


@pytest.mark.parametrize("value", ["1.5", "-0.1", "nan", "x", ""])
def test_edit_bad_strength(client, value):
    assert error_of(edit(client, {"prompt": "p", "strength": value}), 400)["param"] == "strength"


def test_edit_mask(client, stub):
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 32, 64))
    data = {"prompt": "p", "mask": (io.BytesIO(encode(mask)), "m.png")}
    assert edit(client, data).status_code == 200
    m = stub.params.mask
    assert m.mode == "RGBA" and m.size == (64, 64)
    assert m.getpixel((0, 0))[3] == 0 and m.getpixel((63, 0))[3] == 255


def test_edit_mask_wrong_size(client, stub):
    data = {"prompt": "p", "mask": (io.BytesIO(png_bytes((32, 64), "RGBA")), "m.png")}
    err = error_of(edit(client, data), 400)
    assert err["param"] == "mask" and "64x64" in err["message"] and "32x64" in err["message"]
    assert not stub.calls


def test_edit_mask_without_alpha(client):
    data = {"prompt": "p", "mask": (io.BytesIO(png_bytes((64, 64), "RGB")), "m.png")}
    assert error_of(edit(client, data), 400)["param"] == "mask"
    data = {"prompt": "p", "mask": "text"}
    assert error_of(edit(client, data), 400)["param"] == "mask"


def test_edit_transparent_image_is_its_own_mask(client, stub):
    img = Image.new("RGBA", (64, 64), (200, 0, 0, 255))
    img.paste((0, 0, 0, 0), (0, 0, 16, 16))
    data = {"prompt": "p", "image": (io.BytesIO(encode(img)), "i.png")}
    assert edit(client, data, image=False).status_code == 200
    assert stub.params.mask is not None and stub.params.mask.getpixel((0, 0))[3] == 0
    assert stub.params.init_image.mode == "RGB"
    # fully opaque alpha: no mask
    data = {"prompt": "p", "image": (io.BytesIO(png_bytes((64, 64), "RGBA")), "i.png")}
    assert edit(client, data, image=False).status_code == 200
    assert stub.params.mask is None


@pytest.mark.parametrize("fmt,kw", [("JPEG", {}), ("WEBP", {}), ("PNG", {})])
def test_edit_image_formats_accepted(client, stub, fmt, kw):
    data = {"prompt": "p", "image": (io.BytesIO(encode(Image.new("RGB", (80, 48), "blue"), fmt, **kw)), "x")}
    assert edit(client, data, image=False).status_code == 200
    assert stub.params.init_image.size == (80, 48)


def _gif():
    return encode(Image.new("P", (8, 8)), "GIF")


def _tiff():
    return encode(Image.new("RGB", (8, 8)), "TIFF")


def _bmp():
    return encode(Image.new("RGB", (8, 8)), "BMP")


SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"><rect width="8" height="8"/></svg>'


@pytest.mark.parametrize("payload", [_gif(), _tiff(), _bmp(), SVG, b"not an image at all", b"\x89PNG\r\n\x1a\n"])
@pytest.mark.parametrize("field", ["image", "mask", "control_image"])
def test_undecodable_or_unsupported_images(client, stub, payload, field):
    data = {"prompt": "p", field: (io.BytesIO(payload), "f.bin")}
    err = error_of(edit(client, data, image=(field != "image")), 400)
    assert err["param"] == field
    assert not stub.calls


def test_empty_image_file(client):
    data = {"prompt": "p", "image": (io.BytesIO(b""), "empty.png")}
    assert error_of(edit(client, data, image=False), 400)["param"] == "image"


def test_truncated_png(client):
    good = png_bytes((256, 256), color=(1, 2, 3))
    data = {"prompt": "p", "image": (io.BytesIO(good[: len(good) // 2]), "t.png")}
    err = error_of(edit(client, data, image=False), 400)
    assert err["param"] == "image" and err["code"] == "invalid_image"


def _png_claiming(width, height) -> bytes:
    """A tiny PNG whose IHDR claims width x height (the pixel data would not decode)."""
    raw = bytearray(png_bytes((1, 1)))
    ihdr = struct.pack(">II", width, height) + bytes(raw[24:29])
    raw[16:29] = ihdr
    raw[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return bytes(raw)


@pytest.mark.parametrize("w,h", [(5000, 5000), (100000, 100000), (2 ** 31 - 1, 2 ** 31 - 1)])
def test_decompression_bomb_rejected_from_header(client, stub, w, h):
    data = {"prompt": "p", "image": (io.BytesIO(_png_claiming(w, h)), "bomb.png")}
    err = error_of(edit(client, data, image=False), 400)
    assert (err["param"], err["code"]) == ("image", "image_too_large")
    assert not stub.calls


def test_max_input_pixels_configurable(tmp_path):
    app, _ = make_app(tmp_path, max_input_pixels=64 * 64)
    c = app.test_client()
    ok = {"prompt": "p", "image": (io.BytesIO(png_bytes((64, 64))), "a.png")}
    assert c.post(EDIT, data=ok, content_type="multipart/form-data").status_code == 200
    big = {"prompt": "p", "image": (io.BytesIO(png_bytes((72, 64))), "a.png")}
    err = error_of(c.post(EDIT, data=big, content_type="multipart/form-data"), 400)
    assert err["code"] == "image_too_large"


def test_edit_with_control_image(client, stub):
    data = {"prompt": "p", "control_image": (io.BytesIO(png_bytes((64, 64))), "c.png")}
    assert edit(client, data).status_code == 200
    assert stub.params.control_image.size == (64, 64)
