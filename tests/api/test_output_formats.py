"""The GPT-image details real clients depend on: output_format (png, jpeg, webp) with output_compression
on both endpoints, the infotext carried into JPEG/WebP as EXIF UserComment (as AUTOMATIC1111 writes it),
background, quality and the other fields they send, the response's own fields, and OPTIONS pings
answered without a key."""
import base64
import io

import pytest
from PIL import Image

from api_helpers import error_of, make_app, png_bytes
from sdcore.pipeline import EXIF_IFD, USER_COMMENT, GeneratedImage

GEN, EDIT = "/v1/images/generations", "/v1/images/edits"


@pytest.fixture
def client(tmp_path):
    return make_app(tmp_path, api_key="k")[0].test_client()


def auth():
    return {"Authorization": "Bearer k"}


def _image(item: dict, client) -> bytes:
    if "b64_json" in item:
        return base64.b64decode(item["b64_json"])
    r = client.get(item["url"], headers=auth())
    assert r.status_code == 200
    return r.data


@pytest.mark.parametrize("fmt, pil, mime", [("png", "PNG", "image/png"), ("jpeg", "JPEG", "image/jpeg"),
                                            ("webp", "WEBP", "image/webp")])
@pytest.mark.parametrize("response_format", ["b64_json", "url"])
def test_output_format_on_both_endpoints(client, fmt, pil, mime, response_format):
    for r in (client.post(GEN, headers=auth(), json={"prompt": "p", "size": "64x64", "output_format": fmt,
                                                     "response_format": response_format}),
              client.post(EDIT, headers=auth(), data={
                  "prompt": "p", "size": "64x64", "output_format": fmt.upper(), "response_format": response_format,
                  "image": (io.BytesIO(png_bytes()), "a.png")})):
        assert r.status_code == 200, r.get_json()
        body = r.get_json()
        assert (body["output_format"], body["size"], body["background"]) == (fmt, "64x64", "opaque")
        item = body["data"][0]
        assert Image.open(io.BytesIO(_image(item, client))).format == pil
        if response_format == "url":
            assert item["url"].endswith("." + fmt)
            assert client.get(item["url"], headers=auth()).mimetype == mime


def test_output_compression_is_the_jpeg_and_webp_quality(client, monkeypatch):
    import os
    noise = Image.frombytes("RGB", (128, 128), os.urandom(128 * 128 * 3))
    seen = []
    real = GeneratedImage.encoded
    monkeypatch.setattr(GeneratedImage, "encoded", lambda self, fmt="png", quality=100: seen.append(quality) or real(
        GeneratedImage(noise, self.seed, self.png, self.parameters), fmt, quality))
    sizes = {}
    for fmt in ("jpeg", "webp"):
        for c in (5, 95):
            r = client.post(GEN, headers=auth(), json={"prompt": "p", "size": "64x64", "output_format": fmt,
                                                       "output_compression": c, "response_format": "b64_json"})
            sizes[fmt, c] = len(base64.b64decode(r.get_json()["data"][0]["b64_json"]))
    assert seen == [5, 95, 5, 95]
    assert sizes["jpeg", 5] < sizes["jpeg", 95] and sizes["webp", 5] < sizes["webp", 95], sizes


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_the_infotext_travels_as_exif_user_comment(fmt):
    text = "a castle, ünïcode ✓\nNegative prompt: fog\nSteps: 20, Sampler: euler_a, Seed: 7"
    img = GeneratedImage(Image.new("RGB", (64, 64), (200, 10, 10)), 7, b"", text)
    exif = Image.open(io.BytesIO(img.encoded(fmt, 90))).getexif().get_ifd(EXIF_IFD)
    raw = exif[USER_COMMENT]
    # EXIF 2.3, UserComment: an 8-byte character code ("UNICODE\0": UCS-2/UTF-16), then the text
    assert raw[:8] == b"UNICODE\x00" and raw[8:].decode("utf-16-be") == text


@pytest.mark.parametrize("field, value, param", [
    ("output_format", "gif", "output_format"), ("output_compression", 101, "output_compression"),
    ("output_compression", "high", "output_compression"), ("background", "transparent", "background"),
    ("background", "glass", "background"), ("quality", 3, "quality"), ("moderation", 1, "moderation")])
def test_bad_values_are_400_naming_the_field(client, field, value, param):
    err = error_of(client.post(GEN, headers=auth(), json={"prompt": "p", field: value}), 400)
    assert err["param"] == param


def test_gpt_image_fields_are_accepted(client):
    r = client.post(GEN, headers=auth(), json={"prompt": "p", "model": "gpt-image-1", "size": "auto", "quality": "auto",
                                               "background": "auto", "moderation": "low", "output_format": "png",
                                               "input_fidelity": "high", "user": "u1", "style": "vivid"})
    assert r.status_code == 200, r.get_json()
    body = r.get_json()
    assert body["quality"] == "auto" and "b64_json" in body["data"][0]


def test_options_pings_need_no_key(client):
    r = client.options(GEN)
    assert r.status_code == 200 and "POST" in r.headers["Allow"]
    assert client.post(GEN, json={"prompt": "p"}).status_code == 401          # the request itself still does
